"""Budget curves on the small native model: every method at every budget, matched parameter counts,
paired statistics, verdicts and the saved form."""

from dataclasses import replace

import numpy as np
import pytest
import torch

import mechattr
from mechattr.finetune import Text, TrainConfig, masks, n_trained
from mechattr.finetune.budgets import BudgetCurves, BudgetPlan, budget_curves
from mechattr.finetune.ranking import matched_neurons, rank_units
from mechattr.finetune.evaluation import per_example
from mechattr.stats import bootstrap_paired
from tests.bridges import answered_task


@pytest.fixture(scope="module")
def curves():
    model = mechattr.native_model()
    task = answered_task(0)
    rankings = {"head": {"exact": mechattr.patch(model, task, mechattr.grid(model, "z"), progress=False),
                         "atp": mechattr.attribute(model, task, mechattr.grid(model, "z"), "atp")},
                "neuron": {"exact": mechattr.patch(model, task, mechattr.grid(model, "neuron"), progress=False),
                           "atp": mechattr.attribute(model, task, mechattr.grid(model, "neuron"), "atp")}}
    return model, rankings, _curves(rankings, PLAN)


PLAN = BudgetPlan(heads=(1, 2), seeds=(0, 1), draws=2, config=TrainConfig(steps=3, lr=1e-2, batch_size=6),
                  lora_targets=("q", "v"))


def _curves(rankings: dict, plan: BudgetPlan) -> BudgetCurves:
    text = Text(torch.randint(0, 50, (3, 10), generator=torch.Generator().manual_seed(9)), name="noise")
    return budget_curves(mechattr.native_model, answered_task(0), answered_task(1), rankings, plan,
                         others=[answered_task(2)], text=text, progress=False)


def test_every_method_runs_at_every_budget_with_matched_parameters(curves):
    model, rankings, result = curves
    per_head = n_trained(masks(model, [mechattr.Site("z", 0, head=0)]))
    per_neuron = n_trained(masks(model, [mechattr.Site("neuron", 0, neuron=0)]))
    neurons = result.meta["budgets"]["neuron"]
    # Neuron budgets match the exact head budgets' parameter counts.
    assert list(neurons) == sorted({round(n_trained(masks(model, list(rankings["head"]["exact"].top(k)[i][0]
                                                                      for i in range(k))))
                                          / per_neuron) for k in (1, 2)})
    for kind, budgets, unit in (("head", (1, 2), per_head), ("neuron", neurons, per_neuron)):
        for budget in budgets:
            rows = {(r["method"], r["seed"], r["draw"]): r for r in result.rows
                    if (r["kind"], r["budget"]) == (kind, budget)}
            assert {m for m, _, _ in rows} == {"exact", "atp", "random", "bottom-k", "lora"}
            assert sum(1 for m, _, _ in rows if m == "random") == 2 * 2  # seeds x draws
            for seed in (0, 1):
                target = rows[("exact", seed, 0)]["n_trained"]
                assert len(rows[("exact", seed, 0)]["sites"]) == budget
                for draw in (0, 1):  # random draws hit the budget to within half a unit
                    assert abs(rows[("random", seed, draw)]["n_trained"] - target) <= unit / 2 + 1
                assert rows[("random", seed, 0)]["sites"] != rows[("random", seed, 1)]["sites"]
    full = [r for r in result.rows if r["method"] == "full"]
    assert len(full) == 2 and full[0]["n_trained"] == sum(p.numel() for p in model.parameters())
    # A LoRA rank is trained once per seed: a budget of another unit kind with that rank reuses the run.
    lora = [r for r in result.rows if r["method"] == "lora"]
    trained = {(r["n_trained"], r["seed"]) for r in lora if "shared_with" not in r}
    assert len(trained) == len([r for r in lora if "shared_with" not in r])
    key = lambda r: (r["kind"], r["budget"], r["method"], r["seed"], r["draw"])  # noqa: E731
    runs = {key(r): r for r in result.rows}
    for r in (r for r in lora if "shared_with" in r):
        first = runs[tuple(r["shared_with"])]
        assert first["kind"] != r["kind"] and "shared_with" not in first
        assert (r["n_trained"], r["heldout_accuracy"]) == (first["n_trained"], first["heldout_accuracy"])
    # Exact and AtP choosing the same sites train once: the AtP row is the exact run's.
    same = [r for r in result.rows if r["method"] == "atp" and r["sites"] == runs[(*key(r)[:2], "exact",
                                                                                       r["seed"], 0)]["sites"]]
    assert same and all(tuple(r["shared_with"]) == (*key(r)[:2], "exact", r["seed"], 0) for r in same)
    for r in same:
        assert torch.equal(result.correct[key(r)], result.correct[tuple(r["shared_with"])])
    differ = [r for r in result.rows if r["method"] == "atp" and r not in same]
    assert all("shared_with" not in r for r in differ)


def test_scores_are_the_trained_models_and_statistics_pair_by_seed(curves):
    _, _, result = curves
    base_metric, base_correct = per_example(mechattr.native_model(), answered_task(1))
    assert torch.equal(result.base_correct, base_correct)
    assert result.base["heldout_accuracy"] == pytest.approx(float(base_correct.float().mean()))
    for row in result.rows:
        key = (row["kind"], row["budget"], row["method"], row["seed"], row["draw"])
        assert row["heldout_accuracy"] == pytest.approx(float(result.correct[key].float().mean()))
    exact = np.stack([result.correct[("head", 2, "exact", s, 0)].numpy() for s in (0, 1)])
    random = np.stack([[result.correct[("head", 2, "random", s, d)].numpy() for d in (0, 1)] for s in (0, 1)])
    diff = result.versus_random("head", 2)
    assert diff.estimate == pytest.approx(exact.mean() - random.mean())
    assert diff == bootstrap_paired(exact, random)
    for entry in result.summary():
        assert 0 <= entry["accuracy_low"] <= entry["accuracy"] <= entry["accuracy_high"] <= 1


def test_verdicts_follow_the_interval(curves):
    _, _, result = curves
    from mechattr.stats import Interval
    assert result.verdict(Interval(0.1, 0.02, 0.2)) == "beats"
    assert result.verdict(Interval(-0.1, -0.2, -0.01)) == "loses"
    assert result.verdict(Interval(0.0, -0.03, 0.04)) == "ties"
    assert result.verdict(Interval(0.0, -0.2, 0.1)) == \
        "undecided (the interval includes 0 and reaches -0.200, beyond ±0.05)"
    assert result.verdict(Interval(0.03, 0.0, 0.08)).startswith("undecided (the interval includes 0 and reaches +0.080")
    assert len(result.verdicts()) == 2 * (2 + len(result.meta["budgets"]["neuron"]))


def test_saved_curves_load_to_the_same_statistics(curves, tmp_path):
    _, _, result = curves
    loaded = BudgetCurves.load(result.save(tmp_path))
    assert loaded.summary() == result.summary()
    assert (tmp_path / "curves.md").read_text().count("| head | 1 | exact |") == 1
    with pytest.raises(FileNotFoundError, match="no budget curves"):
        BudgetCurves.load(tmp_path / "elsewhere")


def _seeds(result: BudgetCurves, seeds: set[int]) -> BudgetCurves:
    return BudgetCurves(tuple(r for r in result.rows if r["seed"] in seeds),
                        {k: v for k, v in result.correct.items() if k[3] in seeds}, result.base, result.base_correct,
                        {**result.meta, "seeds": sorted(seeds)})


def test_seeds_run_apart_combine_to_the_same_statistics(curves):
    model, rankings, result = curves
    seed_1 = _curves(rankings, replace(PLAN, seeds=(1,)))
    combined = BudgetCurves.combine(_seeds(result, {0}), seed_1)
    key = lambda entry: (entry["kind"], entry["budget"], entry["method"])  # noqa: E731
    drop = lambda entry: {k: v for k, v in entry.items() if k != "wall_s"}  # noqa: E731
    assert sorted(map(drop, combined.summary()), key=key) == sorted(map(drop, result.summary()), key=key)
    assert combined.meta["seeds"] == [0, 1] and len(combined.rows) == len(result.rows)

    with pytest.raises(ValueError, match="run \\(.*, 1, 0\\) \\(kind, budget, method, seed, draw\\) is in two parts"):
        BudgetCurves.combine(result, seed_1)
    other_draws = replace(seed_1, meta={**seed_1.meta, "draws": 3})
    with pytest.raises(ValueError, match="differ in draws;"):
        BudgetCurves.combine(_seeds(result, {0}), other_draws)
    flipped = replace(seed_1, base_correct=~seed_1.base_correct)
    with pytest.raises(ValueError, match="differ in the base model's held-out correctness"):
        BudgetCurves.combine(_seeds(result, {0}), flipped)
    with pytest.raises(ValueError, match="at least one part"):
        BudgetCurves.combine()
    # A part whose ranking chose other sites (other ranking examples, another shortlist) is not the same plan.
    reranked = replace(seed_1, rows=tuple({**r, "sites": r["sites"][::-1] + ["z[L0 H0]"]} if r["method"] == "exact"
                                          else r for r in seed_1.rows))
    with pytest.raises(ValueError, match="exact-selected sites differ at 1 head\\(s\\).*rank every part alike"):
        BudgetCurves.combine(_seeds(result, {0}), reranked)


def test_a_part_at_some_budgets_adds_its_seeds_there_only(curves):
    _, _, result = curves
    at = ("head", 2)
    part = BudgetCurves(tuple(r for r in result.rows if r["seed"] == 1 and (r["kind"], r["budget"]) == at),
                        {k: v for k, v in result.correct.items() if k[3] == 1 and k[:2] == at}, result.base,
                        result.base_correct, {**result.meta, "seeds": [1], "budgets": {"head": [2]}})
    first = _seeds(result, {0})
    combined = BudgetCurves.combine(first, part)
    assert combined.meta["budgets"] == result.meta["budgets"] and combined.meta["seeds"] == [0, 1]
    drop = lambda entry: {k: v for k, v in entry.items() if k != "wall_s"}  # noqa: E731
    by_cell = lambda curves: {(e["kind"], e["budget"], e["method"]): drop(e) for e in curves.summary()}  # noqa: E731
    both, alone, got = by_cell(result), by_cell(first), by_cell(combined)
    for cell, entry in got.items():  # both seeds at the part's budget, seed 0 alone everywhere else
        assert entry == (both if cell[:2] == at else alone)[cell], cell
    assert got[("head", 2, "random")]["runs"] == 2 * alone[("head", 2, "random")]["runs"]


def test_bad_plans_and_rankings_are_refused(curves):
    with pytest.raises(ValueError, match="unknown \\['dropout'\\]"):
        BudgetPlan(baselines=("random", "dropout"))
    with pytest.raises(ValueError, match="distinct seeds"):
        BudgetPlan(seeds=(1, 1))
    with pytest.raises(ValueError, match="missing or unknown: \\['head.atp'\\]"):
        budget_curves(mechattr.native_model, answered_task(0), answered_task(1), {"head": {"exact": curves[1]["head"]["exact"]}})


def test_budget_plot_draws_every_method_and_the_paired_differences(curves):
    from mechattr.plots.finetune import plot_budget_curves
    _, _, result = curves
    fig = plot_budget_curves(result)
    acc, diff = fig.axes
    labels = acc.get_legend_handles_labels()[1]
    assert {"exact (heads)", "random (neurons)", "lora (heads)", "full", "base model"} <= set(labels)
    assert acc.get_xscale() == "log" and acc.get_ylim() == (0, 1)
    exact = next(c.lines[0] for c in acc.containers if c.get_label() == "exact (heads)")
    expected = [e["accuracy"] for e in sorted(result.summary(), key=lambda e: e["n_trained"])
                if (e["kind"], e["method"]) == ("head", "exact")]
    assert list(exact.get_ydata()) == pytest.approx(expected)
    assert "exact - random (heads)" in diff.get_legend_handles_labels()[1]


def test_rank_units_patches_every_head_and_the_estimates_top_neurons():
    model, task = mechattr.native_model(), answered_task(0)
    rankings, budgets = rank_units(model, task, heads=(1, 2))
    heads, neurons = mechattr.grid(model, "z"), mechattr.grid(model, "neuron")
    torch.testing.assert_close(rankings["head"]["exact"].effect,
                               mechattr.patch(model, task, heads, progress=False).effect, rtol=0, atol=0)
    estimate = mechattr.attribute(model, task, neurons, "atp")
    torch.testing.assert_close(rankings["neuron"]["atp"].effect, estimate.effect, rtol=0, atol=1e-6)
    assert budgets == matched_neurons(model, rankings["head"]["exact"], estimate, (1, 2))
    shortlist = [site for site, _ in estimate.top(2 * max(budgets))]
    assert list(rankings["neuron"]["exact"].sites) == shortlist
    torch.testing.assert_close(rankings["neuron"]["exact"].effect,
                               mechattr.patch(model, task, shortlist, progress=False).effect, rtol=0, atol=0)
    assert rank_units(model, task, heads=(1,), neurons=False)[1] == ()
    # A part at fewer budgets given the first part's shortlist ranks the same neurons exactly.
    part, part_budgets = rank_units(model, task, heads=(1,), shortlist=len(shortlist))
    assert part_budgets == budgets[:1] and list(part["neuron"]["exact"].sites) == shortlist
    torch.testing.assert_close(part["neuron"]["exact"].effect, rankings["neuron"]["exact"].effect, rtol=0, atol=0)
    with pytest.raises(ValueError, match=f"a shortlist of 1 neurons cannot rank the largest neuron budget, "
                                         f"{max(budgets)} \\(matched to 2 heads\\)"):
        rank_units(model, task, heads=(1, 2), shortlist=1)
    # Exact patching on the first examples only; AtP, and so the random sites drawn from it, on all of them.
    fewer, fewer_budgets = rank_units(model, task, heads=(1, 2), exact_examples=3)
    first = task.subset(slice(0, 3))
    torch.testing.assert_close(fewer["head"]["exact"].effect,
                               mechattr.patch(model, first, heads, progress=False).effect, rtol=0, atol=0)
    torch.testing.assert_close(fewer["neuron"]["exact"].effect,
                               mechattr.patch(model, first, shortlist, progress=False).effect, rtol=0, atol=0)
    assert fewer["head"]["exact"].n_examples == 3 < task.n_examples == fewer["head"]["atp"].n_examples
    torch.testing.assert_close(fewer["head"]["atp"].effect, rankings["head"]["atp"].effect, rtol=0, atol=0)
    assert fewer_budgets == budgets and list(fewer["neuron"]["exact"].sites) == shortlist
    with pytest.raises(ValueError, match="exact_examples is a positive number of examples or None .all., got 0"):
        rank_units(model, task, heads=(1,), exact_examples=0)


def test_a_tie_where_both_arms_are_right_on_every_example_says_so():
    rows, correct = [], {}
    for method in ("exact", "random"):
        for seed in (0, 1, 2):
            rows.append({"kind": "head", "budget": 4, "method": method, "seed": seed, "draw": 0, "n_trained": 10,
                         "heldout_metric": 1.0, "kl_unrelated": 0.0, "other_accuracy": {}, "wall_s": 1.0})
            correct[("head", 4, method, seed, 0)] = torch.ones(50, dtype=torch.bool)
    curves = BudgetCurves(tuple(rows), correct, {"heldout_accuracy": 0.7}, torch.zeros(50, dtype=torch.bool))
    entry = next(e for e in curves.summary() if e["method"] == "exact")
    assert (entry["minus_random_low"], entry["minus_random_high"]) == (0.0, 0.0)
    assert entry["verdict"].startswith("ties at the ceiling (both at least 0.99 held-out accuracy")
