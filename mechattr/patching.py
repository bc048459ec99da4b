"""The do-operator engine: exact activation patching over any set of sites.

One engine serves every site kind and intervention. A *cell* is a set of (site, value) assignments
applied together; a sweep over a grid is one cell per site. Many cells share one forward pass as rows
of a batch (cell-major: rows j*n .. (j+1)*n-1 hold cell j's n examples). On a `TransformerBridge`,
cells whose earliest site is in block l resume from the unpatched residual at block l: the blocks
before it are not run at all, and only the last position is unembedded.
"""

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from mechattr.effects import Effects
from mechattr.forward import Forward
from mechattr.interventions import Denoise, Intervention
from mechattr.sites import Grid, Site, model_shape, validate
from mechattr.tasks import Task

__all__ = ["patch", "Cell", "Forward", "run_cells", "metric_readout", "DEFAULT_MAX_MEMORY"]

DEFAULT_MAX_MEMORY = 2 * 2**30  # bytes of transient activations one patched batch may use
_MAX_ROWS = 1024  # beyond this, bigger batches stop paying on CPU
DEFAULT_BATCH_ROWS = 64  # rows per patched batch, see run_cells

Cell = Sequence[tuple[Site, Tensor]]  # assignments applied together; each value is [example, *site]


def _resid_hook(layer: int) -> str:
    return f"blocks.{layer}.hook_resid_pre"


def _rows_per_batch(model: Any, n_pos: int, max_memory: int) -> int:
    cfg = model.cfg
    shape = model_shape(model)
    # Transient floats per row inside one block, plus the widest (MLP) and attention-score tensors.
    floats = n_pos * (10 * cfg.d_model + 4 * shape["d_mlp"] + 3 * shape["n_heads"] * n_pos) + cfg.d_vocab
    return max(1, min(_MAX_ROWS, max_memory // (4 * floats)))


def _assign(entries: list[tuple[int, tuple, Tensor]], n: int) -> Callable:
    """A hook that writes each (cell slot, site index, value) into its rows of the activation."""
    def hook(act, hook):
        for slot, index, value in entries:
            act[(slice(slot * n, (slot + 1) * n),) + index] = value.to(act.dtype)
        return act
    return hook


def _batches(forward: Forward, cells: Sequence[Cell], resid: dict[str, Tensor] | None, per_batch: int
             ) -> list[tuple[int | None, int, list[int]]]:
    """(resume layer, start position, cell ids) per batch. Cells are grouped by the block they resume at
    and sorted by their first position; a batch starts at its earliest cell's position."""
    keyed = []
    for i, cell in enumerate(cells):
        layers = [site.resume_layer for site, _ in cell]
        layer = None if resid is None or None in layers else min(layers)
        if layer is not None and _resid_hook(layer) not in resid:
            layer = None
        start = min(site.first_pos for site, _ in cell) if layer is not None and forward.reuses_prefix else 0
        keyed.append((-1 if layer is None else layer, start, i))
    keyed.sort()
    batches = []
    for layer, start, i in keyed:
        if batches and batches[-1][0] == layer and len(batches[-1][2]) < per_batch:
            batches[-1][2].append(i)
        else:
            batches.append((layer, start, [i]))
    return [(None if layer == -1 else layer, start, ids) for layer, start, ids in batches]


def metric_readout(task: Task, reference: Float[Tensor, "n vocab"]) -> Callable[[Tensor], Tensor]:
    """Turns last-position logits of stacked copies of the task, [copies * n, vocab], into the task
    metric per row, [copies * n]."""
    def readout(logits):
        copies = logits.shape[0] // task.n_examples
        rep = lambda t: t.repeat(copies, *([1] * (t.dim() - 1)))  # noqa: E731
        return task.metric(logits, rep(task.answer), rep(task.wrong), rep(reference))
    return readout


def run_cells(forward: Forward, cells: Sequence[Cell], resid: dict[str, Tensor] | None = None,
              readout: Callable[[Tensor], Tensor] | None = None, *, max_memory: int = DEFAULT_MAX_MEMORY,
              batch_rows: int = DEFAULT_BATCH_ROWS, progress: bool | None = None, desc: str = "patching"
              ) -> Float[Tensor, "cell example *out"]:
    """Last-position logits of the base run under each cell's assignments, [cell, example, vocab], or
    `readout(logits)` of them (e.g. `metric_readout`: [cell, example]), applied batch by batch so the
    logits of a large sweep are never all held at once.

    `resid` maps `blocks.{l}.hook_resid_pre` to the unpatched run's activations [n, pos, d_model]; with
    it, cells resume at their earliest site's block and, where the model allows, their earliest
    position. Batches hold about `batch_rows` rows (fewer rows start later on average; more rows run
    faster per row) and stay within `max_memory` bytes of activations.
    """
    n = forward.tokens.shape[0]
    memory_cells = _rows_per_batch(forward.model, forward.tokens.shape[1], max_memory) // n
    per_batch = max(1, min(memory_cells, -(-batch_rows // n)))
    out: list[Tensor | None] = [None] * len(cells)
    for layer, start, chunk in tqdm(_batches(forward, cells, resid, per_batch), desc=desc, leave=False,
                                    disable=True if progress is False else None, unit="batch"):
        entries: dict[str, list] = {}
        for slot, i in enumerate(chunk):
            for site, value in cells[i]:
                # A site's position is never before its batch's start (batches start at their earliest cell).
                entries.setdefault(site.hook, []).append((slot, site.index_from(start), value))
        hooks = [(name, _assign(e, n)) for name, e in entries.items()]
        logits = forward.run(len(chunk), hooks, layer, None if layer is None else resid[_resid_hook(layer)], start)
        values = logits if readout is None else readout(logits)
        for slot, i in enumerate(chunk):
            out[i] = values[slot * n:(slot + 1) * n]
    return torch.stack(out)


@dataclass(frozen=True)
class _Runs:
    """Both unpatched runs of a task: metrics, clean reference log-probs, cached activations."""

    base: Forward
    clean_metric: Tensor
    corrupt_metric: Tensor
    reference: Tensor
    base_cache: dict[str, Tensor]
    source_cache: dict[str, Tensor]


def _unpatched_runs(model: Any, task: Task, base_run: str, site_hooks: set[str], resume_hooks: set[str]) -> _Runs:
    source_run = "clean" if base_run == "corrupt" else "corrupt"
    base = Forward(model, task.tokens(base_run))
    base_logits, base_cache = base.cache(site_hooks | resume_hooks)
    source_logits, source_cache = Forward(model, task.tokens(source_run), resumable=False).cache(site_hooks)
    logits = {base_run: base_logits, source_run: source_logits}
    reference = logits["clean"].log_softmax(-1)
    metric = task.metric
    return _Runs(base=base,
                 clean_metric=metric(logits["clean"], task.answer, task.wrong, reference),
                 corrupt_metric=metric(logits["corrupt"], task.answer, task.wrong, reference),
                 reference=reference, base_cache=base_cache, source_cache=source_cache)


def patch(model: Any, task: Task, sites: Grid | Sequence[Site], intervention: Intervention = Denoise(), *,
          max_memory: int = DEFAULT_MAX_MEMORY, resume: bool = True, progress: bool | None = None) -> Effects:
    """do(site := intervention(base, source)) for every site, one site at a time, measured by the task's
    metric at the last position. Returns an `Effects` over the grid (a one-axis grid for a list).

    `resume=False` recomputes every layer (a reference path; the results are the same).
    """
    grid = sites if isinstance(sites, Grid) else Grid.of(list(sites))
    if not grid.sites:
        raise ValueError("patch needs at least one site; the grid is empty")
    validate(grid.sites, model, task.n_pos)
    hook_names = {s.hook for s in grid}
    resume_hooks = {_resid_hook(s.resume_layer) for s in grid if s.resume_layer is not None} if resume else set()
    runs = _unpatched_runs(model, task, intervention.base_run, hook_names, resume_hooks)
    cells = []
    for site in grid:
        where = (slice(None),) + site.index
        value = intervention(runs.base_cache[site.hook][where], runs.source_cache[site.hook][where])
        cells.append([(site, value)])
    resid = {k: v for k, v in runs.base_cache.items() if k in resume_hooks} if resume else None
    per_example = run_cells(runs.base, cells, resid, metric_readout(task, runs.reference), max_memory=max_memory,
                            progress=progress, desc=f"patching {grid.kind}")  # (cells, n)
    per_example = per_example.reshape(*grid.shape, task.n_examples)
    return Effects(values=per_example.mean(-1), per_example=per_example, clean=runs.clean_metric,
                   corrupt=runs.corrupt_metric, grid=grid, base_run=intervention.base_run,
                   metric=task.metric.name, intervention=intervention.name, method="patch",
                   str_tokens=task.str_tokens, meta={"task": task.name})
