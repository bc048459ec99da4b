"""Masked fine-tuning shared among processes (data parallel), under Hugging Face accelerate.

Call `accelerated.train` where a script would call `mechattr.finetune.train`, and start the script on
N processes:

    torchrun --standalone --nproc-per-node 2 train.py                  # CPU (gloo), or one GPU each (nccl)
    accelerate launch --multi_gpu --num_processes 2 train.py           # the same through accelerate
    python train.py                                                    # one process: plain `train`

or from Python: `accelerated.launch("train.py", "--steps", "50", processes=2)`.

Every process builds the same model, masks and data and runs the one masked trainer. Each step's batch
is the single-process one (`batch_indices(n, batch_size, seed, step)`); process r runs the model on its
contiguous block of the batch's rows, the rows' logits are gathered so that every process computes the
loss of the whole batch, and backward reaches only the process's own rows. Each trained parameter's
gradient is then summed over the processes at its trained entries only, as backward produces it, so
clipping and the optimizer see the single-process gradient (up to float summation order) and every
process holds the same weights after every step. Frozen entries are never written: bit-identical.

Files: `Checkpoint` callbacks and `delta_path` are written by the main process only. Other callbacks run
on every process, because a model call is collective (every process must make it); wrap a callback that
only writes in `OnMain`.
"""

import subprocess
import sys
from functools import partial
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.distributed as dist
from accelerate import Accelerator
from jaxtyping import Bool, Float, Int
from torch import Tensor

from mechattr.distributed import shares
from mechattr.finetune.callbacks import Checkpoint
from mechattr.finetune.data import Data, logits_of
from mechattr.finetune.trainer import Callback, FinetuneResult, TrainConfig, TrainState
from mechattr.finetune.trainer import train as _train
from mechattr.selection import SiteSet

__all__ = ["train", "OnMain", "launch"]


class OnMain(Callback):
    """Runs `callback` on the main process only: for callbacks that write files and never call the model."""

    def __init__(self, callback: Callback, main: bool | None = None):
        self.callback = callback
        self.main = main  # None: ask the launcher's environment when the run starts

    def _is_main(self) -> bool:
        if self.main is None:
            self.main = not dist.is_initialized() or dist.get_rank() == 0
        return self.main

    def on_start(self, state: TrainState) -> None:
        if self._is_main():
            self.callback.on_start(state)

    def on_step(self, state: TrainState) -> None:
        if self._is_main():
            self.callback.on_step(state)

    def on_end(self, state: TrainState) -> None:
        if self._is_main():
            self.callback.on_end(state)


class _GatherRows(torch.autograd.Function):
    """Forward: every process's rows, concatenated in rank order. Backward: this process's rows' gradient
    (every process computes the same loss from the same gathered logits, so the gradient it hands back is
    already the whole batch's: no communication needed)."""

    @staticmethod
    def forward(ctx: Any, local: Tensor, counts: list[int], rank: int) -> Tensor:
        ctx.start, ctx.n = sum(counts[:rank]), counts[rank]
        padded = local.new_zeros((max(counts), *local.shape[1:]))  # gloo gathers equal shapes only
        padded[: ctx.n] = local
        parts = [torch.empty_like(padded) for _ in counts]
        dist.all_gather(parts, padded)
        return torch.cat([part[:n] for part, n in zip(parts, counts)])

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        return grad[ctx.start: ctx.start + ctx.n], None, None


class _Shared:
    """The model as the trainer sees it: a call runs this process's block of rows and returns every row's
    logits; every other attribute (parameters, cfg, tokenizer) is the model's own."""

    def __init__(self, model: Any, rank: int, world: int):
        self.model, self.rank, self.world = model, rank, world

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)

    def __call__(self, tokens: Int[Tensor, "n pos"]) -> Float[Tensor, "n pos vocab"]:
        n = tokens.shape[0]
        if n < self.world:
            if torch.is_grad_enabled():  # every process would count the whole batch's gradient
                raise ValueError(f"a training batch of {n} examples cannot be shared among {self.world} processes")
            return logits_of(self.model, tokens)
        counts = [len(block) for block in shares([1.0] * n, self.world)]
        start = sum(counts[: self.rank])
        device = next(iter(self.model.parameters())).device
        local = logits_of(self.model, tokens[start: start + counts[self.rank]].to(device))  # (b, P, vocab)
        return _GatherRows.apply(local, counts, self.rank).to(tokens.device)


def _sum_entries(param: Tensor, index: Tensor | None) -> None:
    """Sum `param.grad` over the processes at the entries `index` (all entries when None), in place."""
    if not param.grad.is_contiguous():
        param.grad = param.grad.contiguous()
    flat = param.grad.view(-1)
    if index is None:
        dist.all_reduce(flat)
        return
    part = flat[index]  # (n_trained,) a copy: all_reduce needs one contiguous buffer
    dist.all_reduce(part)
    flat[index] = part


class _SumGradients(Callback):
    """Hooks that sum each trained parameter's gradient at its trained entries as soon as backward has
    accumulated it. The hooks fire in the same order on every process (the same graph), as the
    collectives require."""

    def __init__(self):
        self.handles: list[Any] = []

    def on_start(self, state: TrainState) -> None:
        for _, param, index, _, _ in state.entries.slots:
            self.handles.append(param.register_post_accumulate_grad_hook(partial(_sum_entries, index=index)))

    def on_end(self, state: TrainState) -> None:
        self.remove()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


def train(model: Any, masks: dict[str, Bool[Tensor, "..."]], data: Data, config: TrainConfig = TrainConfig(),
          callbacks: Sequence[Callback] = (), *, accelerator: Accelerator | None = None,
          resume: str | Path | None = None, progress: bool = True, sites: SiteSet | None = None,
          base_model: str | None = None, delta_path: str | Path | None = None) -> FinetuneResult:
    """`mechattr.finetune.train`, with each step's batch shared among the processes of `accelerator`
    (default: `Accelerator()` on the launcher's environment; CPU processes use gloo). Every process
    returns the same result; the main process alone writes `delta_path`, `Checkpoint`s and the progress
    bar. Put the model on `accelerator.device` before building its masks.
    """
    accelerator = accelerator or Accelerator(cpu=not torch.cuda.is_available())
    world, rank, main = accelerator.num_processes, accelerator.process_index, accelerator.is_main_process
    callbacks = [OnMain(c, main) if isinstance(c, Checkpoint) else c for c in callbacks]
    options = dict(resume=resume, sites=sites, base_model=base_model, progress=progress and main)
    if world == 1:
        result = _train(model, masks, data, config, callbacks, **options)
    else:
        batch = min(config.batch_size, data.n_examples)
        if batch < world:
            raise ValueError(f"batch of {batch} examples (batch_size {config.batch_size}, {data.n_examples} "
                             f"examples) cannot be shared among {world} processes; use batch_size >= {world}")
        # Not `accelerator.prepare(model)` (torch DDP): DDP sums the whole gradient of every parameter that
        # requires one (all 576 x 576 entries of a q_proj for one trained head), fixed when wrapping, before
        # the trainer decides which parameters need gradients.
        summing = _SumGradients()
        try:
            result = _train(_Shared(model, rank, world), masks, data, config, [summing, *callbacks], **options)
        finally:
            summing.remove()
    if delta_path is not None and main:
        result.delta.save(delta_path)
    accelerator.wait_for_everyone()  # the delta exists for every process once train returns
    return result


def launch(script: str | Path, *args: str | Path | int | float, processes: int = 2,
           timeout: int | float | None = None) -> subprocess.CompletedProcess:
    """Run `python script *args` on `processes` local processes under torchrun and return the finished
    process (output captured); a RuntimeError carries the end of the output if any process failed.
    torchrun reads abbreviations of its own options anywhere on the line: a script option such as `--n`
    is refused as ambiguous, so spell script options out (`--examples`)."""
    if processes < 1:
        raise ValueError(f"processes must be >= 1, got {processes}")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
               str(script), *map(str, args)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited with {done.returncode}:\n{done.stderr[-3000:]}")
    return done
