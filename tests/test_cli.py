"""The command line writes what the library computes, and bad input ends in exit status 2 with a message
that names the problem (no traceback)."""

import argparse
import inspect
import json
import os
import re
import subprocess
import sys

import pytest
import torch

import mechattr
from mechattr.cli import main
from mechattr.cli.common import UsageError, kinds
from mechattr.finetune import Delta, masks
from mechattr.finetune.evaluation import task_scores
from mechattr.tasks import ioi, train_heldout

SMALL = ["--n", "2", "--sites", "z", "--layers", "28,29"]


def run(capsys, *argv: str) -> tuple[int, str]:
    status = main(list(argv))
    return status, capsys.readouterr().err


def test_site_kinds_are_deduplicated_in_order():
    assert kinds("z, mlp_out,z,,mlp_out") == ["z", "mlp_out"]
    with pytest.raises(UsageError, match="valid kinds: .*resid_pre"):
        kinds("z,heads")


def test_usage_errors_return_2_and_help_returns_0(capsys):
    assert main(["pach"]) == 2
    assert main(["--help"]) == 0
    assert main(["finetune", "--top-k", "3"]) == 2  # --sites-from and --out missing
    assert "required" in capsys.readouterr().err


@pytest.mark.parametrize("argv, needle", [
    (["attribute", "--method", "atp2", "--out", "x"], "valid: atp, atp*, ig"),
    (["attribute", "--method", "ig", "--steps", "0", "--out", "x"], "--steps must be a positive integer"),
    (["discover", "--level", "graph", "--out", "x"], "valid: node, edge"),
    (["discover", "--ablation", "shuffle", "--out", "x"], "valid: noise, mean, zero, resample"),
    (["discover", "--mib", "-1", "--out", "x"], "--mib must be >= 0"),
    (["finetune", "--sites-from", "nowhere", "--top-k", "0", "--out", "x"], "--top-k must be a positive integer"),
    (["finetune", "--sites-from", "nowhere", "--top-k", "2", "--out", "x"], "nowhere/effects.json is missing"),
    (["verify", "--effects", "nowhere", "--out", "x"], "nowhere/effects.json is missing"),
    (["curves", "--heads", "0,2", "--out", "x"], "--heads are positive head counts"),
    (["curves", "--heads", "1,two", "--out", "x"], "--heads must be comma-separated integers"),
    (["curves", "--baselines", "random,shuffled", "--out", "x"], "valid: random, bottom-k, lora, full"),
    (["curves", "--draws", "0", "--out", "x"], "--draws must be a positive integer"),
    (["curves", "--exact-examples", "0", "--out", "x"], "--exact-examples must be a positive integer"),
])
def test_bad_input_is_named_before_any_model_loads(capsys, tmp_path, monkeypatch, argv, needle):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(mechattr, "load_model", lambda *a, **k: pytest.fail("loaded a model for bad input"))
    status, err = run(capsys, *argv)
    assert status == 2 and needle in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()


@pytest.fixture(scope="module")
def estimate_dir(tmp_path_factory, smollm2):
    out = tmp_path_factory.mktemp("cli") / "estimate"
    assert main(["attribute", "--method", "atp", *SMALL, "--out", str(out)]) == 0
    return out


@pytest.mark.slow
def test_attribute_writes_what_attribute_computes(estimate_dir, smollm2):
    saved = mechattr.effects.load_effects(estimate_dir)["z"]
    task = ioi(smollm2, n=2, seed=0)
    expected = mechattr.attribute(smollm2, task, mechattr.grid(smollm2, "z", task.n_pos, layers=[28, 29]), "atp")
    assert saved.method == "atp" and saved.meta["n"] == 2 and saved.meta["task_spec"] == "ioi"
    torch.testing.assert_close(saved.per_example, expected.per_example, atol=1e-5, rtol=1e-5)
    assert (estimate_dir / "z.png").stat().st_size > 1000


@pytest.mark.slow
def test_verify_rebuilds_the_task_from_the_estimate(estimate_dir, smollm2, tmp_path, capsys):
    status, err = run(capsys, "verify", "--effects", str(estimate_dir / "effects.safetensors"), "--top", "3",
                      "--sample", "4", "--out", str(tmp_path))
    assert status == 0, err
    report = json.loads((tmp_path / "verification.json").read_text())
    estimate = mechattr.effects.load_effects(estimate_dir)["z"]
    expected = mechattr.verify(smollm2, ioi(smollm2, n=2, seed=0), estimate, top=3, sample=4)
    assert report["sites"] == [str(s) for s in expected.checked]
    assert report["spearman"] == pytest.approx(expected.spearman)
    assert report["missed"] == pytest.approx(expected.missed)
    exact = mechattr.effects.load_effects(tmp_path / "exact")["z"]
    reference = mechattr.patch(smollm2, ioi(smollm2, n=2, seed=0), list(expected.checked), progress=False)
    torch.testing.assert_close(exact.per_example, reference.per_example, atol=1e-4, rtol=1e-4)
    assert (tmp_path / "estimate_vs_exact.png").is_file()


@pytest.mark.slow
def test_verify_refuses_an_estimate_of_another_size(estimate_dir, tmp_path, capsys):
    status, err = run(capsys, "verify", "--effects", str(estimate_dir), "--n", "3", "--out", str(tmp_path))
    assert status == 2 and "2 examples" in err and "3" in err


@pytest.mark.slow
def test_discover_writes_a_circuit_whose_curve_ends_at_the_clean_run(tmp_path, capsys):
    status, err = run(capsys, "discover", "--n", "2", "--points", "3", "--no-prune", "--target", "0.5",
                      "--out", str(tmp_path))
    assert status == 0, err
    circuit = mechattr.circuits.Circuit.load(tmp_path)
    assert circuit.sizes[0] == 0 and circuit.sizes[-1] == len(circuit.ranking) == 301  # embed, 270 heads, 30 MLPs
    assert circuit.curve[0] == pytest.approx(0.0, abs=1e-4) and circuit.curve[-1] == pytest.approx(1.0, abs=1e-4)
    start = next(n for n, f in zip(circuit.sizes, circuit.curve) if f >= 0.5)
    assert circuit.size == start and circuit.faithfulness >= 0.5
    assert (tmp_path / "faithfulness.png").is_file() and (tmp_path / "circuit.png").is_file()


@pytest.mark.slow
def test_finetune_delta_reproduces_its_metrics_and_compare_matches_sizes(estimate_dir, smollm2, tmp_path, capsys):
    # 16 IOI prompts (11 trained on, 5 held out): every run is scored on every example (the README's
    # commands run the same on cause_effect's 90).
    status, err = run(capsys, "finetune", "--sites-from", str(estimate_dir), "--top-k", "2", "--n", "16",
                      "--steps", "1", "--compare", "--seeds", "0", "--baselines", "random,lora,full",
                      "--out", str(tmp_path))
    assert status == 0, err
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    delta = Delta.load(tmp_path / "delta.safetensors")
    top = mechattr.select(mechattr.effects.load_effects(estimate_dir)["z"], top_k=2, significant_only=False)
    assert metrics["sites"] == [str(s) for s in top] and delta.sites.sites == top.sites
    assert delta.n_trained == metrics["n_trained"] == sum(int(m.sum()) for m in masks(smollm2, top).values())

    tuned = delta.apply(mechattr.load_model("smollm2-135m"))
    scores = task_scores(tuned, train_heldout(tuned, "ioi", 16, 0, 0.3)[1])
    assert scores["accuracy"] == pytest.approx(metrics["trained"]["heldout_accuracy"])
    assert scores["metric"] == pytest.approx(metrics["trained"]["heldout_metric"], abs=1e-4)
    assert len(metrics["losses"]) == 1 and not (tmp_path / "checkpoint.pt").exists()

    table = json.loads((tmp_path / "comparison.json").read_text())
    rows = {r["method"]: r for r in table["rows"]}
    assert list(rows) == ["precision", "random", "lora", "full"]  # bottom-k: test_finetune_compare
    assert rows["precision"]["n_trained"] == delta.n_trained
    assert rows["precision"]["heldout_accuracy"] == pytest.approx(metrics["trained"]["heldout_accuracy"])
    per_head = delta.n_trained / 2
    assert abs(rows["random"]["n_trained"] - delta.n_trained) <= per_head
    assert rows["full"]["n_trained"] == sum(p.numel() for p in smollm2.parameters())
    assert "| precision |" in (tmp_path / "comparison.md").read_text()


# `mechattr curves` on SmolLM2 runs, and its numbers are checked, in test_readme (the README's curves command).


def test_curves_units_name_the_kinds_trained(capsys):
    from mechattr.cli.curves import _units

    parser = argparse.ArgumentParser()
    mechattr.cli.curves.add(parser.add_subparsers())
    parse = lambda *argv: _units(parser.parse_args(["curves", "--out", "x", *argv]))  # noqa: E731
    assert parse() == ("head", "neuron") and parse("--no-neurons") == parse("--units", "head") == ("head",)
    assert parse("--units", "neuron,head") == ("head", "neuron") and parse("--units", "neuron") == ("neuron",)
    with pytest.raises(UsageError, match="unknown unit kind 'heads'; valid: head, neuron"):
        parse("--units", "heads")
    with pytest.raises(UsageError, match="leaves no unit kind"):
        parse("--units", "neuron", "--no-neurons")


@pytest.mark.slow
def test_distributed_patch_under_torchrun_equals_one_process(tmp_path, smollm2):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
               "mechattr.cli", "patch", "--distributed", "--examples", "2", *SMALL[2:], "--out", str(tmp_path)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    saved = mechattr.effects.load_effects(tmp_path)["z"]
    task = ioi(smollm2, n=2, seed=0)
    expected = mechattr.patch(smollm2, task, mechattr.grid(smollm2, "z", task.n_pos, layers=[28, 29]), progress=False)
    torch.testing.assert_close(saved.per_example, expected.per_example, atol=1e-5, rtol=1e-5)


def test_version_is_the_installed_package_version(capsys):
    from importlib.metadata import version

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"mechattr {version('mechattr')}" == f"mechattr {mechattr.__version__}"


def test_effects_of_a_task_file_record_its_size_and_absolute_path(capsys, tmp_path, monkeypatch):
    template = "When {a} and {b} went to the store, {s} gave a drink to"
    rows = [{"clean": template.format(a=a, b=b, s=b), "corrupt": template.format(a=a, b=b, s=a), "answer": f" {a}",
             "wrong": f" {b}"} for a, b in (("Mary", "John"), ("John", "Mary"), ("Tom", "James"))]
    (tmp_path / "data").mkdir()
    task_file = tmp_path / "data" / "mine.jsonl"
    task_file.write_text("\n".join(json.dumps(row) for row in rows))
    monkeypatch.chdir(tmp_path / "data")
    status, err = run(capsys, "patch", "--task", "mine.jsonl", "--sites", "z", "--layers", "29", "--out", "../out")
    assert status == 0, err
    meta = json.loads((tmp_path / "out" / "effects.json").read_text())
    assert meta["n"] == 3 and meta["task_spec"] == str(task_file.resolve())
    monkeypatch.chdir(tmp_path)  # another folder: the relative name "mine.jsonl" would not resolve here
    status, err = run(capsys, "verify", "--effects", "out", "--kind", "z", "--top", "2", "--sample", "1", "--out", "check")
    assert status == 0, err
    checked = json.loads((tmp_path / "check" / "verification.json").read_text())
    # The saved effects are exact patching of the same file: rebuilt from its path, they are reproduced.
    assert len(checked["sites"]) == 3
    torch.testing.assert_close(torch.tensor(checked["exact"]), torch.tensor(checked["estimated"]), atol=1e-5, rtol=0)


COMMANDS = ("run", "patch", "attribute", "verify", "discover", "finetune", "curves", "export")


def help_of(capsys, command: str) -> str:
    assert main([command, "--help"]) == 0
    return capsys.readouterr().out


def option_help(text: str, option: str) -> str:
    """The help of `option` in `--help` output, on one line."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.lstrip().startswith(option + " ")
                 or line.strip() == option or line.lstrip().startswith(option + ","))
    block = [lines[start]]
    for line in lines[start + 1:]:
        if line.startswith("  -") or not line.startswith("   "):  # the next option, or the end of the list
            break
        block.append(line)
    return " ".join(" ".join(block).split())


def listed(text: str, what: str) -> list[str]:
    """The names of a "what: a, b or c" list, as `choices_help` writes it."""
    items = re.search(re.escape(what) + r": (.+?)(?: \(default: |$)", text).group(1)
    return [name for part in items.split(", ") for name in part.split(" or ")]


def test_help_lists_exactly_the_registries(capsys):
    from mechattr.attribution import METHODS
    from mechattr.circuits import LEVELS
    from mechattr.finetune.methods import BASELINES
    from mechattr.finetune.data import LOSSES
    from mechattr.finetune.masks import KV_MODES
    from mechattr.finetune.methods import FINETUNE_METHODS, TopSites
    from mechattr.interventions import INTERVENTIONS
    from mechattr.sites import KINDS
    from mechattr.tasks import METRICS, TASKS

    for command in ("patch", "attribute"):
        text = help_of(capsys, command)
        assert listed(option_help(text, "--sites"), "site kinds, of") == list(KINDS)
        assert listed(option_help(text, "--intervention"), "(see mechattr.interventions)") == \
            [name for name, cls in INTERVENTIONS.items() if cls.by_name_ok]
    for command in ("patch", "attribute", "verify", "discover", "finetune"):
        text = help_of(capsys, command)
        assert re.findall(r"(?:^--task TASK|;) (\w+): ", option_help(text, "--task")) == list(TASKS)
        assert re.findall(r"(?:^--metric METRIC|;) (\w+): ", option_help(text, "--metric")) == list(METRICS)
    assert listed(option_help(help_of(capsys, "attribute"), "--method"), "gradient estimate") == list(METHODS)
    discover = help_of(capsys, "discover")
    assert listed(option_help(discover, "--method"), "attribution used to rank") == list(METHODS)
    assert listed(option_help(discover, "--level"), "what a circuit is made of") == list(LEVELS)
    assert listed(option_help(discover, "--ablation"), "what ablated components get") == \
        [name for name, cls in INTERVENTIONS.items() if cls.ablates]
    finetune = help_of(capsys, "finetune")
    assert listed(option_help(finetune, "--kv").split(" (any:")[0], "GQA key/value groups") == list(KV_MODES)
    assert re.findall(r"(?:^--loss LOSS|;) (\w+): ", option_help(finetune, "--loss")) == list(LOSSES)
    assert listed(option_help(finetune, "--baselines"), "comma-separated methods to compare with") == \
        [name for name, cls in FINETUNE_METHODS.items() if cls is not TopSites]
    assert listed(option_help(help_of(capsys, "curves"), "--baselines"), "selected sites") == list(BASELINES)


def test_every_option_has_help_and_shows_its_default(capsys):
    from mechattr.cli import _parser

    commands = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert set(commands) == set(COMMANDS)
    for command, parser in commands.items():
        text = help_of(capsys, command)
        for action in parser._actions:
            if not action.option_strings or action.dest == "help":
                continue
            assert action.help, f"{command} {action.option_strings[0]} has no help"
            shown = option_help(text, action.option_strings[0])
            if action.default not in (None, False):
                assert f"(default: {action.default})" in shown, (command, shown)


def test_defaults_are_the_librarys(capsys):
    from mechattr.circuits import DEFAULT_ABLATION, discover
    from mechattr.cli import _parser
    from mechattr.finetune import TrainConfig
    from mechattr.verification import verify

    parse = _parser().parse_args
    v = parse(["verify", "--effects", "e", "--out", "o"])
    signature = inspect.signature(verify).parameters
    assert (v.top, v.sample, v.strata, v.threshold, v.level) == tuple(
        signature[name].default for name in ("top", "sample", "strata", "threshold", "level"))
    d = parse(["discover", "--out", "o"])
    signature = inspect.signature(discover).parameters
    assert signature["ablation"].default is None  # None: DEFAULT_ABLATION
    assert (d.method, d.ablation, d.target, d.points) == (signature["method"].default, DEFAULT_ABLATION.name,
                                                          signature["target"].default, signature["points"].default)
    f = parse(["finetune", "--sites-from", "e", "--top-k", "1", "--out", "o"])
    assert (f.steps, f.lr, f.batch_size, f.loss) == (TrainConfig.steps, TrainConfig.lr, TrainConfig.batch_size,
                                                     TrainConfig.loss)
