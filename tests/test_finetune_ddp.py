"""Masked fine-tuning on 2 processes (gloo): frozen entries stay bit-identical, both processes hold the
same weights, the trained entries equal a single-process run's, and only the main process writes files."""

import copy
import textwrap
from pathlib import Path

import pytest
import torch

import mechattr
from mechattr.finetune import Delta, Evaluate, Text, TrainConfig, accelerated, masks, train
from mechattr.sites import Site
from mechattr.tasks import Task

SITES = [Site("z", 1, head=2), Site("neuron", 0, neuron=5), Site("k", 0, head=3)]
# Key biases get no gradient in exact arithmetic (softmax ignores a shift shared by every key), only
# rounding noise, which Adam scales up to lr-sized steps in any run: Adam trains no key entries here.
CASES = {  # name: (config, sites, kv mode, data); batches of 5 split 3 + 2, so the shares are uneven
    "sgd": (TrainConfig(steps=6, lr=0.05, optimizer="sgd", momentum=0.9, max_grad_norm=0.5, batch_size=5),
            SITES, "any", "task"),
    "adamw": (TrainConfig(steps=6, lr=0.02, weight_decay=0.1, batch_size=5), SITES[:2], "never", "task"),
    "text": (TrainConfig(steps=4, lr=0.1, optimizer="sgd", max_grad_norm=None, batch_size=4), SITES, "any",
             "text"),
}


def data(kind):
    """12 random task examples of 7 tokens, or 10 random text windows of 8 tokens."""
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(0, 50, (12, 7), generator=g)
    if kind == "text":
        return Text(torch.randint(0, 50, (10, 8), generator=g))
    return Task(clean, clean.clone(), answer=torch.randint(0, 50, (12,), generator=g),
                wrong=torch.randint(0, 50, (12,), generator=g), name="random")


# Run on 2 processes with argv [out folder, this file's folder]: saves each rank's weights, losses,
# evaluations and the files it wrote.
WORKER = textwrap.dedent("""
    import copy
    import dataclasses
    import sys

    import torch
    import torch.distributed as dist

    import mechattr
    from mechattr.finetune import Checkpoint, Delta, Evaluate, TrainConfig, accelerated, masks

    out = sys.argv[1]
    sys.path.insert(0, sys.argv[2])
    from test_finetune_ddp import CASES, SITES, data

    delta_saves = []
    save = Delta.save
    Delta.save = lambda self, path: delta_saves.append(str(path)) or save(self, path)

    class Counted(Checkpoint):
        calls = 0

        def on_step(self, state):
            Counted.calls += 1
            super().on_step(state)

    base = mechattr.native_model()
    results = {}
    for name, (config, sites, kv, kind) in CASES.items():
        model = copy.deepcopy(base)
        callbacks = [Counted(f"{out}/{name}.ckpt", every=2), Evaluate(data("task"), every=3)]
        result = accelerated.train(model, masks(model, sites, kv=kv), data(kind), config, callbacks,
                                   progress=False, delta_path=f"{out}/{name}.safetensors")
        results[name] = {"params": {n: p.detach().clone() for n, p in model.named_parameters()},
                         "losses": result.losses, "history": callbacks[1].history}
    # A run stopped after 3 steps and resumed to 6 must end where the uninterrupted one does.
    config = CASES["sgd"][0]
    first = copy.deepcopy(base)
    accelerated.train(first, masks(first, SITES), data("task"), dataclasses.replace(config, steps=3),
                      [Checkpoint(f"{out}/resume.ckpt")], progress=False)
    resumed = copy.deepcopy(base)
    accelerated.train(resumed, masks(resumed, SITES), data("task"), config, resume=f"{out}/resume.ckpt",
                      progress=False)
    results["resumed"] = {"params": {n: p.detach().clone() for n, p in resumed.named_parameters()}}
    try:
        accelerated.train(copy.deepcopy(base), masks(base, SITES), data("task"), TrainConfig(batch_size=1),
                          progress=False)
        results["batch_of_one"] = "no error"
    except ValueError as error:
        results["batch_of_one"] = str(error)
    torch.save({"world": dist.get_world_size(), "results": results, "checkpoint_calls": Counted.calls,
                "delta_saves": delta_saves}, f"{out}/rank{dist.get_rank()}.pt")
""")


@pytest.fixture(scope="module")
def base():
    return mechattr.native_model()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The output folder and each rank's saved results from one 2-process launch of WORKER."""
    root = tmp_path_factory.mktemp("ddp")
    (root / "worker.py").write_text(WORKER)
    accelerated.launch(root / "worker.py", root, Path(__file__).parent, processes=2, timeout=300)
    return root, [torch.load(root / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.fixture(scope="module")
def single(base):
    """Each case trained in this process by the plain trainer: (params, losses, evaluation history)."""
    out = {}
    for name, (config, sites, kv, kind) in CASES.items():
        model = copy.deepcopy(base)
        evaluate = Evaluate(data("task"), every=3)
        result = train(model, masks(model, sites, kv=kv), data(kind), config, [evaluate], progress=False)
        out[name] = (dict(model.named_parameters()), result.losses, evaluate.history)
    return out


def test_frozen_entries_are_bit_identical_and_ranks_agree(run, base):
    _, ranks = run
    assert [r["world"] for r in ranks] == [2, 2]
    before = dict(base.named_parameters())
    for name, (_, sites, kv, _) in CASES.items():
        mask_set = masks(base, sites, kv=kv)
        for rank in ranks:
            params = rank["results"][name]["params"]
            for p, value in params.items():
                frozen = ~mask_set[p] if p in mask_set else torch.ones_like(value, dtype=torch.bool)
                assert torch.equal(value[frozen], before[p][frozen]), (name, p)
                assert torch.equal(value, ranks[0]["results"][name]["params"][p]), (name, p)
            moved = sum(int((params[p] != before[p])[m].sum()) for p, m in mask_set.items())
            assert moved > 0.9 * sum(int(m.sum()) for m in mask_set.values()), name
        assert ranks[0]["results"][name]["losses"] == ranks[1]["results"][name]["losses"]


def test_trained_entries_equal_the_single_process_run(run, single, base):
    _, ranks = run
    before = dict(base.named_parameters())
    for name, (ours_by_name, losses, _) in single.items():
        theirs = ranks[0]["results"][name]["params"]
        diff = max(float((theirs[p] - ours_by_name[p]).abs().max()) for p in theirs)
        moved = max(float((ours_by_name[p] - before[p]).abs().max()) for p in theirs)
        # Float summation order differs (two half-batch backward passes, then a sum), nothing else.
        assert diff <= 1e-6, (name, diff)
        assert moved > 1e-2, name  # the weights did move, so the comparison could fail
        torch.testing.assert_close(torch.tensor(ranks[0]["results"][name]["losses"]), torch.tensor(losses),
                                   atol=1e-5, rtol=0)


def test_evaluation_during_training_matches(run, single):
    _, ranks = run
    for name, (_, _, history) in single.items():
        theirs = ranks[0]["results"][name]["history"]
        assert [step for step, _ in theirs] == [step for step, _ in history] == [0, 3] + ([6] if name != "text"
                                                                                          else [4])
        for (_, a), (_, b) in zip(theirs, history):
            assert a["accuracy"] == b["accuracy"] and abs(a["metric"] - b["metric"]) < 1e-5, name


def test_only_the_main_process_writes(run, base):
    root, ranks = run
    assert ranks[0]["checkpoint_calls"] == sum(c.steps for c, _, _, _ in CASES.values())
    assert ranks[1]["checkpoint_calls"] == 0
    assert ranks[0]["delta_saves"] == [str(root / f"{name}.safetensors") for name in CASES]
    assert ranks[1]["delta_saves"] == []
    for name, (config, _, _, _) in CASES.items():
        assert torch.load(root / f"{name}.ckpt", weights_only=False)["step"] == config.steps
        # The saved delta on the base model reproduces the trained weights bit for bit.
        model = Delta.load(root / f"{name}.safetensors").apply(copy.deepcopy(base))
        for p, value in model.named_parameters():
            assert torch.equal(value, ranks[0]["results"][name]["params"][p]), (name, p)


def test_a_resumed_run_ends_where_the_uninterrupted_one_does(run):
    _, ranks = run
    for rank in ranks:
        resumed, whole = rank["results"]["resumed"]["params"], rank["results"]["sgd"]["params"]
        assert all(torch.equal(resumed[p], whole[p]) for p in whole)


def test_a_batch_smaller_than_the_processes_is_refused(run):
    _, ranks = run
    for rank in ranks:
        assert "batch of 1 examples" in rank["results"]["batch_of_one"]
        assert "2 processes" in rank["results"]["batch_of_one"]


def test_one_process_is_the_plain_trainer(base, single, tmp_path):
    config, sites, kv, kind = CASES["adamw"]
    model = copy.deepcopy(base)
    accelerated.train(model, masks(model, sites, kv=kv), data(kind), config, progress=False,
                      delta_path=tmp_path / "delta.safetensors")
    expected = single["adamw"][0]
    assert all(torch.equal(p, expected[n]) for n, p in model.named_parameters())
    assert (tmp_path / "delta.safetensors").is_file()


def test_the_launcher_reports_a_failing_process(tmp_path):
    (tmp_path / "fail.py").write_text("import os, sys\nsys.exit(3 if os.environ['RANK'] == '1' else 0)\n")
    with pytest.raises(RuntimeError, match="exited with"):
        accelerated.launch(tmp_path / "fail.py", processes=2, timeout=120)
    with pytest.raises(ValueError, match="processes must be >= 1"):
        accelerated.launch(tmp_path / "fail.py", processes=0)
