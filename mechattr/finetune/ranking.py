"""Rankings for budget curves: every head by exact patching and by AtP, every MLP neuron by AtP with AtP's
top neurons patched exactly, and the neuron budgets whose parameter counts match the head budgets'.

    rankings, neurons = rank_units(model, train.subset(slice(0, 32)), heads=(1, 4), exact_examples=8)
    curves = budget_curves(load, train, heldout, rankings, BudgetPlan(heads=(1, 4), neurons=neurons))
"""

from typing import Any, Sequence

from mechattr.attribution import attribute
from mechattr.effects import Effects
from mechattr.finetune.masks import n_trained
from mechattr.finetune.methods import TopSites
from mechattr.patching import patch
from mechattr.runs import unpatched
from mechattr.sites import grid
from mechattr.tasks import Task

__all__ = ["rank_units", "matched_neurons"]


def matched_neurons(model: Any, heads: Effects, neurons: Effects, budgets: Sequence[int]) -> tuple[int, ...]:
    """Neuron budgets whose parameter counts match those of the top-k `heads` at each head budget k."""
    per_neuron = n_trained(TopSites(neurons, k=1).build(model, 0, None).masks)
    counts = [n_trained(TopSites(heads, k=k).build(model, 0, None).masks) for k in budgets]
    return tuple(sorted({max(1, round(c / per_neuron)) for c in counts}))


def rank_units(model: Any, task: Task, heads: Sequence[int], neurons: bool = True, *,
               shortlist: int | None = None, exact_examples: int | None = None, progress: bool = False
               ) -> tuple[dict[str, dict[str, Effects]], tuple[int, ...]]:
    """The `rankings` of `budget_curves`, measured on `task`, and the neuron budgets matched to the head
    budgets `heads` (() without `neurons`).

    Every head is ranked by exact patching and by AtP. Every MLP neuron is ranked by AtP; exact patching
    of every neuron (~46k cells on SmolLM2) is too slow, so only AtP's top `shortlist` neurons (default:
    2 x the largest neuron budget) are patched exactly, and the exact neuron ranking chooses among them. A
    part run at fewer budgets than an earlier one (`BudgetCurves.combine`) must give the earlier part's
    shortlist, or its exact ranking may choose other neurons.

    Exact patching costs a forward per unit and example, AtP a few forwards per example in all:
    `exact_examples` patches only the first that many examples of `task` (None: all of them), while AtP
    ranks on every example (random sites, drawn from the grid, read no ranking).
    """
    if exact_examples is not None and exact_examples < 1:
        raise ValueError(f"rank_units: exact_examples is a positive number of examples or None (all), "
                         f"got {exact_examples}")
    z, runs = grid(model, "z"), unpatched(model, task)  # AtP's runs, and exact patching's unless fewer
    exact_runs = runs if exact_examples is None or exact_examples >= task.n_examples else \
        unpatched(model, task.subset(slice(0, exact_examples)))
    rankings = {"head": {"exact": patch(exact_runs, z, progress=progress), "atp": attribute(runs, z, "atp")}}
    if not neurons:
        return rankings, ()
    estimate = attribute(runs, grid(model, "neuron"), "atp")
    budgets = matched_neurons(model, rankings["head"]["exact"], estimate, heads)
    size = 2 * max(budgets) if shortlist is None else shortlist
    if size < max(budgets):
        raise ValueError(f"rank_units: a shortlist of {size} neurons cannot rank the largest neuron budget, "
                         f"{max(budgets)} (matched to {max(heads)} heads); give at least {max(budgets)}")
    chosen = [site for site, _ in estimate.top(size)]
    rankings["neuron"] = {"exact": patch(exact_runs, chosen, progress=progress), "atp": estimate}
    return rankings, budgets
