"""Sweeps in pieces: a grid computed in chunks of cells and of examples, joined into one `Effects`.

Chunks of cells bound the work lost to an interruption: with a `directory`, every finished chunk is
written there as a safetensors file, and a rerun loads those instead of recomputing them. Chunks of
examples bound memory: the unpatched runs cache every example's activations at once, so a task of
hundreds of prompts is run a slice at a time. Splitting examples is exact only for interventions that
read each example alone (`EXAMPLEWISE`); `Mean`, `Resample` and `GaussianNoise` draw on the whole task.
"""

import hashlib
import json
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from jaxtyping import Float
from safetensors import safe_open
from torch import Tensor

from mechattr.effects import Effects
from mechattr.interventions import INTERVENTIONS, Denoise, Intervention
from mechattr.patching import patch
from mechattr.sites import Grid, Site, validate
from mechattr.storage import write_safetensors, write_text
from mechattr.tasks import Task

__all__ = ["sweep", "Piece", "join", "check_splittable", "EXAMPLEWISE"]

# Interventions whose value for one example reads only that example's activations.
EXAMPLEWISE = tuple(cls for cls in INTERVENTIONS.values() if cls.examplewise)
# Arguments that change how a sweep runs, not what it computes, so a resumed sweep may change them.
_RUN_ONLY = ("progress", "max_memory")
_MANIFEST = "sweep.json"

Compute = Callable[..., Effects]  # (model, task, grid, intervention=..., **kwargs) -> Effects


@dataclass(frozen=True, eq=False)
class Piece:
    """One chunk's results: `per_example` [cells, examples] for grid cells `cells` (flat, C order) and
    task examples `examples`, with those examples' unpatched baselines."""

    cells: Sequence[int]
    examples: Sequence[int]
    per_example: Float[Tensor, "cells examples"]
    clean: Float[Tensor, " examples"]
    corrupt: Float[Tensor, " examples"]
    labels: dict[str, Any]  # Effects fields other than tensors and grid (base_run, metric, ...)

    @classmethod
    def of(cls, effects: Effects, cells: Sequence[int], examples: Sequence[int]) -> "Piece":
        """The piece an `Effects` over a flat list of sites holds, moved to the CPU."""
        labels = {f.name: getattr(effects, f.name) for f in fields(Effects)
                  if f.name not in ("values", "per_example", "clean", "corrupt", "grid")}
        per_example = effects.per_example.reshape(len(cells), len(examples))
        return cls(cells, examples, per_example.detach().cpu(), effects.clean.detach().cpu(),
                   effects.corrupt.detach().cpu(), labels)


def join(grid: Grid, pieces: Sequence[Piece]) -> Effects:
    """One `Effects` over `grid` from pieces that together cover every (cell, example) exactly once."""
    n = 1 + max(max(p.examples) for p in pieces)
    per_example = torch.zeros(len(grid), n, dtype=pieces[0].per_example.dtype)
    clean, corrupt = torch.zeros(n), torch.zeros(n)
    covered = torch.zeros(len(grid), n, dtype=torch.int64)
    for p in pieces:
        rows, cols = torch.as_tensor(list(p.cells))[:, None], torch.as_tensor(list(p.examples))[None, :]
        per_example[rows, cols] = p.per_example
        covered[rows, cols] += 1
        clean[cols[0]], corrupt[cols[0]] = p.clean, p.corrupt
    if not bool((covered == 1).all()):
        missing = int((covered == 0).sum())
        raise ValueError(f"pieces cover {missing} (cell, example) pairs of grid {grid.kind} {grid.shape} "
                         f"x {n} examples zero times and {int((covered > 1).sum())} more than once")
    per_example = per_example.reshape(*grid.shape, n)
    return Effects(values=per_example.mean(-1), per_example=per_example, clean=clean, corrupt=corrupt,
                   grid=grid, **pieces[0].labels)


def check_splittable(intervention: Intervention) -> None:
    """Raise unless the intervention's value for an example depends on that example alone."""
    if not intervention.examplewise:
        raise ValueError(
            f"intervention {intervention.name!r} reads every example of the task at once (a mean, a "
            f"resampled donor, or noise drawn for the whole batch), so its results change when the examples "
            f"are split; split only the cells, or use one of {', '.join(c.name for c in EXAMPLEWISE)}")


def _chunks(n: int, size: int | None, what: str) -> list[range]:
    if size is not None and size < 1:
        raise ValueError(f"{what} must be a positive number, got {size}")
    size = n if size is None else size
    return [range(start, min(n, start + size)) for start in range(0, n, size)]


def sweep(model: Any, task: Task, sites: Grid | Sequence[Site], intervention: Intervention = Denoise(), *,
          compute: Compute = patch, cells_per_chunk: int | None = None, examples_per_chunk: int | None = None,
          directory: str | Path | None = None, on_chunk: Callable[[int, int], None] | None = None,
          **kwargs: Any) -> Effects:
    """`compute(model, task, sites, intervention=intervention, **kwargs)` (default `patch`), chunk by chunk.

    Each chunk is `cells_per_chunk` cells (flat grid order) by `examples_per_chunk` examples (None:
    all). With `directory`, finished chunks are stored there and a rerun only computes the missing
    ones; the directory must hold the same sweep (model weights, task, sites, intervention, compute,
    chunk sizes) or a ValueError says what differs. `on_chunk(done, total)` runs after every computed
    chunk. Returns an `Effects` over the grid, as `compute` would return for it whole.
    """
    grid = sites if isinstance(sites, Grid) else Grid.of(list(sites))
    validate(grid.sites, model, task.n_pos)
    cell_chunks = _chunks(len(grid), cells_per_chunk, "cells_per_chunk")
    example_chunks = _chunks(task.n_examples, examples_per_chunk, "examples_per_chunk")
    if len(example_chunks) > 1:
        check_splittable(intervention)
    store = None
    if directory is not None:
        store = _Store(Path(directory))
        store.claim(_manifest(model, task, grid, intervention, compute, cells_per_chunk, examples_per_chunk, kwargs))
    total = len(cell_chunks) * len(example_chunks)
    pieces = []
    for j, examples in enumerate(example_chunks):
        subtask = task if len(example_chunks) == 1 else task.subset(list(examples))
        for i, cells in enumerate(cell_chunks):
            piece = store.load(i, j, cells, examples) if store else None
            if piece is None:
                sub = Grid.of([grid.sites[c] for c in cells])
                piece = Piece.of(compute(model, subtask, sub, intervention=intervention, **kwargs), cells, examples)
                if store:
                    store.save(i, j, piece)
                if on_chunk:
                    on_chunk(len(pieces) + 1, total)
            pieces.append(piece)
    return join(grid, pieces)


class _Store:
    """A sweep's directory: `sweep.json` (what it computes) and `chunk-{cells}-{examples}.safetensors`."""

    def __init__(self, directory: Path):
        self.directory = directory

    def claim(self, manifest: dict[str, Any]) -> None:
        """Adopt the directory for this sweep, or refuse one that holds another sweep."""
        path = self.directory / _MANIFEST
        if path.is_file():
            stored = json.loads(path.read_text())
            differ = sorted(k for k in set(stored) | set(manifest) if stored.get(k) != manifest.get(k))
            if differ:
                raise ValueError(f"{self.directory} holds a sweep with a different {', '.join(differ)}; "
                                 "use another directory, or delete this one to start over")
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        write_text(path, json.dumps(manifest, indent=1))

    def _path(self, i: int, j: int) -> Path:
        return self.directory / f"chunk-{i:05d}-{j:05d}.safetensors"

    def save(self, i: int, j: int, piece: Piece) -> None:
        tensors = {"per_example": piece.per_example.contiguous(), "clean": piece.clean.contiguous(),
                   "corrupt": piece.corrupt.contiguous()}
        labels = {"labels": json.dumps(piece.labels)}
        write_safetensors(self._path(i, j), tensors, labels)

    def load(self, i: int, j: int, cells: range, examples: range) -> Piece | None:
        path = self._path(i, j)
        if not path.is_file():
            return None
        with safe_open(str(path), framework="pt") as f:
            labels = json.loads(f.metadata()["labels"])
            labels["str_tokens"] = tuple(labels["str_tokens"])
            return Piece(cells, examples, f.get_tensor("per_example"), f.get_tensor("clean"),
                         f.get_tensor("corrupt"), labels)


def _manifest(model: Any, task: Task, grid: Grid, intervention: Intervention, compute: Compute,
              cells_per_chunk: int | None, examples_per_chunk: int | None, kwargs: dict[str, Any]) -> dict[str, Any]:
    return {
        "model": _digest(list(model.parameters())),
        "task": _digest([task.clean, task.corrupt, task.answer, task.wrong, task.metric]),
        "grid": [grid.kind, list(grid.axes), list(grid.shape), [s.to_json() for s in grid.sites]],
        "intervention": _digest(intervention),
        "compute": f"{compute.__module__}.{compute.__qualname__}",
        "arguments": _digest({k: v for k, v in kwargs.items() if k not in _RUN_ONLY}),
        "chunks": [cells_per_chunk, examples_per_chunk],
    }


def _digest(obj: Any) -> str:
    """A content hash of tensors, dataclasses (e.g. interventions, metrics) and plain values."""
    h = hashlib.sha256()

    def feed(x: Any) -> None:
        if torch.is_tensor(x):
            x = x.detach().cpu().contiguous()
            h.update(f"tensor{tuple(x.shape)}{x.dtype}".encode())
            h.update(x.reshape(-1).view(torch.uint8).numpy() if x.numel() else b"")
        elif is_dataclass(x):
            h.update(type(x).__qualname__.encode())
            for f in fields(x):
                feed(f.name)
                feed(getattr(x, f.name))
        elif isinstance(x, (list, tuple)):
            h.update(f"seq{len(x)}".encode())
            for item in x:
                feed(item)
        elif isinstance(x, dict):
            feed(sorted(x.items(), key=lambda kv: str(kv[0])))
        elif type(x).__repr__ is object.__repr__ and hasattr(x, "__dict__"):
            feed((type(x).__qualname__, vars(x)))  # the default repr holds a memory address
        else:
            h.update(repr(x).encode())

    feed(obj)
    return h.hexdigest()
