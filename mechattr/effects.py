"""Effects: the labelled result of patching or attribution over a grid of sites or a list of edges.

An `Effects` holds the mean metric under the intervention for every cell of a `Grid`, the per-example
values behind it, and the clean and corrupted baselines, so statistics and plots need nothing else.
Node and edge results are the same type: an edge grid is `Grid.of(edges)`, of kind "edge".
"""

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Bool, Float
from safetensors.torch import load_file
from scipy import stats
from torch import Tensor

from mechattr.graph import unit_from_json
from mechattr.interventions import Intervention, arguments, from_arguments
from mechattr.sites import Grid, Site
from mechattr.stats import benjamini_hochberg
from mechattr.storage import write_json, write_safetensors

__all__ = ["Effects", "normalize", "save_effects", "load_effects"]


def normalize(values: Float[Tensor, "*cells"], clean: Float[Tensor, " example"], corrupt: Float[Tensor, " example"],
              what: str = "the task") -> Float[Tensor, "*cells"]:
    """(values - corrupted) / (clean - corrupted), with the baselines averaged over examples: 1 = the clean
    behaviour, 0 = the corrupted one. The one definition behind `Effects.normalized` and faithfulness."""
    clean_mean, corrupt_mean = float(clean.mean()), float(corrupt.mean())
    gap = clean_mean - corrupt_mean
    if abs(gap) < 1e-12:
        raise ValueError(f"{what}: clean and corrupted metrics are equal ({clean_mean:.6g}); the normalized "
                         "effect is undefined")
    return (values - corrupt_mean) / gap


@dataclass(frozen=True, eq=False)
class Effects:
    """Metric under intervention per site (or edge). `values` has the grid's shape; `per_example` adds an
    example axis last; `clean` and `corrupt` are the per-example metrics of the two unpatched runs."""

    values: Float[Tensor, "*grid"]
    per_example: Float[Tensor, "*grid example"]
    clean: Float[Tensor, " example"]
    corrupt: Float[Tensor, " example"]
    grid: Grid
    base_run: str = "corrupt"  # the run intervened on
    metric: str = "logit_diff"
    intervention: str = "denoise"  # its name; `applied` is the intervention itself
    method: str = "patch"  # "patch" (exact) or the attribution estimate's name
    str_tokens: tuple[str, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict)
    intervention_args: dict[str, Any] | None = None  # its constructor arguments (None: not known)

    def __post_init__(self):
        if tuple(self.values.shape) != self.grid.shape:
            raise ValueError(f"values have shape {tuple(self.values.shape)} but the grid is {self.grid.shape}")
        expected = (*self.grid.shape, self.clean.shape[0])
        if tuple(self.per_example.shape) != expected:
            raise ValueError(f"per_example has shape {tuple(self.per_example.shape)}, expected {expected}")

    @classmethod
    def of(cls, runs: Any, grid: Grid, per_example: Float[Tensor, "cell example"], method: str, **meta: Any
           ) -> "Effects":
        """The result of patching or estimating every cell of `grid` on `runs` (a `mechattr.runs.Runs`):
        `per_example` holds the metric under the runs' intervention, one row per cell in grid order."""
        task, intervention = runs.task, runs.intervention
        # Results are small and their statistics run on the CPU, whatever device the model is on.
        per_example = per_example.reshape(*grid.shape, task.n_examples).float().cpu()
        return cls(values=per_example.mean(-1), per_example=per_example, clean=runs.clean.cpu(),
                   corrupt=runs.corrupt.cpu(), grid=grid, base_run=runs.base_run, metric=task.metric.name,
                   intervention=intervention.name, method=method, str_tokens=task.str_tokens,
                   meta={"task": task.name, "varying_positions": _varying_positions(task), **meta},
                   intervention_args=arguments(intervention))

    # Labels -------------------------------------------------------------------------------------
    @property
    def applied(self) -> Intervention | None:
        """The intervention these effects are under, with its arguments (`Resample(seed=3)`); None where
        they are not known (a `Steer` vector is not saved)."""
        return from_arguments(self.intervention, self.intervention_args)

    @property
    def kind(self) -> str:
        return self.grid.kind

    @property
    def axes(self) -> tuple[str, ...]:
        return self.grid.axes

    @property
    def sites(self) -> tuple[Any, ...]:
        """The grid's sites (or, for an edge grid, its edges), in grid order."""
        return self.grid.sites

    @property
    def edges(self) -> tuple[Any, ...]:
        """The edges of an edge grid (`Grid.of(edges)`)."""
        if self.kind != "edge":
            raise ValueError(f"these effects are over {self.kind!r} sites, not edges; use .sites")
        return self.grid.sites

    @property
    def n_examples(self) -> int:
        return self.clean.shape[0]

    @property
    def clean_metric(self) -> float:
        return float(self.clean.mean())

    @property
    def corrupt_metric(self) -> float:
        return float(self.corrupt.mean())

    @property
    def base(self) -> Float[Tensor, " example"]:
        """Per-example metric of the run the intervention acted on."""
        return self.corrupt if self.base_run == "corrupt" else self.clean

    # Derived values -----------------------------------------------------------------------------
    @property
    def normalized(self) -> Float[Tensor, "*grid"]:
        """(patched - corrupted) / (clean - corrupted): 1 = the clean behaviour, 0 = the corrupted one, under
        every intervention (`normalize`)."""
        return normalize(self.values, self.clean, self.corrupt, f"task {self.meta.get('task', '?')!r}")

    @property
    def effect(self) -> Float[Tensor, "*grid"]:
        """Change of the metric caused by the intervention: patched - unpatched base run."""
        return self.values - self.base.mean()

    @property
    def stderr(self) -> Float[Tensor, "*grid"]:
        """Standard error of the mean over examples (0 for a single example)."""
        n = self.n_examples
        if n < 2:
            return torch.zeros_like(self.values)
        return self.per_example.std(-1) / n ** 0.5

    def ci(self, level: float = 0.95, n_boot: int = 2000, seed: int = 0) -> tuple[Tensor, Tensor]:
        """Percentile bootstrap interval of the mean patched metric, resampling examples (seeded)."""
        generator = torch.Generator().manual_seed(seed)
        n = self.n_examples
        idx = torch.randint(0, n, (n_boot, n), generator=generator)  # (boot, n)
        flat = self.per_example.reshape(-1, n).double()
        means = flat[:, idx].mean(-1)  # (cells, boot)
        q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
        lo, hi = torch.quantile(means, q, dim=-1)
        return lo.reshape(self.values.shape).to(self.values.dtype), hi.reshape(self.values.shape).to(self.values.dtype)

    @property
    def pvalues(self) -> Float[Tensor, "*grid"]:
        """Two-sided paired t-test per cell: does the intervention change the metric on average?"""
        diff = (self.per_example - self.base).reshape(-1, self.n_examples).double().numpy()
        with np.errstate(all="ignore"):
            p = stats.ttest_1samp(diff, 0.0, axis=-1).pvalue
        # A cell with no variation is significant iff its mean moved.
        flat_mean = np.abs(diff.mean(-1))
        p = np.where(np.isnan(p), np.where(flat_mean > 1e-9, 0.0, 1.0), p)
        return torch.from_numpy(p).reshape(self.values.shape).float()

    def significant(self, alpha: float = 0.05) -> Bool[Tensor, "*grid"]:
        """Cells whose effect survives Benjamini-Hochberg correction across the whole grid."""
        return benjamini_hochberg(self.pvalues, alpha)

    def top(self, k: int = 10, by: str = "effect") -> list[tuple[Site, float]]:
        """The k sites with the largest |effect| (or |normalized|, or |values| with by="values")."""
        table = {"effect": lambda: self.effect, "normalized": lambda: self.normalized, "values": lambda: self.values}
        if by not in table:
            raise ValueError(f"top(by={by!r}): valid: {', '.join(table)}")
        score = table[by]().flatten()
        order = score.abs().argsort(descending=True)[:k]
        return [(self.sites[int(i)], float(score[i])) for i in order]

    def _coordinates(self) -> dict[str, list]:
        if self.kind == "edge":
            return {"sender": [str(e.sender) for e in self.sites], "receiver": [str(e.receiver) for e in self.sites]}
        return {axis: [getattr(s, axis) for s in self.sites] for axis in ("layer", "pos", "head", "neuron")
                if any(getattr(s, axis) is not None for s in self.sites)}

    def to_dataframe(self):
        """One row per site: its coordinates, value, effect, normalized effect, stderr, CI, p and q."""
        import pandas as pd

        lo, hi = self.ci()
        rows = {
            "kind": [s.kind for s in self.sites],
            **self._coordinates(),
            "value": self.values.flatten().tolist(),
            "effect": self.effect.flatten().tolist(),
            "stderr": self.stderr.flatten().tolist(),
            "ci_low": lo.flatten().tolist(),
            "ci_high": hi.flatten().tolist(),
            "p": self.pvalues.flatten().tolist(),
            "significant": self.significant().flatten().tolist(),
        }
        if abs(self.clean_metric - self.corrupt_metric) > 1e-12:
            rows["normalized"] = self.normalized.flatten().tolist()
        return pd.DataFrame(rows)

    # Persistence --------------------------------------------------------------------------------
    def save(self, directory: str | Path, **meta: Any) -> Path:
        """Write this grid as `effects.safetensors` + `effects.json` (see `save_effects`)."""
        return save_effects(directory, [self], **meta)

    @classmethod
    def load(cls, directory: str | Path, kind: str | None = None) -> "Effects":
        """The grid of `kind` saved in `directory` (the only one if `kind` is None)."""
        grids = load_effects(directory)
        if kind is None and len(grids) == 1:
            return next(iter(grids.values()))
        if kind not in grids:
            raise KeyError(f"{directory} holds effects for kinds {', '.join(grids)}; pass kind= one of them")
        return grids[kind]


def _varying_positions(task: Any) -> list[int]:
    """Positions whose clean token is not the same in every example: a plot must not label them with
    example 0's token."""
    return (task.clean != task.clean[:1]).any(0).nonzero().flatten().tolist()


def save_effects(directory: str | Path, effects: list[Effects], **meta: Any) -> Path:
    """Save grids that share one task into `directory`.

    `effects.safetensors` holds per kind `<kind>` (mean metric under intervention, the grid's axes) and
    `<kind>.per_example` (example axis last), plus `clean` and `corrupt` per-example baselines.
    `effects.json` holds `meta` (e.g. model, task), the intervention, metric, baselines and per kind its
    axes, shape and sites.
    """
    if not effects:
        raise ValueError("save_effects needs at least one Effects")
    kinds = [e.kind for e in effects]
    if len(set(kinds)) != len(kinds):
        raise ValueError(f"save_effects: kinds must be distinct, got {kinds}")
    first = effects[0]
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {"clean": first.clean, "corrupt": first.corrupt}
    for e in effects:
        tensors[e.kind] = e.values
        tensors[f"{e.kind}.per_example"] = e.per_example
    header = {**first.meta, **meta, "intervention": first.intervention, "metric": first.metric,
              "clean_metric": first.clean_metric, "corrupt_metric": first.corrupt_metric,
              "n_examples": first.n_examples, "str_tokens": list(first.str_tokens), "kinds": {}}
    for e in effects:
        header["kinds"][e.kind] = {"axes": list(e.axes), "shape": list(e.grid.shape), "method": e.method,
                                   "base_run": e.base_run, "intervention": e.intervention,
                                   "intervention_args": e.intervention_args, "sites": [s.to_json() for s in e.sites]}
    # Each file appears whole; the header, which readers open first, is written last.
    write_safetensors(directory / "effects.safetensors",
                      {k: v.detach().contiguous().cpu().float() for k, v in tensors.items()})
    write_json(directory / "effects.json", header)
    return directory


def load_effects(directory: str | Path) -> dict[str, Effects]:
    """Every grid saved in `directory` by `save_effects`, by kind."""
    directory = Path(directory)
    for name in ("effects.json", "effects.safetensors"):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory / name} is missing; save effects there with Effects.save()")
    header = json.loads((directory / "effects.json").read_text())
    tensors = load_file(str(directory / "effects.safetensors"))
    kinds = header.pop("kinds")
    common = {k: header.pop(k) for k in ("intervention", "metric", "clean_metric", "corrupt_metric", "n_examples",
                                          "str_tokens")}
    out = {}
    for kind, spec in kinds.items():
        sites = tuple(unit_from_json(v) for v in spec["sites"])
        grid = Grid(kind=kind, axes=tuple(spec["axes"]), shape=tuple(spec["shape"]), sites=sites)
        out[kind] = Effects(values=tensors[kind], per_example=tensors[f"{kind}.per_example"],
                            clean=tensors["clean"], corrupt=tensors["corrupt"], grid=grid,
                            base_run=spec["base_run"], metric=common["metric"], intervention=spec["intervention"],
                            method=spec["method"], str_tokens=tuple(common["str_tokens"]), meta=header,
                            intervention_args=spec.get("intervention_args"))
    return out
