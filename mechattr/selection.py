"""Selecting the sites that matter from one or more `Effects`.

`select` ranks cells by |effect| and keeps the top k, those above an absolute threshold, or the smallest
set holding a given share of the total |effect|. Every cell is eligible by default: with the few examples
patching usually runs on, a large effect can miss Benjamini-Hochberg significance, and a filter on by
default would drop the largest sites without a word. `significant_only=True` keeps only the cells that
survive the correction (jointly across all the grids given), and the result names the larger sites it
dropped. The result is a `SiteSet`; `SiteSet.describe()` says what was selected and by which rule.
"""

from dataclasses import dataclass, field
from typing import Iterable, Iterator, Sequence

import torch
from torch import Tensor

from mechattr.effects import Effects
from mechattr.stats import benjamini_hochberg
from mechattr.sites import Site

__all__ = ["SiteSet", "select"]


@dataclass(frozen=True)
class SiteSet:
    """A frozen set of sites, ordered by decreasing |score|, each with the score it was selected by."""

    sites: tuple[Site, ...] = ()
    scores: tuple[float | None, ...] = ()  # one per site; None when a site was given without a score
    # How the sites were chosen, and the larger sites a significance filter left out, with their scores;
    # neither is part of the set's value.
    rule: str = field(default="", compare=False)
    dropped: tuple[tuple[Site, float], ...] = field(default=(), compare=False)

    def __post_init__(self):
        if len(self.sites) != len(self.scores):
            raise ValueError(f"SiteSet has {len(self.sites)} sites but {len(self.scores)} scores")
        if len(set(self.sites)) != len(self.sites):
            raise ValueError("SiteSet sites must be distinct")

    @classmethod
    def of(cls, sites: Iterable[Site]) -> "SiteSet":
        """Sites without scores (e.g. a hand-picked or random set), in the order given."""
        unique = tuple(dict.fromkeys(sites))
        return cls(unique, (None,) * len(unique))

    def __iter__(self) -> Iterator[Site]:
        return iter(self.sites)

    def __len__(self) -> int:
        return len(self.sites)

    def __contains__(self, site: object) -> bool:
        return site in self.sites

    def __or__(self, other: "SiteSet") -> "SiteSet":
        """Union; a site in both keeps the score of larger magnitude."""
        merged = dict(zip(self.sites, self.scores))
        for site, score in zip(other.sites, other.scores):
            if site not in merged or _magnitude(score) > _magnitude(merged[site]):
                merged[site] = score
        return _ranked(merged)

    def score(self, site: Site) -> float | None:
        if site not in self.sites:
            raise KeyError(f"site {site} is not in this SiteSet")
        return self.scores[self.sites.index(site)]

    def to_json(self) -> list[list]:
        """[[kind, layer, pos, head, neuron, score], ...]."""
        return [[*s.to_json(), score] for s, score in zip(self.sites, self.scores)]

    @classmethod
    def from_json(cls, rows: Sequence[Sequence]) -> "SiteSet":
        sites = tuple(Site.from_json(row[:-1]) for row in rows)
        return cls(sites, tuple(None if row[5] is None else float(row[5]) for row in rows))

    def __str__(self) -> str:
        return "{" + ", ".join(str(s) for s in self.sites) + "}"

    def describe(self) -> str:
        """What was selected, one site and score a line, by which rule, and what the filter dropped."""
        lines = [f"{len(self)} site{'s' if len(self) != 1 else ''}" + (f", {self.rule}" if self.rule else "") + ":"]
        lines += [f"  {site}  " + ("(no score)" if score is None else f"{score:+.4g}")
                  for site, score in zip(self.sites, self.scores)]
        if self.dropped:
            lines.append(f"not significant, so left out although larger: {len(self.dropped)} site"
                         f"{'s' if len(self.dropped) != 1 else ''}: "
                         + ", ".join(f"{site} {score:+.4g}" for site, score in self.dropped))
        return "\n".join(lines)


def _magnitude(score: float | None) -> float:
    return -1.0 if score is None else abs(score)


def _ranked(scores: dict[Site, float | None]) -> SiteSet:
    # Stable sort: ties keep the order in which the cells were first seen (grid order); unscored last.
    order = sorted(scores, key=lambda s: -_magnitude(scores[s]))
    return SiteSet(tuple(order), tuple(scores[s] for s in order))


def select(effects: Effects | Sequence[Effects], top_k: int | None = None, threshold: float | None = None,
           mass: float | None = None, significant_only: bool = False, alpha: float = 0.05) -> SiteSet:
    """The sites to train, ranked by |effect| (patched minus unpatched metric).

    Exactly one rule: `top_k` sites, sites with |effect| >= `threshold`, or the smallest set whose
    |effect| sums to at least `mass` (a share in (0, 1]) of the total |effect| of the eligible cells.
    With `significant_only`, only cells significant at false discovery rate `alpha` are eligible
    (Benjamini-Hochberg across every cell of every grid given), and the result's `dropped` names the
    ineligible sites larger than the smallest selected one. A site in several grids keeps its largest |effect|.
    """
    rules = {"top_k": top_k, "threshold": threshold, "mass": mass}
    given = [name for name, value in rules.items() if value is not None]
    if len(given) != 1:
        raise ValueError(f"select needs exactly one of top_k, threshold, mass; got {given or 'none'}")
    if top_k is not None and top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    if mass is not None and not 0 < mass <= 1:
        raise ValueError(f"mass is a share of the total |effect| in (0, 1], got {mass}")
    grids = [effects] if isinstance(effects, Effects) else list(effects)
    if not grids:
        raise ValueError("select needs at least one Effects")
    sites = [s for e in grids for s in e.sites]
    score = torch.cat([e.effect.flatten() for e in grids]).double()
    everything = _best(sites, score, torch.ones_like(score, dtype=torch.bool))
    rule = (f"the top {top_k} by |effect|" if top_k is not None else f"|effect| >= {threshold:g}"
            if threshold is not None else f"the fewest holding {mass:g} of the total |effect|")
    if not significant_only:
        return _kept(everything, top_k, threshold, mass, f"{rule} (every cell eligible)")
    eligible = benjamini_hochberg(torch.cat([e.pvalues.flatten() for e in grids]), alpha)
    chosen = _kept(_best(sites, score, eligible), top_k, threshold, mass,
                   f"{rule} among the cells significant at Benjamini-Hochberg FDR {alpha:g}")
    # The larger sites the filter left out: above the smallest selected |effect|, or, when nothing was
    # selected, those the same rule would have taken without the filter.
    floor = min((abs(s) for s in chosen.scores), default=None)
    unfiltered = _kept(everything, top_k, threshold, mass, rule)
    dropped = tuple((site, value) for site, value in zip(everything.sites, everything.scores)
                    if site not in chosen and (abs(value) > floor if floor is not None else site in unfiltered))
    return SiteSet(chosen.sites, chosen.scores, chosen.rule, dropped)


def _best(sites: list[Site], score: Tensor, eligible: Tensor) -> SiteSet:
    """The eligible cells ranked by |score|; a site in several grids keeps its largest |score|."""
    best: dict[Site, float] = {}
    for i in eligible.nonzero().flatten().tolist():
        if sites[i] not in best or abs(score[i]) > abs(best[sites[i]]):
            best[sites[i]] = float(score[i])
    return _ranked(best)


def _kept(ranked: SiteSet, top_k: int | None, threshold: float | None, mass: float | None, rule: str) -> SiteSet:
    """The prefix of `ranked` that the one given rule keeps."""
    if top_k is not None:
        keep = top_k
    elif threshold is not None:
        keep = sum(abs(s) >= threshold for s in ranked.scores)
    else:
        cumulative = torch.tensor([abs(s) for s in ranked.scores], dtype=torch.float64).cumsum(0)
        if not len(cumulative) or cumulative[-1] == 0:
            keep = 0
        else:
            # The first prefix reaching the share; the tolerance keeps mass=1.0 from missing by rounding.
            keep = int((cumulative < mass * cumulative[-1] * (1 - 1e-12)).sum()) + 1
    return SiteSet(ranked.sites[:keep], ranked.scores[:keep], rule)
