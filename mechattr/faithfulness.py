"""Faithfulness of a ranking the way the Mechanistic Interpretability Benchmark measures it (MIB, Mueller
et al. 2025, arXiv 2504.13151), with intervals.

A ranking of N components (the sites or edges of an `Effects`: exact patching or any estimate) gives
the circuits made of its top 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50 and 100 %: int(share x N) components,
as MIB counts them (so small shares of a small model are the empty circuit). Each circuit is run on the
ablation's base run with every other ranked component ablated (`Noise`: set to its corrupted value;
`Mean`: to its mean), and

    f(C) = (m(C) - m(empty)) / (m(full) - m(empty)),

m the task metric averaged over examples, m(full) the base run and m(empty) the run with every ranked
component ablated (measured, not assumed: without the embedding among the components, or under `Mean`,
it is not the corrupted run). Two areas by the trapezoid rule over the shares (MIB's linear scale)
summarise the curves:

- CPR, the area under f, the components ranked by their signed contribution to the base run's metric
  (higher is better; MIB's "circuit performance ratio");
- CMD, the area under |1 - f|, the components ranked by |score| (0 is best; "circuit-model distance").

A component's contribution is what ablating it costs the base run: -effect for an estimate of an
ablation (`Noise`: base run clean), +effect for one of restoring it (`Denoise`: base run corrupted).
Intervals are percentile bootstraps over examples with the rankings fixed; the floor is `random`
seeded random rankings of the same components, their mean curve and their areas' mean and spread.
"""

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from mechattr.ablation import EdgeAblator, NodeAblator
from mechattr.effects import Effects
from mechattr.graph import Edge
from mechattr.interventions import Intervention, Noise

__all__ = ["Faithfulness", "faithfulness", "areas", "MIB_SHARES"]

MIB_SHARES = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


@dataclass(frozen=True, eq=False)
class Faithfulness:
    """MIB faithfulness curves of one ranking, their areas with bootstrap intervals, and the random floor."""

    shares: tuple[float, ...]  # of the ranked components kept
    sizes: tuple[int, ...]  # components kept at each share: int(share x N)
    cpr_curve: tuple[float, ...]  # f, components ranked by signed contribution
    cmd_curve: tuple[float, ...]  # f, components ranked by |score|
    cpr: float  # area under cpr_curve
    cpr_ci: tuple[float, float]
    cmd: float  # area under |1 - cmd_curve|
    cmd_ci: tuple[float, float]
    random_curve: tuple[float, ...]  # mean f over the random rankings
    random_cpr: tuple[float, float]  # mean and sd over the random rankings
    random_cmd: tuple[float, float]
    full_metric: float  # m(full): the base run
    empty_metric: float  # m(empty): every ranked component ablated
    meta: dict[str, Any] = field(default_factory=dict)  # method, ablation, components, units, examples, ...

    def to_markdown(self) -> str:
        m = self.meta
        lines = [f"MIB faithfulness of the {m.get('method')} ranking of {m.get('components')} {m.get('units')}s "
                 f"({m.get('ablation')} ablation, {m.get('examples')} examples; {int(100 * m.get('level_ci', 0.95))}% "
                 f"bootstrap intervals, floor: {m.get('random')} random rankings, mean ± sd)", "",
                 f"| | {m.get('method')} | random |", "|---|---|---|",
                 f"| CPR (higher is better) | {self.cpr:.3f} [{self.cpr_ci[0]:.3f}, {self.cpr_ci[1]:.3f}] | "
                 f"{self.random_cpr[0]:.3f} ± {self.random_cpr[1]:.3f} |",
                 f"| CMD (0 is best) | {self.cmd:.3f} [{self.cmd_ci[0]:.3f}, {self.cmd_ci[1]:.3f}] | "
                 f"{self.random_cmd[0]:.3f} ± {self.random_cmd[1]:.3f} |", "",
                 "| share | kept | f (signed) | f (abs) | f (random) |", "|---|---|---|---|---|"]
        lines += [f"| {s:g} | {k} | {a:.3f} | {b:.3f} | {r:.3f} |" for s, k, a, b, r in
                  zip(self.shares, self.sizes, self.cpr_curve, self.cmd_curve, self.random_curve)]
        return "\n".join(lines) + "\n"


def areas(shares: Sequence[float], f: Float[np.ndarray, "*rows share"]
          ) -> tuple[Float[np.ndarray, "*rows"], Float[np.ndarray, "*rows"]]:
    """(area under f, area under |1 - f|) by the trapezoid rule over `shares`, per row of `f`."""
    x = np.asarray(shares, dtype=np.float64)
    width = np.diff(x)
    under = ((f[..., 1:] + f[..., :-1]) / 2 * width).sum(-1)
    off = ((np.abs(1 - f[..., 1:]) + np.abs(1 - f[..., :-1])) / 2 * width).sum(-1)
    return np.asarray(under), np.asarray(off)


def _contribution(scores: Effects) -> Tensor:
    """What ablating each component costs the base run's metric, from the ranking's effects (module doc)."""
    effect = scores.effect.flatten()
    return effect if scores.base_run == "corrupt" else -effect


def _units(units: list) -> str:
    """"edge" or "node": what the ranking ranks (one or the other)."""
    edges = sum(isinstance(u, Edge) for u in units)
    if 0 < edges < len(units):
        raise ValueError("faithfulness: the ranking mixes nodes and edges; rank one or the other")
    return "edge" if edges else "node"


def faithfulness(model: Any, task: Any, scores: Effects, ablation: Intervention = Noise(), *,
                 shares: Sequence[float] = MIB_SHARES, random: int = 5, bootstrap: int = 1000,
                 level: float = 0.95, seed: int = 0, ablator: Any = None) -> Faithfulness:
    """MIB faithfulness of the ranking in `scores` (any `Effects` over nodes or edges) on `task`, every
    component outside a circuit set by `ablation` (see the module docstring). Costs one ablated run
    per distinct circuit: about 2 + (2 + `random`) x len(shares) - the circuits that coincide.
    `ablator`: a `NodeAblator` or `EdgeAblator` of this ablation over exactly `scores.sites`, to share
    its unpatched runs (`discover` passes its own)."""
    shares = tuple(float(s) for s in shares)
    if not shares or list(shares) != sorted(set(shares)) or shares[0] <= 0 or shares[-1] > 1:
        raise ValueError(f"faithfulness: shares must increase strictly within (0, 1], got {shares}")
    if random < 1 or bootstrap < 1:
        raise ValueError(f"faithfulness needs random >= 1 and bootstrap >= 1, got {random} and {bootstrap}")
    units = list(scores.sites)
    n_units = len(units)
    kind = _units(units)
    evaluate = ablator or (EdgeAblator(model, task, ablation, units) if kind == "edge" else
                           NodeAblator(model, task, units, ablation))
    sizes = tuple(int(s * n_units) for s in shares)
    contribution = _contribution(scores)
    orders = [contribution.argsort(descending=True, stable=True),
              contribution.abs().argsort(descending=True, stable=True)]
    generator = torch.Generator().manual_seed(seed)
    orders += [torch.randperm(n_units, generator=generator) for _ in range(random)]
    # Every circuit once: rankings share the empty and the full circuit, and often their first ones.
    circuits = {frozenset(): 0, frozenset(range(n_units)): 1}
    index = [[circuits.setdefault(frozenset(order[:k].tolist()), len(circuits)) for k in sizes] for order in orders]
    ordered = sorted(circuits, key=circuits.get)
    metric = evaluate([{units[i] for i in c} for c in ordered]).float().cpu().numpy()  # (circuits, n)
    empty, full = metric[0], metric[1]
    per_curve = metric[np.asarray(index)]  # (rankings, sizes, n)

    def curves(rows):  # example indices (draws, n) -> f (draws, rankings, sizes)
        e, u = empty[rows].mean(-1), full[rows].mean(-1)
        gap = (u - e)[:, None, None]
        return (per_curve[:, :, rows].mean(-1).transpose(2, 0, 1) - e[:, None, None]) / gap

    n = metric.shape[1]
    if abs(float(full.mean() - empty.mean())) < 1e-12:
        raise ValueError(f"faithfulness on task {task.name!r}: the full and the empty circuit score the same "
                         f"({float(full.mean()):.6g}), so f is undefined")
    f = curves(np.arange(n)[None])[0]  # (rankings, sizes)
    under, off = areas(shares, f)
    draws = np.random.default_rng(seed).integers(0, n, (bootstrap, n))
    with np.errstate(divide="ignore", invalid="ignore"):
        boot_under, boot_off = areas(shares, curves(draws)[:, :2])  # (draws, 2)
    tail = 100 * (1 - level) / 2
    interval = lambda values: tuple(float(v) for v in np.nanpercentile(values, [tail, 100 - tail]))  # noqa: E731
    floor_under, floor_off = under[2:], off[2:]
    spread = lambda values: (float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0)  # noqa: E731
    return Faithfulness(shares=shares, sizes=sizes, cpr_curve=tuple(f[0].tolist()), cmd_curve=tuple(f[1].tolist()),
                        cpr=float(under[0]), cpr_ci=interval(boot_under[:, 0]), cmd=float(off[1]),
                        cmd_ci=interval(boot_off[:, 1]), random_curve=tuple(f[2:].mean(0).tolist()),
                        random_cpr=spread(floor_under), random_cmd=spread(floor_off),
                        full_metric=float(full.mean()), empty_metric=float(empty.mean()),
                        meta={"method": scores.method, "ablation": ablation.name, "components": n_units,
                              "units": kind, "examples": n, "random": random, "bootstrap": bootstrap,
                              "level_ci": level, "seed": seed, "task": task.name, "circuits_run": len(ordered)})
