"""Patched runs: cells of assignments, many to a batch, resumed where the unpatched run is unchanged.

A *cell* is a set of (site, value) assignments applied together; a sweep over a grid is one cell per
site. Many cells share one forward pass as rows of a batch (cell-major: rows j*n .. (j+1)*n-1 hold
cell j's n examples). On a `TransformerBridge`, cells whose earliest site is in block l resume from the
unpatched residual at block l: the blocks before it are not run at all, and only the last position is
unembedded. Where the model allows, a cell also starts at the first position it changes: its site's
position, or, for a site over every position, the first position where its value differs from the
unpatched run's (bit for bit). A site at a named position ("S2") is patched at each example's own index
of it (`Task.index_at`).
"""

from typing import Any, Callable, Mapping, Sequence

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from mechattr.models import model_shape
from mechattr.runs import Runs
from mechattr.sites import KINDS, Site, hook_name

__all__ = ["Cell", "run_cells", "DEFAULT_MAX_MEMORY", "DEFAULT_BATCH_ROWS"]

DEFAULT_MAX_MEMORY = 2 * 2**30  # bytes of transient activations one patched batch may use
_MAX_ROWS = 1024  # beyond this, bigger batches stop paying on CPU
DEFAULT_BATCH_ROWS = 64  # rows per patched batch, see run_cells

Cell = Sequence[tuple[Site, Tensor]]  # assignments applied together; each value is [example, *site]


def _rows_per_batch(model: Any, n_pos: int, max_memory: int) -> int:
    cfg = model.cfg
    shape = model_shape(model)
    # Transient floats per row inside one block, plus the widest (MLP) and attention-score tensors.
    floats = n_pos * (10 * cfg.d_model + 4 * shape["d_mlp"] + 3 * shape["n_heads"] * n_pos) + cfg.d_vocab
    return max(1, min(_MAX_ROWS, max_memory // (4 * floats)))


def _assign(entries: list[tuple[tuple, Tensor]]) -> Callable:
    """A hook that writes each value at its index (its cell's rows, then the site's axes) of the activation."""
    def hook(act, hook):
        for index, value in entries:
            act[index] = value.to(act.dtype)
        return act
    return hook


def _spans_positions(site: Site) -> bool:
    """Whether the site covers every position on its value's first axis after the batch ([n, pos, ...]):
    no position given, and every axis before the position axis indexed (a pattern's head)."""
    dims = KINDS[site.kind].dims
    return site.pos is None and all(getattr(site, d) is not None for d in dims[:dims.index("pos")])


def _first_pos(runs: Runs, site: Site, value: Tensor, base: Mapping[str, Tensor]) -> int:
    """The earliest position the assignment changes in any example of the batch. A site over every
    position whose value equals the base run's activation, bit for bit, on positions < p in every example
    (a clean prompt and its corrupted copy agree up to the first changed token) changes nothing before
    p, so p is where its patched run can start (at most the earliest last token, which is read out)."""
    at = runs.task.index_at(site)
    if at is not None:
        return int(at.min())
    if site.hook not in base or not _spans_positions(site):
        return site.first_pos
    unpatched = base[site.hook][(slice(None), *site.index)]
    if unpatched.shape != value.shape:
        return 0
    differs = (value != unpatched.to(value.dtype)).reshape(*value.shape[:2], -1).any(-1).any(0)  # [pos]
    last = runs.task.last
    earliest_last = value.shape[1] - 1 if last is None else int(last.min())
    first = int(differs.int().argmax()) if differs.any() else value.shape[1]
    return min(first, earliest_last)


def _batches(runs: Runs, cells: Sequence[Cell], resid: dict[str, Tensor] | None, per_batch: int
             ) -> list[tuple[int | None, int, list[int]]]:
    """(resume layer, start position, cell ids) per batch. Cells are grouped by the block they resume at
    and sorted by their first position; a batch starts at its earliest cell's position."""
    keyed = []
    for i, cell in enumerate(cells):
        layers = [site.resume_layer for site, _ in cell]
        layer = None if resid is None or None in layers else min(layers)
        if layer is not None and hook_name("resid_pre", layer) not in resid:
            layer = None
        start = 0
        if layer is not None and runs.forward.reuses_prefix:
            start = min(_first_pos(runs, site, value, runs.base.acts) for site, value in cell)
        keyed.append((-1 if layer is None else layer, start, i))
    keyed.sort()
    batches = []
    for layer, start, i in keyed:
        if batches and batches[-1][0] == layer and len(batches[-1][2]) < per_batch:
            batches[-1][2].append(i)
        else:
            batches.append((layer, start, [i]))
    return [(None if layer == -1 else layer, start, ids) for layer, start, ids in batches]


def run_cells(runs: Runs, cells: Sequence[Cell], layers: Sequence[int] | None = None, *,
              max_memory: int = DEFAULT_MAX_MEMORY, batch_rows: int = DEFAULT_BATCH_ROWS,
              progress: bool | None = None, desc: str = "patching") -> Float[Tensor, "cell example"]:
    """The task metric of the base run under each cell's assignments, [cell, example], batch by batch.

    Cells resume at their earliest site's block where it is in `layers` (the blocks whose unpatched input
    the runs keep; None: every cell runs the full forward) and, where the model allows, at their earliest
    changed position. Batches hold about `batch_rows` rows (fewer rows start later on average; more rows
    run faster per row) and stay within `max_memory` bytes of activations.
    """
    runs.record(base_hooks=[hook_name("resid_pre", layer) for layer in layers or ()], block_inputs=layers is not None)
    resid = None if layers is None else runs.resid(layers)
    forward, n, row_metric = runs.forward, runs.task.n_examples, runs.row_metric()
    memory_cells = _rows_per_batch(runs.model, forward.tokens.shape[1], max_memory) // n
    per_batch = max(1, min(memory_cells, -(-batch_rows // n)))
    out: list[Tensor | None] = [None] * len(cells)
    for layer, start, chunk in tqdm(_batches(runs, cells, resid, per_batch), desc=desc, leave=False,
                                    disable=True if progress is False else None, unit="batch"):
        entries: dict[str, list] = {}
        for slot, i in enumerate(chunk):
            for site, value in cells[i]:
                # A site's position is never before its batch's start (batches start at their earliest cell);
                # a site over every position is written from the start on (it equals the base run before).
                rows = slice(slot * n, (slot + 1) * n)
                value = value[:, start:] if start and _spans_positions(site) else value
                entries.setdefault(site.hook, []).append((site.where(rows, runs.task.index_at(site), start), value))
        hooks = [(name, _assign(e)) for name, e in entries.items()]
        start_resid = None if layer is None else resid[hook_name("resid_pre", layer)]
        logits = forward.patched(len(chunk), hooks, layer, start_resid, start)
        values = row_metric(logits)
        for slot, i in enumerate(chunk):
            out[i] = values[slot * n:(slot + 1) * n]
    return torch.stack(out)
