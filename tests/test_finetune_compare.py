"""Baselines and the comparison table, on the small native model (LoRA through peft included)."""

import json
from dataclasses import replace

import pytest
import torch

import mechattr
from mechattr.finetune import (BottomSites, Full, LoRA, RandomSites, Text, TopSites, TrainConfig, compare, masks,
                               n_trained)
from mechattr.finetune.compare import Evaluation
from mechattr.finetune.methods import plain_model
from mechattr.selection import select
from mechattr.tasks import cause_effect
from tests.bridges import answered_task


@pytest.fixture(scope="module")
def effects():
    model = mechattr.native_model()
    return mechattr.patch(model, answered_task(0), mechattr.grid(model, "z"), progress=False)


@pytest.fixture(scope="module")
def neuron_effects():
    model = mechattr.native_model()
    return model, mechattr.attribute(model, answered_task(0), mechattr.grid(model, "neuron"), "atp")


@pytest.mark.parametrize("target", [1, 2500, 4000, 10**9])
def test_random_sites_are_the_shortest_shuffled_prefix_nearest_the_target(neuron_effects, target):
    """Against a scan of the prefixes: the first to reach the target, or the one before it where that is as
    near; a target above the whole pool's count draws the whole pool."""
    import random

    model, effects = neuron_effects
    pool = list(effects.sites)  # grid order
    random.Random(7).shuffle(pool)  # RandomSites' draw for seed 7
    count = lambda j: n_trained(masks(model, pool[:j]))  # noqa: E731
    j = len(pool) if count(len(pool)) < target else next(j for j in range(1, len(pool) + 1) if count(j) >= target)
    if j > 1 and abs(count(j - 1) - target) <= abs(count(j) - target):
        j -= 1
    assert RandomSites(effects).build(model, 7, target).sites.sites == tuple(pool[:j])


def test_random_sites_do_not_read_the_estimates(neuron_effects):
    """A ranking orders near-equal estimates by their rounding, which changes with the thread count: the draw
    depends on the grid and the seed only, so estimates in the reverse order draw the same sites."""
    model, effects = neuron_effects
    values = effects.per_example.flatten(0, -2).flip(0).reshape(effects.per_example.shape)
    reversed_ = replace(effects, values=values.mean(-1), per_example=values)
    assert [s for s, _ in reversed_.top(3)] != [s for s, _ in effects.top(3)]
    for seed in (0, 7):
        drawn = [RandomSites(e).build(model, seed, 2500).sites for e in (effects, reversed_)]
        assert drawn[0] == drawn[1]

def test_plain_model_computes_the_bridge_logits():
    model = mechattr.native_model()
    tokens = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = plain_model(model)(tokens) - model(tokens)
    assert (diff - diff.mean(-1, keepdim=True)).abs().max() < 1e-5  # equal up to a constant per position


def test_methods_pick_what_they_promise(effects):
    model = mechattr.native_model()
    top = TopSites(effects, k=2).build(model, 0, None)
    assert top.sites.sites == select(effects, top_k=2, significant_only=False).sites
    bottom = BottomSites(effects, k=2).build(model, 0, None)
    magnitudes = effects.effect.abs().flatten().sort().values
    assert sorted(abs(s) for s in bottom.sites.scores) == pytest.approx(magnitudes[:2].tolist())
    target = n_trained(top.masks)
    drawn = [RandomSites(effects).build(model, seed, target) for seed in (0, 1)]
    per_head = n_trained(masks(model, [top.sites.sites[0]]))
    for setup in drawn:
        assert abs(n_trained(setup.masks) - target) <= per_head // 2 + 1
    assert drawn[0].sites != drawn[1].sites
    lora = LoRA(targets=("q", "v")).build(model, 0, target)
    per_rank = 2 * 2 * (64 + 64)  # two layers, two adapted 64 x 64 projections each
    assert abs(n_trained(lora.masks) - target) <= per_rank / 2
    assert all("lora_" in name for name in lora.masks)


def test_compare_runs_every_method_and_renders(effects, tmp_path):
    methods = [TopSites(effects, k=2), RandomSites(effects), LoRA(targets=("q", "v")), Full(lr=1e-3)]
    text = Text(torch.randint(0, 50, (4, 10), generator=torch.Generator().manual_seed(9)), name="noise")
    table = compare(mechattr.native_model, answered_task(0), answered_task(1), methods,
                    TrainConfig(steps=3, lr=1e-2, batch_size=6), seeds=(0, 1), other_task=answered_task(2),
                    text=text, progress=False)
    assert [r["method"] for r in table.rows] == ["precision", "random", "lora", "full"] * 2
    full_count = sum(p.numel() for p in mechattr.native_model().parameters())
    rows = {r["method"]: r for r in table.rows if r["seed"] == 0}
    assert rows["full"]["n_trained"] == full_count
    # AdamW keeps two float32 moments per trained entry (and a step counter): nothing per frozen entry.
    assert rows["precision"]["optimizer_mb"] == pytest.approx(2 * 4 * rows["precision"]["n_trained"] / 2**20,
                                                              abs=16 / 2**20)
    for row in table.rows:
        assert row["kl_unrelated"] > 0 and 0 <= row["heldout_accuracy"] <= 1
    summary = {s["method"]: s for s in table.summary()}
    assert summary["precision"]["seeds"] == 2
    markdown = table.to_markdown()
    assert markdown.count("\n") == 2 + 1 + 4 - 1 and "| base model |" in markdown and "| lora |" in markdown
    saved = json.loads((table.save(tmp_path) / "comparison.json").read_text())
    assert len(saved["rows"]) == 8 and saved["meta"]["reference"] == "precision"


def test_a_given_evaluation_scores_as_compare_would_and_must_match_its_data(effects):
    model = mechattr.native_model()
    data, heldout, other = answered_task(0), answered_task(1), answered_task(2)
    text = Text(torch.randint(0, 50, (4, 10), generator=torch.Generator().manual_seed(9)), name="noise")
    methods, config = [TopSites(effects, k=2), RandomSites(effects)], TrainConfig(steps=2, lr=1e-2, batch_size=6)
    own = compare(mechattr.native_model, data, heldout, methods, config, seeds=(0,), other_task=other, text=text,
                  progress=False)
    evaluation = Evaluation(model, data, heldout, other, text)
    given = compare(mechattr.native_model, data, heldout, methods, config, seeds=(0,), evaluation=evaluation,
                    progress=False)
    assert given.base == own.base and given.meta == own.meta
    scored = ("heldout_metric", "heldout_accuracy", "train_accuracy", "kl_unrelated", "other_metric_change")
    for a, b in zip(own.rows, given.rows, strict=True):
        assert (a["method"], a["sites"], a["n_trained"]) == (b["method"], b["sites"], b["n_trained"])
        assert [a[k] for k in scored] == pytest.approx([b[k] for k in scored], abs=1e-6)
    with pytest.raises(ValueError, match="other heldout, other_task than"):
        compare(mechattr.native_model, data, answered_task(3), methods, config, seeds=(0,),
                other_task=answered_task(2), evaluation=evaluation, progress=False)


@pytest.mark.slow
def test_cause_effect_task_on_smollm2(smollm2):
    train, held = cause_effect(smollm2, "train"), cause_effect(smollm2, "heldout")
    assert train.n_examples + held.n_examples == 2 * 45 and held.n_examples == 2 * 14

    def pairs(task):
        words = {smollm2.tokenizer.decode(row[4:8]) for row in task.clean}
        return {frozenset(part.strip() for part in w.split(" cause ")) for w in words}

    assert not pairs(train) & pairs(held)  # split by pair: no held-out pair in either direction
    yes, no = (smollm2.to_tokens(w, prepend_bos=False)[0, 0] for w in (" Yes", " No"))
    assert (train.answer == yes).sum() == (train.answer == no).sum() == train.n_examples // 2
    assert torch.equal(train.wrong, torch.where(train.answer == yes, no, yes))
    assert torch.equal(train.clean[0::2], train.corrupt[1::2])  # each direction corrupts the other
    everything = cause_effect(smollm2, "all")
    assert "Does smoking cause lung cancer?" in smollm2.tokenizer.decode(everything.clean[0])
    assert "Does lung cancer cause smoking?" in smollm2.tokenizer.decode(everything.clean[1])
    assert len(pairs(train)) == 31
