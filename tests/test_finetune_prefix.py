"""Frozen prefixes: scoring and training that start at the lowest changed block give the full forward's
numbers, prove themselves on the model at hand, and fall back (and say so) where they cannot."""

import hashlib
import inspect
import warnings
from dataclasses import replace

import pytest
import torch

import mechattr
from mechattr import families
from mechattr.finetune import Full, Text, TopSites, TrainConfig, masks, train
from mechattr.finetune.data import loss
from mechattr.finetune.evaluation import kl_from_base, log_probs, per_example, task_scores
from mechattr.finetune.harness import Scorer, run_trial
from mechattr.finetune.methods import plain_model
from mechattr.finetune.prefix import Prefix, first_block
from mechattr.forward import FastPathWarning
from mechattr.sites import Site
from mechattr.tasks import Task, greater_than
from tests.bridges import answered_task, block_inputs, bridge, templated_task

LENGTHS = (7, 4, 6, 5, 7, 3)


def ragged_task(seed=0, vocab=50):
    """Prompts of LENGTHS tokens, right-padded with 0, with random answers."""
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(1, vocab, (len(LENGTHS), max(LENGTHS)), generator=g)
    for i, length in enumerate(LENGTHS):
        clean[i, length:] = 0
    return Task(clean, clean.clone(), answer=torch.randint(0, vocab, (len(LENGTHS),), generator=g),
                wrong=torch.randint(0, vocab, (len(LENGTHS),), generator=g), name="ragged",
                lengths=torch.tensor(LENGTHS))


def by_hand(model, task):
    """Each example's last-token logits from a plain forward of that example alone."""
    with torch.no_grad():
        return torch.stack([model(task.clean[i:i + 1, :int(task.lengths[i])])[0, -1] for i in range(task.n_examples)])


def checksums(model):
    return {n: hashlib.sha256(p.detach().numpy().tobytes()).hexdigest() for n, p in model.named_parameters()}


def test_first_block_is_the_lowest_block_a_mask_reaches(tiny):
    assert first_block(tiny, masks(tiny, [Site("z", 1, head=2)])) == 1
    assert first_block(tiny, masks(tiny, [Site("z", 1, head=2), Site("neuron", 0, neuron=3)])) == 0
    assert first_block(tiny, masks(tiny, [Site("embed")])) is None
    after = {id(p) for module in (tiny.ln_final, tiny.unembed) for p in module.parameters()}
    final = {n: torch.ones_like(p, dtype=torch.bool) for n, p in tiny.named_parameters() if id(p) in after}
    assert len(final) == 3 and first_block(tiny, final) == 2  # the final norm and unembedding: after the blocks
    assert first_block(plain_model(tiny), {}) is None  # not a bridge: nothing to resume


@pytest.mark.parametrize("model_name", ["tiny", "gqa"])
def test_resumed_logits_equal_each_example_run_alone_at_every_block(model_name, request):
    model = request.getfixturevalue(model_name)
    task = ragged_task()
    expected = by_hand(model, task)
    with torch.no_grad():
        everywhere = model(task.clean)
    for layer in range(len(model.blocks) + 1):
        prefix = Prefix(task.clean, task.last, batch=4)  # two fills of 4 and 2 rows
        with torch.no_grad():
            got = prefix.logits(model, layer, torch.arange(task.n_examples))
            every = prefix.logits(model, layer, torch.tensor([4, 1]), "all")
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(every, everywhere[[4, 1]], atol=1e-5, rtol=0)
        assert prefix.check(model, layer) is None
    metric, correct = per_example(model, task, prefix=prefix.fill(model), layer=1)
    right = expected.gather(-1, task.answer[:, None]) > expected.gather(-1, task.wrong[:, None])
    assert torch.equal(correct, right[:, 0])
    torch.testing.assert_close(metric, task.metric(expected, task.answer, task.wrong, expected.log_softmax(-1)),
                               atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny random Llama (Hugging Face architecture): its runs reuse a prefix's keys and values."""
    return mechattr.load_model(str(families.build("llama", tmp_path_factory.mktemp("llama"))))


@pytest.mark.parametrize("model_name", ["llama", "tiny"])
def test_rows_that_begin_alike_run_their_beginning_once(model_name, request):
    model, task = request.getfixturevalue(model_name), templated_task()
    expected = by_hand(model, task)
    prefix = Prefix(task.clean, task.last, batch=5).fill(model)
    # Each of the 3 beginnings once and every row's other 4 positions: 3 * 5 + 12 * 4 of 12 * 9 positions.
    assert prefix.shared_positions == 5
    assert Prefix(ragged_task().clean, ragged_task().last).shared_positions == 0  # random prompts: nothing worth it
    for rows in (slice(0, 1), slice(0, 0)):  # one row, or none: nothing to share
        assert Prefix(task.clean[rows], task.last[rows]).shared_positions == 0
    prefix.logits(model, 0, torch.arange(2))  # records the block inputs, so the hooks below see only the reads
    for layer in range(len(model.blocks)):
        shapes, handle = block_inputs(model, layer)
        with torch.no_grad():
            got = prefix.logits(model, layer, torch.arange(12).flip(0), batch=5, share=True).flip(0)
        handle.remove()
        # Rows run grouped by beginning, 5 at a time: 2 beginnings for the first 5, a third for the next 5 (the
        # second's carried over), none for the last 2. The native bridge passes no attention mask to its
        # blocks, so nothing can start past position 0 there.
        assert shapes == ([(2, 5), (5, 4), (1, 5), (5, 4), (2, 4)] if model_name == "llama" else
                          [(5, 9), (5, 9), (2, 9)])
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
        assert prefix.check(model, layer, share=True) is None
    shapes, handle = block_inputs(model, 1)
    metric, correct = per_example(model, task, prefix=prefix, layer=1)  # scoring shares them
    handle.remove()
    assert ((3, 5) in shapes) == (model_name == "llama")
    right = expected.gather(-1, task.answer[:, None]) > expected.gather(-1, task.wrong[:, None])
    assert torch.equal(correct, right[:, 0])
    torch.testing.assert_close(metric, task.metric(expected, task.answer, task.wrong, expected.log_softmax(-1)),
                               atol=1e-5, rtol=0)


def test_shared_beginnings_that_miss_fall_back_to_rows_run_whole(llama, monkeypatch):
    from mechattr.forward import Forward

    model, task = llama, templated_task(1)
    expected = task_scores(model, task)
    prefix = Prefix(task.clean, task.last).fill(model)
    prefix.logits(model, 0, torch.arange(2))  # records the block inputs
    keys_values = Forward.prefix_keys_values
    monkeypatch.setattr(Forward, "prefix_keys_values",  # keys off by one: the shared path is wrong
                        lambda self, resid, layer: [(k + 1, v) for k, v in keys_values(self, resid, layer)])
    with pytest.warns(FastPathWarning, match="block 1, the rows' shared first 5 positions misses the model's own "
                                             "last-position logits.*runs each row whole from the block instead"):
        got = task_scores(model, task, prefix=prefix, layer=1)
    assert got["accuracy"] == expected["accuracy"] and got["metric"] == pytest.approx(expected["metric"], abs=1e-6)
    shapes, handle = block_inputs(model, 1)
    task_scores(model, task, prefix=prefix, layer=1)  # the model no longer shares: rows run whole, unwarned
    handle.remove()
    assert shapes == [(12, 9)]


def test_rows_are_computed_once_and_only_as_deep_as_asked():
    model, task = bridge(n_layers=3, seed=2), answered_task(0)
    runs = []
    handle = model.blocks[0].register_forward_hook(lambda module, args, out: runs.append(args[0].shape[0]))
    try:
        prefix = Prefix(task.clean, task.last)
        prefix.resid(model, 1, torch.arange(6))
        prefix.resid(model, 1, torch.arange(12))  # rows 0-5 are done: only 6-11 run
        stored = prefix.resid(model, 1, torch.arange(12)).clone()
        with torch.no_grad():  # a later block changes: the rows stored at block 1 stay as they are
            next(p for n, p in model.named_parameters() if "layers.2." in n and n.endswith("weight")).mul_(2)
        assert runs == [6, 6]
        torch.testing.assert_close(prefix.resid(model, 1, torch.arange(12)), stored, atol=0, rtol=0)
        prefix.resid(model, 3, torch.arange(2))  # deeper: rows 0 and 1 run again, the stored blocks kept
        assert runs == [6, 6, 2]
        torch.testing.assert_close(prefix.resid(model, 1, torch.arange(12)), stored, atol=0, rtol=0)
    finally:
        handle.remove()


def test_a_changed_lower_block_is_caught_and_scoring_falls_back(tiny):
    model, task = mechattr.native_model(), answered_task(1)
    prefix = Prefix(task.clean, task.last).fill(model)
    assert prefix.check(model, 1) is None
    checks, check = [], prefix.check
    prefix.check = lambda m, layer, share=False: checks.append(layer) or check(m, layer, share)
    params = dict(model.named_parameters())
    with torch.no_grad():
        assert prefix.usable(model, 1)
        next(p for n, p in params.items() if "layers.1." in n and n.endswith("weight")).add_(0.5)
        assert prefix.usable(model, 1) and checks == [1]  # a change in block 1 leaves the proof standing
        next(p for n, p in params.items() if "layers.0." in n and n.endswith("weight")).add_(0.5)
    assert "from block 1, the base model's residual misses the model's own last-position logits" in \
        prefix.check(model, 1)
    assert prefix.check(model, 0) is None  # block 0 itself may change: it runs
    with pytest.warns(FastPathWarning, match="runs full forwards for it instead"):
        fallback = task_scores(model, task, prefix=prefix, layer=1)
    assert fallback == task_scores(model, task)
    with pytest.raises(ValueError, match="the prefix holds another batch"):
        task_scores(model, answered_task(2, n=5), prefix=prefix, layer=1)


def test_a_resumed_path_that_fails_to_run_falls_back_to_full_forwards():
    # A model whose blocks run only inside its own forward: the resumed path, which calls them directly,
    # raises, and the prefix (which proves itself by its own check, not the engine's proof) says so.
    model, task = mechattr.native_model(), answered_task(1)
    prefix = Prefix(task.clean, task.last).fill(model)

    def outside_only(module, args):
        if not any(isinstance(frame.f_locals.get("self"), type(model)) for frame, *_ in inspect.stack()):
            raise RuntimeError("block called outside the model")
    for block in model.blocks:
        block.register_forward_pre_hook(outside_only)
    assert "from block 1, the resumed forward fails to run: RuntimeError: block called outside the model" == \
        prefix.check(model, 1)
    with pytest.warns(FastPathWarning, match="fails to run.*runs full forwards for it instead"):
        fallback = task_scores(model, task, prefix=prefix, layer=1)
    assert fallback == task_scores(model, task)


def test_kl_and_log_probs_resume_exactly(tiny):
    text = Text(torch.randint(0, 50, (5, 9), generator=torch.Generator().manual_seed(3)))
    base = log_probs(tiny, text.tokens)
    with torch.no_grad():
        torch.testing.assert_close(base, tiny(text.tokens).log_softmax(-1), atol=1e-5, rtol=0)
    model = mechattr.native_model()
    train(model, masks(model, [Site("mlp_out", 1)]), text, TrainConfig(steps=3, lr=1e-2), progress=False)
    prefix = Prefix(text.tokens).fill(tiny)
    resumed = kl_from_base(model, text.tokens, base, prefix=prefix, layer=1)
    assert resumed == pytest.approx(kl_from_base(model, text.tokens, base), abs=1e-6) and resumed > 1e-4


def test_skipping_frozen_blocks_trains_what_every_block_trains():
    """AdamW with decay, sites in block 1: the same trained entries as running every block every step
    (to float rounding), frozen entries bit-identical, and block 0 runs once per example, not per step."""
    task, sites = answered_task(0), [Site("z", 1, head=2), Site("neuron", 1, neuron=7)]
    config = TrainConfig(steps=9, lr=0.05, weight_decay=0.5, batch_size=4)  # three epochs of 12 examples
    models = {skip: mechattr.native_model() for skip in (True, False)}
    before = checksums(models[True])

    def rows_through_block_0(model, skip, steps):
        rows, mask_set = [], masks(model, sites)
        handle = model.blocks[0].register_forward_hook(lambda module, args, out: rows.append(args[0].shape[0]))
        result = train(model, mask_set, task, replace(config, steps=steps), progress=False, skip_frozen=skip)
        handle.remove()
        assert steps == 0 or result.losses[-1] < result.losses[0]
        return sum(rows), mask_set

    assert rows_through_block_0(models[False], False, 9)[0] == 9 * 4  # every step runs block 0
    proofs, _ = rows_through_block_0(mechattr.native_model(), True, 0)  # the resumed path's proofs, a few rows
    skipped, mask_set = rows_through_block_0(models[True], True, 9)
    assert skipped == proofs + task.n_examples - 2  # then each example once (the proof ran the first two)
    after = {skip: dict(model.named_parameters()) for skip, model in models.items()}
    untrained, sums = dict(mechattr.native_model().named_parameters()), checksums(models[True])
    for name, param in after[True].items():
        if name not in mask_set:
            assert sums[name] == before[name], name
        else:
            torch.testing.assert_close(param, after[False][name], atol=1e-6, rtol=1e-5)
            assert torch.equal(param[~mask_set[name]], untrained[name][~mask_set[name]]), name


def test_trials_score_as_full_forwards_and_put_the_weights_back():
    model, task, heldout = mechattr.native_model(), answered_task(0), ragged_task(1)
    text = Text(torch.randint(0, 50, (4, 10), generator=torch.Generator().manual_seed(9)), name="noise")
    scorer = Scorer(model, heldout, [answered_task(2)], text)
    before = checksums(model)
    for method in (TopSites(mechattr.patch(model, task, mechattr.grid(model, "z"), progress=False), k=1),
                   Full(lr=1e-3)):
        setup = method.build(model, 0, None)
        trial = run_trial(setup, model, task, method.run_config(TrainConfig(steps=3, lr=1e-2, batch_size=6), 0),
                          scorer)
        assert checksums(model) == before  # the trained entries are back, bit for bit
        trained = trial.result.delta.apply(mechattr.native_model())  # the trained model again, by its delta
        metric, correct = per_example(trained, heldout)
        assert trial.scores.heldout_metric == pytest.approx(float(metric.mean()), abs=1e-5)
        assert torch.equal(trial.scores.correct, correct)
        assert trial.scores.kl_unrelated == pytest.approx(kl_from_base(trained, text.tokens, scorer.base_text),
                                                          abs=1e-6)
    assert scorer.base.kl_unrelated == pytest.approx(0.0, abs=1e-7)


@pytest.mark.slow
def test_smollm2_scores_and_steps_from_the_lowest_trained_block(smollm2_export, smollm2_ioi):
    """The trained heads (L9, L12) of the session's export fixture: scoring from block 9 of the untrained
    model's run gives the full forward's numbers, and a training step from block 9 has the full forward's loss and gradient."""
    trained, result, _ = smollm2_export
    base = mechattr.load_model("smollm2-135m", compatibility=False)
    task = smollm2_ioi
    layer = first_block(trained, masks(trained, result.delta.sites))
    assert layer == 9
    prefix = Prefix(task.clean, task.last).fill(base)
    resumed = per_example(trained, task, prefix=prefix, layer=layer)
    full = per_example(trained, task)
    torch.testing.assert_close(resumed[0], full[0], atol=1e-4, rtol=1e-5)
    assert torch.equal(resumed[1], full[1])
    # greater_than's prompts begin alike ("The war lasted from the year 17"): the shared path, proved, no warning.
    numbers = greater_than(base, n=48, seed=0)
    alike = Prefix(numbers.clean, numbers.last).fill(base)
    assert alike.shared_positions > 0
    with warnings.catch_warnings():
        warnings.simplefilter("error", FastPathWarning)
        resumed = per_example(trained, numbers, prefix=alike, layer=layer)
    full = per_example(trained, numbers)
    torch.testing.assert_close(resumed[0], full[0], atol=1e-4, rtol=1e-5)
    assert torch.equal(resumed[1], full[1])
    # The training step's gradient from block 9 on equals the full forward's. (Final weights after Adam
    # steps are the wrong place to compare: Adam divides by each entry's root-mean-square gradient, so an
    # entry whose gradient is near zero turns float rounding into a fraction of a step.)
    model, index = mechattr.load_model("smollm2-135m", compatibility=False), torch.arange(6)
    model.requires_grad_(True)
    grads = {}
    for name, use in (("resumed", prefix), ("full", None)):
        model.zero_grad()
        value = loss(model, task, index, prefix=use, layer=layer if use is not None else None)
        value.backward()
        grads[name] = (value.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads["resumed"][0] == pytest.approx(grads["full"][0], rel=1e-5)
    assert set(grads["resumed"][1]) < set(grads["full"][1])  # blocks below 9 get no gradient when resumed
    assert all(".blocks.0." not in n for n in grads["resumed"][1])
    for name in masks(model, result.delta.sites):  # the entries training moves (the tied embedding is not one)
        torch.testing.assert_close(grads["resumed"][1][name], grads["full"][1][name], atol=1e-6, rtol=1e-4)
