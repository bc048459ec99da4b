"""The masked trainer: frozen entries never change, the trained ones follow a hand-written reference,
runs are deterministic, and a resumed run ends where an uninterrupted one does."""

import hashlib

import pytest
import torch
import torch.nn.functional as F

import mechattr
from mechattr.finetune import Checkpoint, Evaluate, Text, TrainConfig, full_masks, masks, train
from mechattr.finetune.data import batch_indices, loss
from mechattr.finetune.trainer import Callback
from mechattr.sites import Site
from mechattr.tasks import Task

SITES = [Site("z", 1, head=2), Site("neuron", 0, neuron=5), Site("k", 0, head=3)]


@pytest.fixture(scope="module")
def task():
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(0, 50, (12, 7), generator=g)
    return Task(clean, clean.clone(), answer=torch.randint(0, 50, (12,), generator=g),
                wrong=torch.randint(0, 50, (12,), generator=g), name="random")


def checksums(model):
    return {n: hashlib.sha256(p.detach().numpy().tobytes()).hexdigest() for n, p in model.named_parameters()}


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("config", [
    TrainConfig(steps=6, lr=0.05, optimizer="sgd", momentum=0.9, weight_decay=0.1, batch_size=4),
    TrainConfig(steps=6, lr=0.05, optimizer="adamw", weight_decay=0.5, batch_size=4),
], ids=["sgd", "adamw"])
def test_frozen_parameters_are_bit_identical(task, config):
    model = mechattr.native_model()
    mask_set = masks(model, SITES)
    before_sums, before = checksums(model), snapshot(model)
    train(model, mask_set, task, config, progress=False)
    after_sums, after = checksums(model), snapshot(model)
    for name in before:
        if name not in mask_set:
            assert after_sums[name] == before_sums[name], name
        else:
            frozen = ~mask_set[name]
            assert torch.equal(after[name][frozen], before[name][frozen]), name
    # The trained entries did move, so the check above could have failed.
    moved = sum(int((after[n] != before[n])[mask_set[n]].sum()) for n in mask_set)
    assert moved > 0.9 * sum(int(m.sum()) for m in mask_set.values())


def reference_sgd(model, mask_set, task, config):
    """Plain masked SGD written out: full gradients, multiplied by the mask, one update per step."""
    params = dict(model.named_parameters())
    for step in range(config.steps):
        index = batch_indices(task.n_examples, config.batch_size, config.seed, step)
        for name in mask_set:
            params[name].requires_grad_(True)
        last = model(task.clean[index])[:, -1]
        F.cross_entropy(last, task.answer[index]).backward()
        with torch.no_grad():
            for name, mask in mask_set.items():
                params[name] -= config.lr * params[name].grad * mask
                params[name].grad = None


def test_trained_entries_follow_a_hand_written_sgd(task):
    config = TrainConfig(steps=5, lr=0.1, optimizer="sgd", max_grad_norm=None, batch_size=5)
    ours, reference = mechattr.native_model(), mechattr.native_model()
    mask_set = masks(ours, SITES)
    before = snapshot(ours)
    train(ours, mask_set, task, config, progress=False)
    reference_sgd(reference, mask_set, task, config)
    for (name, a), (_, b) in zip(ours.named_parameters(), reference.named_parameters()):
        assert torch.allclose(a, b, atol=1e-5), name
    assert sum(float((a - before[n]).abs().max()) for n, a in snapshot(ours).items()) > 0.1


def test_full_masks_match_torch_adamw(task):
    """With every entry trained and no decay, the trainer is AdamW on the whole model."""
    config = TrainConfig(steps=4, lr=1e-2, batch_size=6, max_grad_norm=None)
    ours, reference = mechattr.native_model(), mechattr.native_model()
    train(ours, full_masks(ours), task, config, progress=False)
    for p in reference.parameters():
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(reference.parameters(), lr=config.lr, weight_decay=0.0)
    for step in range(config.steps):
        index = batch_indices(task.n_examples, config.batch_size, config.seed, step)
        F.cross_entropy(reference(task.clean[index])[:, -1], task.answer[index]).backward()
        optimizer.step()
        optimizer.zero_grad()
    for (name, a), (_, b) in zip(ours.named_parameters(), reference.named_parameters()):
        if "k._original_component.bias" in name:
            # Exactly zero gradient (a key bias shifts every key's score equally), so Adam steps along
            # rounding noise, which differs between base + delta and in-place updates.
            continue
        assert torch.allclose(a, b, atol=1e-5), name


def test_clipping_sees_only_trained_entries(task):
    """One SGD step of lr 1 moves the trained entries by exactly the clipped norm."""
    model = mechattr.native_model()
    mask_set = masks(model, SITES)
    before = snapshot(model)
    train(model, mask_set, task, TrainConfig(steps=1, lr=1.0, optimizer="sgd", max_grad_norm=1e-3), progress=False)
    after = snapshot(model)
    step = torch.cat([(after[n] - before[n])[m] for n, m in mask_set.items()])
    assert step.norm().item() == pytest.approx(1e-3, rel=1e-3)


def test_runs_are_deterministic_and_seeded(task):
    def final(seed):
        model = mechattr.native_model()
        result = train(model, masks(model, SITES), task, TrainConfig(steps=4, batch_size=4, seed=seed), progress=False)
        return snapshot(model), result.losses

    (a, la), (b, lb), (c, lc) = final(0), final(0), final(1)
    assert la == lb and all(torch.equal(a[n], b[n]) for n in a)
    assert la != lc and not all(torch.equal(a[n], c[n]) for n in a)


class Interrupt(Callback):
    def __init__(self, at):
        self.at = at

    def on_step(self, state):
        if state.step == self.at:
            raise KeyboardInterrupt


def test_resume_from_checkpoint_equals_uninterrupted_run(task, tmp_path):
    config = TrainConfig(steps=7, batch_size=5, weight_decay=0.1)
    whole = mechattr.native_model()
    mask_set = masks(whole, SITES)
    uninterrupted = train(whole, mask_set, task, config, progress=False)
    broken = mechattr.native_model()
    with pytest.raises(KeyboardInterrupt):
        train(broken, mask_set, task, config, [Checkpoint(tmp_path / "ckpt.pt", every=3), Interrupt(at=4)],
              progress=False)
    resumed_model = mechattr.native_model()
    resumed = train(resumed_model, mask_set, task, config, resume=tmp_path / "ckpt.pt", progress=False)
    assert resumed.losses == uninterrupted.losses
    for (name, a), (_, b) in zip(whole.named_parameters(), resumed_model.named_parameters()):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="untrained copy"):
        train(whole, mask_set, task, config, resume=tmp_path / "ckpt.pt", progress=False)
    with pytest.raises(ValueError, match="lr"):
        train(mechattr.native_model(), mask_set, task, TrainConfig(steps=7, batch_size=5, weight_decay=0.1, lr=0.5),
              resume=tmp_path / "ckpt.pt", progress=False)


def test_losses_against_hand_computed_values(task):
    model = mechattr.native_model()
    index = torch.tensor([0, 3, 5])
    with torch.no_grad():
        last = model(task.clean[index])[:, -1]
        logp = last.log_softmax(-1)
        ce = -logp[torch.arange(3), task.answer[index]].mean()
        diff = (last[torch.arange(3), task.answer[index]] - last[torch.arange(3), task.wrong[index]]).mean()
        assert loss(model, task, index, "ce").item() == pytest.approx(ce.item(), rel=1e-5)
        assert loss(model, task, index, "logit_diff").item() == pytest.approx(-diff.item(), rel=1e-5)
        text = Text(torch.randint(0, 50, (4, 9), generator=torch.Generator().manual_seed(3)))
        all_logp = model(text.tokens[index[:2]]).log_softmax(-1)  # (2, 9, vocab)
        targets = text.tokens[index[:2], 1:]
        lm = -all_logp[:, :-1].gather(-1, targets[..., None]).mean()
        assert loss(model, text, index[:2]).item() == pytest.approx(lm.item(), rel=1e-5)


def test_text_training_lowers_the_lm_loss():
    model = mechattr.native_model()
    text = Text(torch.randint(0, 50, (8, 12), generator=torch.Generator().manual_seed(4)))
    result = train(model, masks(model, [Site("mlp_out", 1)]), text, TrainConfig(steps=15, lr=1e-2), progress=False)
    assert result.losses[-1] < result.losses[0] - 0.5


def test_batches_cover_each_epoch_once():
    seen = torch.cat([batch_indices(10, 4, seed=7, step=s) for s in range(5)])  # 20 = two epochs
    assert sorted(seen[:10].tolist()) == list(range(10)) and sorted(seen[10:].tolist()) == list(range(10))
    assert torch.equal(batch_indices(10, 4, 7, 3), batch_indices(10, 4, 7, 3))
    assert batch_indices(3, 8, 0, 0).numel() == 3


def test_evaluate_callback_records_history(task):
    model = mechattr.native_model()
    evaluate = Evaluate(task, every=2)
    train(model, masks(model, SITES), task, TrainConfig(steps=5, lr=1e-2), [evaluate], progress=False)
    assert [step for step, _ in evaluate.history] == [0, 2, 4, 5]
    assert evaluate.history[-1][1]["metric"] > evaluate.history[0][1]["metric"]


def test_mask_errors_name_the_parameter(task):
    model = mechattr.native_model()
    name = "layers.0._original_component.attn._original_component.q._original_component.weight"
    with pytest.raises(ValueError, match="mask for .*q._original_component.weight.* has shape"):
        train(model, {name: torch.ones(3, dtype=torch.bool)}, task, progress=False)
    with pytest.raises(KeyError, match="not parameters"):
        train(model, {"nope": torch.ones(3, dtype=torch.bool)}, task, progress=False)
    with pytest.raises(ValueError, match="select no parameter entries"):
        train(model, {name: torch.zeros(64, 64, dtype=torch.bool)}, task, progress=False)
