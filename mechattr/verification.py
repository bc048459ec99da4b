"""Estimate, then verify: exact patching of an attribution estimate's top sites and of a random sample
of the rest, the rank correlation between estimate and exact, and how many important sites the estimate
left out of its top (with a Clopper-Pearson interval).
"""

from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from mechattr.effects import Effects
from mechattr.interventions import Intervention
from mechattr.sites import Site
from mechattr.stats import clopper_pearson
from mechattr.tasks import Task

__all__ = ["Verification", "verify"]


@dataclass(frozen=True, eq=False)
class Verification:
    """An estimate checked by exact patching of its top sites and a random sample of the rest."""

    estimate: Effects  # the attribution estimate over all its sites
    exact: Effects  # exact patching of the checked sites: the top ones first, then the sample
    n_top: int  # checked because the estimate ranks them highest by |effect|
    n_rest: int  # sites outside the top, of which `exact` holds a uniform random sample
    threshold: float  # |normalized effect| above which a site counts as important
    spearman: float  # rank correlation of estimated and exact effects over the checked sites
    important_top: int  # important sites (by exact patching) among the top
    important_sample: int  # important sites among the random sample
    missed: float  # estimated important sites outside the top: the sample's rate times n_rest
    missed_ci: tuple[float, float]  # Clopper-Pearson interval of `missed`

    @property
    def checked(self) -> tuple[Site, ...]:
        return self.exact.sites

    @property
    def estimated_effect(self) -> Float[Tensor, " checked"]:
        """The estimate's effect at each checked site, in `exact`'s order."""
        where = {site: i for i, site in enumerate(self.estimate.sites)}
        return self.estimate.effect.flatten()[[where[s] for s in self.checked]]


def verify(model: Any, task: Task, estimate: Effects, top: int = 20, sample: int = 20, seed: int = 0, *,
           threshold: float = 0.1, level: float = 0.95, intervention: Intervention | None = None) -> Verification:
    """Exact patching of the `top` sites with the largest estimated |effect| and of `sample` sites drawn
    (seeded) from the rest; how well the estimate ranks them, and how many important sites
    (|exact effect| > `threshold` x |clean - corrupt|) it left out of its top, extrapolated from the sample.

    `intervention` defaults to the estimate's (by name); pass it for configured ones such as `Steer`.
    """
    from scipy import stats

    from mechattr.interventions import by_name
    from mechattr.patching import patch

    intervention = intervention or by_name(estimate.intervention)
    effect = estimate.effect.flatten()
    order = effect.abs().argsort(descending=True)
    top_idx, rest = order[:top], order[top:]
    generator = torch.Generator().manual_seed(seed)
    sample_idx = rest[torch.randperm(len(rest), generator=generator)[:sample]]
    checked = [estimate.sites[int(i)] for i in torch.cat([top_idx, sample_idx])]
    # Resuming at block 0 would skip the embedding, so embed sites need full forwards.
    exact = patch(model, task, checked, intervention, resume=not any(s.kind == "embed" for s in checked))
    gap = abs(exact.clean_metric - exact.corrupt_metric)
    important = exact.effect.abs() > threshold * gap
    n_top, n_sample = len(top_idx), len(sample_idx)
    hits = int(important[n_top:].sum())
    low, high = clopper_pearson(hits, n_sample, level)
    rate = hits / n_sample if n_sample else 0.0
    if n_sample == len(rest):  # the whole rest was checked: the count is exact
        low = high = rate
    rho = float(stats.spearmanr(effect[torch.cat([top_idx, sample_idx])], exact.effect)[0]) if len(checked) > 1 \
        else float("nan")
    return Verification(estimate=estimate, exact=exact, n_top=n_top, n_rest=len(rest), threshold=threshold,
                        spearman=rho, important_top=int(important[:n_top].sum()), important_sample=hits,
                        missed=rate * len(rest), missed_ci=(low * len(rest), high * len(rest)))
