"""GPU benchmark: exact grids vs TL's generic_activation_patch, AtP, a fine-tuning step, peak memory.

All in one process on one model (TransformerLens 4.3's `generic_activation_patch` as the reference).
Prints, for the model and batch of `bench_patching.py` (any `--model`, `--dtype`):
  - per site kind, mechattr's and TL's time on the full [layer, pos] grid, their ratio and agreement,
  - AtP over the same sites and every head: time, and Spearman correlation with the exact grids,
  - one fine-tuning step on the heads of the last layer (precision masks): time and loss,
  - `torch.cuda.max_memory_allocated` growth over each phase, and the weights' own memory.
Without CUDA it says so and exits 0; `--device cpu` runs the same code on the CPU as a smoke check
(memory is then the sampled growth of resident memory).

    .venv/bin/python benchmarks/bench_gpu.py [--model smollm2-135m] [--dtype bfloat16] [--n 8] [--tl-layers 5]
"""

import argparse
import sys

import torch
from scipy import stats

from bench_patching import add_model_arguments, compare_grids, describe, model_and_task, timed

import mechattr
from mechattr.finetune import TrainConfig, train
from mechattr.finetune.masks import masks
from mechattr.finetune.memory import PeakMemory
from mechattr.sites import Grid, Site

MB = 2**20


def cuda_missing(device: str) -> bool:
    return torch.device(device).type == "cuda" and not torch.cuda.is_available()


def card(device: torch.device) -> str:
    if device.type != "cuda":
        return f"{device} (no GPU: smoke check)"
    props = torch.cuda.get_device_properties(device)
    return f"{torch.cuda.get_device_name(device)} ({props.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}"


def peak(memory: PeakMemory) -> str:
    return "n/a" if memory.peak_bytes is None else f"{memory.peak_bytes / MB:.0f} MB"


def atp_report(model, task, grids: dict[str, mechattr.Effects], device: torch.device) -> PeakMemory:
    """AtP over the exact grids' sites and every head (all positions), checked against the exact grids."""
    heads = mechattr.grid(model, "z", task.n_pos)
    sites = Grid.of([s for effects in grids.values() for s in effects.sites] + list(heads.sites))
    with PeakMemory(device) as memory:
        estimate, seconds = timed(lambda: mechattr.attribute(model, task, sites, "atp"), device)
    by_site = dict(zip(estimate.sites, estimate.effect.flatten().tolist()))
    rho = {kind: stats.spearmanr([by_site[s] for s in effects.sites], effects.effect.flatten().tolist())[0]
           for kind, effects in grids.items()}
    print(f"atp        {len(sites.sites)} sites in {seconds:.2f} s, peak memory {peak(memory)}; Spearman vs exact: "
          + ", ".join(f"{kind} {value:.3f}" for kind, value in rho.items()), flush=True)
    return memory


def finetune_report(model, task, steps: int, device: torch.device) -> PeakMemory | None:
    """`steps` masked steps on every head of the last layer; checks a frozen weight is untouched."""
    sites = [Site("z", model.cfg.n_layers - 1, head=h) for h in range(model.cfg.n_heads)]
    try:
        mask_set = masks(model, sites)
    except ValueError as error:
        print(f"finetune   skipped: {str(error).splitlines()[0]}")
        return None
    frozen = next(name for name, _ in model.named_parameters() if name not in mask_set)
    before = dict(model.named_parameters())[frozen].detach().clone()
    config = TrainConfig(lr=1e-4, steps=steps, batch_size=task.n_examples)
    with PeakMemory(device) as memory:
        result, seconds = timed(lambda: train(model, mask_set, task, config, progress=False), device)
    assert torch.equal(dict(model.named_parameters())[frozen], before), f"frozen {frozen} changed"
    print(f"finetune   {steps} step(s), {result.n_trained} trained entries, {seconds:.2f} s "
          f"({seconds / max(steps, 1):.2f} s/step), loss {result.losses[0]:.3f}, peak memory {peak(memory)}")
    return memory


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser, device="cuda")
    parser.add_argument("--kinds", default="resid_pre,attn_out,mlp_out")
    parser.add_argument("--tl-layers", type=int, default=5, help="time TL on this many evenly spaced layers")
    parser.add_argument("--steps", type=int, default=1, help="fine-tuning steps")
    args = parser.parse_args()
    if cuda_missing(args.device):
        print(f"bench_gpu: no CUDA GPU on this machine (torch {torch.__version__}, "
              f"torch.cuda.is_available() is False); nothing to measure. `--device cpu` runs the same code "
              "on the CPU as a smoke check.")
        return 0

    model, task = model_and_task(args)
    device = next(model.parameters()).device
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    print(f"{describe(model, task, args.model)}\ndevice: {card(device)}; weights {weights / MB:.1f} MB", flush=True)
    with PeakMemory(device) as exact:
        grids = compare_grids(model, task, args.kinds.split(","), args.tl_layers)
    print(f"exact grids (mechattr and TL) peak memory {peak(exact)}")
    phases = [exact, atp_report(model, task, grids, device), finetune_report(model, task, args.steps, device)]
    growth = [m.peak_bytes for m in phases if m is not None and m.peak_bytes is not None]
    if growth:
        print(f"peak memory: weights {weights / MB:.1f} MB + largest phase growth {max(growth) / MB:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
