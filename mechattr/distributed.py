"""Sweeps shared among the ranks of a `torch.distributed` process group.

Run the same script on every rank (`torchrun --nproc-per-node 2 script.py`): each rank computes its
share of the cells (or of the examples) and every rank returns the whole `Effects`, equal to what one
process computes. Without a process group, and outside torchrun, these are plain `patch` and
`attribute`.
"""

import os
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

from mechattr.attribution import attribute as _attribute
from mechattr.effects import Effects
from mechattr.interventions import Denoise, Intervention
from mechattr.models import model_shape
from mechattr.patching import patch as _patch
from mechattr.sites import Grid, Site, validate
from mechattr.sweeps import Piece, check_splittable, join
from mechattr.tasks import Task

__all__ = ["init", "shares", "cell_cost", "sharded", "patch", "attribute"]

_OVER = ("cells", "examples")


def init(backend: str | None = None) -> bool:
    """Join the process group that torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR, ...) describes,
    unless one is already joined. Returns whether a group is in use. The backend defaults to nccl where
    CUDA is available, gloo otherwise."""
    if not dist.is_available():
        return False
    if dist.is_initialized():
        return True
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return False
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend)
    return True


def shares(costs: Sequence[float], world: int) -> list[list[int]]:
    """Indices of `costs` split among `world` ranks in contiguous blocks of near-equal total cost: item i
    goes to the rank whose slice of the cumulative cost holds i's midpoint."""
    if any(cost <= 0 for cost in costs):
        raise ValueError(f"shares: costs must be positive, got {min(costs)}")
    total = float(sum(costs))
    owners: list[list[int]] = [[] for _ in range(world)]
    before = 0.0
    for i, cost in enumerate(costs):
        owners[min(world - 1, int(world * (before + cost / 2) / total))].append(i)
        before += cost
    return owners


def cell_cost(site: Site, model: Any, n_pos: int) -> float:
    """Rough multiply-adds of one patched row: the blocks from the site's layer on, over the positions from
    its first on (the engine resumes there), plus the unembedding of the last position. A rough guide
    to balance shares by, not a prediction of run time."""
    shape, d_model = model_shape(model), model.cfg.d_model
    block = 4 * d_model**2 + 3 * d_model * shape["d_mlp"]  # attention projections and a (gated) MLP
    if site.resume_layer is None:  # before the blocks (embeddings): a full forward
        rows = shape["n_layers"] * n_pos
    else:
        rows = (shape["n_layers"] - site.resume_layer) * (n_pos - site.first_pos)
    return float(block * rows + d_model * model.cfg.d_vocab)


def sharded(compute: Callable[..., Effects], model: Any, task: Task, sites: Grid | Sequence[Site], *,
            over: str = "cells", **kwargs: Any) -> Effects:
    """`compute(model, task, sites, **kwargs)` with its cells (`over="cells"`) or its examples
    (`over="examples"`) shared among the ranks; every rank returns the joined `Effects`.

    Each rank takes a contiguous block of cells of near-equal estimated cost (`cell_cost`): patched runs
    resume at the patched layer and position, so late cells cost less, and a block keeps the cells that
    share a batch in the single-process run together. Sharing examples needs an intervention that reads
    each example alone (see `sweeps.EXAMPLEWISE`).
    """
    if over not in _OVER:
        raise ValueError(f"over={over!r}: valid: {', '.join(_OVER)}")
    grid = sites if isinstance(sites, Grid) else Grid.of(list(sites))
    if not init():
        return compute(model, task, grid, **kwargs)
    validate(grid.sites, model, task.n_pos)
    if over == "examples" and "intervention" in kwargs:
        check_splittable(kwargs["intervention"])
    rank, world = dist.get_rank(), dist.get_world_size()
    if over == "cells":
        costs = [cell_cost(site, model, task.n_pos) for site in grid]
        cells, examples = shares(costs, world)[rank], list(range(task.n_examples))
        mine, run = cells, lambda: compute(model, task, Grid.of([grid.sites[i] for i in cells]), **kwargs)
    else:
        cells, examples = list(range(len(grid))), shares([1.0] * task.n_examples, world)[rank]
        mine, run = examples, lambda: compute(model, task.subset(examples), grid, **kwargs)
    error = None
    try:
        outcome = Piece.of(run(), cells, examples) if mine else None
    except Exception as caught:  # reported to the peers, which would otherwise wait for this rank forever
        error, outcome = caught, f"{type(caught).__name__}: {caught}"
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, outcome)
    if error is not None:
        raise error
    failed = [(r, o) for r, o in enumerate(gathered) if isinstance(o, str)]
    if failed:
        raise RuntimeError(f"rank {failed[0][0]} of {world} failed its share of the sweep: {failed[0][1]}")
    return join(grid, [p for p in gathered if p is not None])


def patch(model: Any, task: Task, sites: Grid | Sequence[Site], intervention: Intervention = Denoise(), *,
          over: str = "cells", **kwargs: Any) -> Effects:
    """`mechattr.patch`, shared among the ranks (see `sharded`)."""
    return sharded(_patch, model, task, sites, over=over, intervention=intervention, **kwargs)


def attribute(model: Any, task: Task, sites: Grid | Sequence[Site], method: str = "atp", *,
              over: str = "examples", **kwargs: Any) -> Effects:
    """`mechattr.attribution.attribute`, shared among the ranks (see `sharded`). By examples by default:
    one gradient pass serves every site, so its cost grows with the examples, not the cells."""
    return sharded(_attribute, model, task, sites, over=over, method=method, **kwargs)
