"""Estimate, then verify: exact patching of an attribution estimate's top sites and of a stratified sample
of the rest; how many important sites the estimate ranked below its top (an exact interval), the sites
where estimate and exact patching disagree most, and their rank correlation.

The rest (every site below the top, by |estimate|) is cut into strata of estimated rank whose sizes grow
geometrically, so the ranks just below the top, where an estimate's misses usually sit, are checked
densely and the long tail still gets draws. Stratum h of N_h sites with x_h important among n_h checked
contributes N_h x_h / n_h to the estimate of missed sites, and an exact hypergeometric interval for its
count (sampling without replacement) at level 1 - (1 - level) / K, K the strata not checked completely;
the sum of those intervals holds the total with probability at least `level` (Bonferroni).
"""

import math
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from mechattr.effects import Effects
from mechattr.graph import Edge
from mechattr.interventions import Intervention
from mechattr.runs import Runs, setup
from mechattr.sites import Site
from mechattr.tasks import Task

__all__ = ["Verification", "Stratum", "verify"]


@dataclass(frozen=True)
class Stratum:
    """Estimated ranks `start`..`stop` - 1 of the rest (0 = the first site below the top)."""

    start: int
    stop: int
    checked: int  # sites of the stratum patched exactly (drawn without replacement)
    important: int  # important sites among them

    @property
    def size(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True, eq=False)
class Verification:
    """An estimate checked by exact patching of its top sites and a stratified sample of the rest."""

    estimate: Effects  # the attribution estimate over all its sites
    exact: Effects  # exact patching of the checked sites: the top ones first, then the sample by stratum
    ranks: tuple[int, ...]  # each checked site's rank by |estimate| (0 = largest)
    n_top: int  # checked because the estimate ranks them highest by |effect|
    n_rest: int  # sites below the top
    strata: tuple[Stratum, ...]  # how the rest was sampled
    threshold: float  # |exact effect| / |clean - corrupt| above which a site counts as important
    level: float  # coverage of `missed_ci`
    spearman: float  # rank correlation of estimated and exact effects over the checked sites
    important_top: int  # important sites (by exact patching) among the top
    important_sample: int  # important sites among the sample of the rest
    missed: float  # estimated important sites below the top (NaN when a stratum went unchecked)
    missed_ci: tuple[float, float]  # interval of `missed` at `level`

    @property
    def checked(self) -> tuple[Site, ...] | tuple[Edge, ...]:
        return self.exact.sites

    @property
    def estimated_effect(self) -> Float[Tensor, " checked"]:
        """The estimate's effect at each checked site, in `exact`'s order."""
        return self.estimate.effect.flatten()[_order(self.estimate)[list(self.ranks)]]

    @property
    def important(self) -> Bool[Tensor, " checked"]:
        """Whether each checked site is important by exact patching."""
        return self.exact.effect.flatten().abs() > self.threshold * _gap(self.exact)

    def disagreements(self, k: int = 5) -> list[tuple[Site | Edge, float, float, int]]:
        """The `k` checked sites with the largest |exact - estimate|: (site, estimate, exact, estimated rank)."""
        est, exact = self.estimated_effect, self.exact.effect.flatten()
        order = (exact - est).abs().argsort(descending=True)[:k]
        return [(self.checked[i], float(est[i]), float(exact[i]), self.ranks[i]) for i in order.tolist()]

    def misses(self) -> list[tuple[Site | Edge, float, float, int]]:
        """Important sites found below the top: (site, estimate, exact, estimated rank)."""
        est, exact, important = self.estimated_effect, self.exact.effect.flatten(), self.important
        return [(self.checked[i], float(est[i]), float(exact[i]), self.ranks[i])
                for i in range(self.n_top, len(self.checked)) if important[i]]

    def summary(self, k: int = 5) -> str:
        """The verdict, interval first: missed important sites, what was checked, the worst disagreements."""
        low, high = self.missed_ci
        n_sample = len(self.checked) - self.n_top
        point = "unknown" if math.isnan(self.missed) else f"{self.missed:.1f}"
        lines = [f"missed important sites: {low:.0f} to {high:.0f} of the {self.n_rest} ranked below the top "
                 f"{self.n_top} ({100 * self.level:g}% interval; estimate {point}), from exact patching of "
                 f"{len(self.checked)} of {len(self.estimate.sites)} sites: the top {self.n_top} and {n_sample} "
                 f"drawn from {len(self.strata)} strata of estimated rank",
                 f"important: |exact effect| > {self.threshold:g} x |clean - corrupt| = "
                 f"{self.threshold * _gap(self.exact):.3g}; {self.important_top} of the top {self.n_top}, "
                 f"{self.important_sample} of the {n_sample} drawn"]
        found = self.misses()
        if found:
            lines.append("important sites the estimate ranked below its top: "
                         + "; ".join(_site_line(*m) for m in found))
        lines.append(f"largest |exact - {self.estimate.method}|: "
                     + "; ".join(_site_line(*d) for d in self.disagreements(k)))
        lines.append(f"Spearman {self.spearman:.3f} over the checked sites (weighted to the top, not the whole grid)")
        return "\n".join(lines)


def _site_line(site: Site | Edge, estimate: float, exact: float, rank: int) -> str:
    return f"{site} exact {exact:.3g}, estimate {estimate:.3g} (rank {rank + 1})"


def _order(effects: Effects) -> Tensor:
    return effects.effect.flatten().abs().argsort(descending=True, stable=True)


def _gap(effects: Effects) -> float:
    return abs(effects.clean_metric - effects.corrupt_metric)


def _strata_edges(n_rest: int, n_strata: int) -> list[int]:
    """0 = e_0 < e_1 < ... = n_rest with e_j ~ n_rest^(j / n_strata): sizes grow geometrically with rank."""
    if n_rest == 0 or n_strata == 0:
        return [0, n_rest] if n_rest else [0]
    edges = {0, n_rest} | {max(1, round(n_rest ** (j / n_strata))) for j in range(1, n_strata)}
    return sorted(edges)


def _allocate(sizes: list[int], sample: int) -> list[int]:
    """`sample` draws shared equally among strata (one at a time, in rank order), none above its size."""
    counts = [0] * len(sizes)
    while sample > 0 and any(c < s for c, s in zip(counts, sizes)):
        for h, size in enumerate(sizes):
            if sample > 0 and counts[h] < size:
                counts[h] += 1
                sample -= 1
    return counts


def count_interval(hits: int, checked: int, size: int, level: float) -> tuple[int, int]:
    """Exact equal-tailed interval of the number of important sites in a population of `size` of which
    `checked`, drawn without replacement, held `hits` (hypergeometric; [0, size] when none was checked)."""
    from scipy.stats import hypergeom

    if not 0 <= hits <= checked <= size:
        raise ValueError(f"need 0 <= hits <= checked <= size, got hits={hits}, checked={checked}, size={size}")
    if checked == size:
        return hits, hits
    tail = (1 - level) / 2
    counts = torch.arange(hits, hits + size - checked + 1).numpy()  # the counts this sample allows
    at_least = hypergeom.sf(hits - 1, size, counts, checked)  # P(X >= hits | count)
    at_most = hypergeom.cdf(hits, size, counts, checked)  # P(X <= hits | count)
    return int(counts[at_least >= tail].min()), int(counts[at_most >= tail].max())


def stratified_count(strata: list[Stratum], level: float) -> tuple[float, tuple[float, float]]:
    """Estimated important sites over all strata (sum of N_h x_h / n_h) and a Bonferroni-combined
    interval at `level`; the estimate is NaN when a non-empty stratum was not checked."""
    uncertain = [s for s in strata if 0 < s.checked < s.size]
    stratum_level = 1 - (1 - level) / max(1, len(uncertain))
    bounds = [count_interval(s.important, s.checked, s.size, stratum_level) for s in strata]
    estimate = sum(s.size * s.important / s.checked if s.checked else (math.nan if s.size else 0.0) for s in strata)
    return estimate, (float(sum(b[0] for b in bounds)), float(sum(b[1] for b in bounds)))


def _intervention_of(estimate: Any) -> Intervention:
    if not isinstance(estimate, Effects):
        raise TypeError(f"verify(model, task, estimate): the estimate must be Effects, got {type(estimate).__name__}")
    applied = estimate.applied
    if applied is None:
        raise ValueError(f"verify: the estimate's intervention {estimate.intervention!r} is not known "
                         "with its arguments (a Steer vector is not saved with effects); pass it as intervention=")
    return applied


def verify(model: Any, task: Task | Effects | None = None, estimate: Effects | None = None, top: int = 20,
           sample: int = 40, seed: int = 0, *, strata: int = 4, threshold: float = 0.1, level: float = 0.95,
           intervention: Intervention | None = None) -> Verification:
    """Exact patching of the `top` sites (or edges) with the largest estimated |effect| and of `sample` drawn
    (seeded, without replacement) from `strata` strata of the rest by estimated rank; how many important
    sites (|exact effect| > `threshold` x |clean - corrupt|) the estimate ranked below its top, with an
    interval at `level`, and where estimate and exact disagree.

    `verify(model, task, estimate)`: `intervention` defaults to the estimate's own (`Effects.applied`,
    arguments included); pass it where that is not known (a `Steer` estimate loaded from disk).
    `verify(runs, estimate)`: on the unpatched runs the estimate came from, whose intervention must be its.
    """
    from scipy import stats

    from mechattr.edges import patch_edges
    from mechattr.patching import patch

    runs: Runs
    shared = isinstance(model, Runs)
    runs, estimate = setup(model, task, estimate, intervention or (None if shared else _intervention_of(estimate)),
                           "verify")
    mismatched = estimate.intervention != runs.intervention.name or estimate.applied not in (None, runs.intervention)
    if shared and mismatched:
        raise ValueError(f"verify: the estimate is under {estimate.applied or estimate.intervention!r} but the runs "
                         f"under {runs.intervention!r}; check it on runs of its own intervention")
    if top < 0 or sample < 0 or strata < 1:
        raise ValueError(f"verify needs top >= 0, sample >= 0 and strata >= 1; got top={top}, sample={sample}, "
                         f"strata={strata}")
    order = _order(estimate)
    n_top = min(top, len(order))
    n_rest = len(order) - n_top
    edges = _strata_edges(n_rest, min(strata, sample))
    sizes = [b - a for a, b in zip(edges, edges[1:])]
    generator = torch.Generator().manual_seed(seed)
    ranks = list(range(n_top))
    for (start, stop), count in zip(zip(edges, edges[1:]), _allocate(sizes, sample)):
        drawn = torch.randperm(stop - start, generator=generator)[:count].sort().values
        ranks += [n_top + start + int(r) for r in drawn]
    if not ranks:
        raise ValueError(f"verify has nothing to check: top={top}, sample={sample}")
    checked = [estimate.sites[int(order[r])] for r in ranks]
    if isinstance(checked[0], Edge):
        exact = patch_edges(runs, checked)
    else:  # an embed site's cell runs a full forward; the others resume (`Site.resume_layer`)
        exact = patch(runs, checked)
    important = exact.effect.abs() > threshold * _gap(exact)
    rest_ranks = torch.tensor(ranks[n_top:], dtype=torch.long) - n_top
    found = important[n_top:]
    layout = [Stratum(a, b, int(((rest_ranks >= a) & (rest_ranks < b)).sum()),
                      int(found[(rest_ranks >= a) & (rest_ranks < b)].sum())) for a, b in zip(edges, edges[1:])]
    missed, missed_ci = stratified_count(layout, level)
    est = estimate.effect.flatten()[order[ranks]]
    rho = float(stats.spearmanr(est, exact.effect)[0]) if len(checked) > 1 else float("nan")
    return Verification(estimate=estimate, exact=exact, ranks=tuple(ranks), n_top=n_top, n_rest=n_rest,
                        strata=tuple(layout), threshold=threshold, level=level, spearman=rho,
                        important_top=int(important[:n_top].sum()), important_sample=int(found.sum()),
                        missed=missed, missed_ci=missed_ci)
