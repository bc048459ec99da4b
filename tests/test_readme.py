"""The README's examples run, in order, in an empty directory, and its lists match the registries."""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mechattr.cli import _parser

README = Path(__file__).resolve().parents[1] / "README.md"
# Long jobs, shortened for the suite by options appended to the command (the last of a repeated option
# wins). Each command is still checked to start, read its options, compute and write its outputs without a
# warning; what they compute is checked in test_cli and the modules' own tests. The main job runs its quick
# configuration (resumed from the suite's own quick run, which test_app checks stage by stage); the others
# take 2 examples, exact grids over the last layer, a circuit unpruned, 1 fine-tuning step on one seed
# against one baseline, budget curves of the neurons matched to 1 head, 1 step and 16 held-out examples (the
# suite's one `curves` run on SmolLM2: its numbers are checked here, as the export of `finetune --export`).
SHORTER = {"run": ["--quick"], "patch": ["--examples", "2", "--layers", "29"], "attribute": ["--examples", "2"],
           "verify": ["--top", "3", "--sample", "4"], "discover": ["--examples", "2", "--points", "3", "--no-prune"],
           "finetune": ["--steps", "1", "--seeds", "0", "--baselines", "random"],
           "curves": ["--heads", "1", "--units", "neuron", "--seeds", "3", "--draws", "1", "--baselines", "random",
                      "--steps", "1", "--rank-examples", "2", "--heldout-examples", "16"]}
# The README's torchrun line is the launch test_cli runs and checks against one process
# (test_distributed_patch_under_torchrun_equals_one_process): here its command line is checked, not run again.
TORCHRUN = ["torchrun", "--nproc-per-node", "2", "-m", "mechattr.cli", "patch", "--distributed"]
# The same for the Python examples: each replacement must find its text, so an edited README is still shortened.
PYTHON_REPLACE = {"n=8)": "n=2)", '"resid_pre", task.n_pos)': '"resid_pre", task.n_pos, layers=[28, 29])',
                  "slice(0, 16)": "slice(0, 2)", "steps=20": "steps=1",
                  'mechattr.grid(base, "z"))': 'mechattr.grid(base, "z", layers=[28, 29]))',  # ranked: 2 layers
                  "task_scores(base, heldout)": "task_scores(base, heldout.subset(slice(0, 8)))",
                  "task_scores(model, heldout)": "task_scores(model, heldout.subset(slice(0, 8)))"}


def blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def commands() -> list[list[str]]:
    """Each command line of the README's shell blocks, in order, continuation lines joined."""
    lines = []
    for block in blocks("sh"):
        lines += [shlex.split(line, comments=True) for line in block.replace("\\\n", " ").splitlines()]
    return [line for line in lines if line]


def test_the_readme_has_its_examples():
    names = [line[0] for line in commands()]
    assert names.count("mechattr") >= 7 and "torchrun" in names
    assert len(blocks("python")) == 2
    # A shell would expand an unquoted atp* against the files of the current directory.
    assert "--method atp*" not in README.read_text() and "--method 'atp*'" in README.read_text()


def test_each_command_reads_only_what_an_earlier_one_wrote():
    written = set()
    for line in commands():
        options = dict(zip(line, line[1:]))
        for flag in ("--effects", "--sites-from", "--estimate-from"):
            if flag in options:
                source = options[flag].removesuffix("/effects.safetensors")
                assert source in written, f"{' '.join(line)} reads {source}, which no earlier command writes"
        if "--out" in options:
            written.add(options["--out"])
        if line[:2] == ["mechattr", "run"]:
            written.add(f"runs/{options.get('--name', 'main')}")


def test_the_task_list_is_the_registry():
    from mechattr.tasks import TASKS

    bullet = next(p for p in README.read_text().split("\n- ") if p.startswith("**Tasks**"))
    assert re.findall(r"`tasks\.(\w+)`", bullet.split("in the registry")[0]) == list(TASKS)


def shortened(line: list[str]) -> list[str]:
    """A README `mechattr` command line's arguments with the suite's shorter options."""
    assert line[0] == "mechattr", f"no way to run the README's {line[0]!r} in the suite"
    return [*line[1:], *SHORTER.get(line[1], [])]


def shortened_python(code: str) -> str:
    for text, shorter in PYTHON_REPLACE.items():
        code = code.replace(text, shorter)
    return code


def test_the_python_examples_are_shortened_where_the_suite_expects():
    first, recipe = blocks("python")
    assert all(text in first + recipe for text in PYTHON_REPLACE)


# The README's Python examples and `mechattr` commands run in one process, in order, each as it would alone
# (its own globals, or `mechattr.cli.main` with its command line), so the model is loaded once instead of
# once per command (~20 s each on a test worker's one thread). What a command prints and every warning it
# raises (a fresh filter registry per command, so none is hidden by an earlier one) is collected per item.
RUNNER = """
import contextlib, io, json, sys, traceback, warnings
from mechattr.cli import main

results = []
for item in json.load(open(sys.argv[1])):
    out, err = io.StringIO(), io.StringIO()
    with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(out), \\
            contextlib.redirect_stderr(err):
        try:
            status = main(item["argv"]) if "argv" in item else exec(item["python"], {"__name__": "__main__"}) or 0
        except Exception:
            traceback.print_exc()
            status = 1
    err.writelines(f"{w.category.__name__}: {w.message}\\n" for w in caught)
    results.append({"status": status, "stdout": out.getvalue(), "stderr": err.getvalue()})
    json.dump(results, open(sys.argv[2], "w"))
    if status:
        break
"""


def run_in_one_process(items: list[dict], cwd: Path, env: dict) -> list[dict]:
    (cwd / "items.json").write_text(json.dumps(items))
    done = subprocess.run([sys.executable, "-c", RUNNER, "items.json", "results.json"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=3600)
    assert done.returncode == 0, done.stderr[-3000:]
    # Native code writes its warnings past Python's sys.stderr.
    assert "Warning" not in done.stderr, done.stderr[-3000:]
    return json.loads((cwd / "results.json").read_text())


def check_curves(out: Path, printed: str, model) -> None:
    """The shortened curves command's results: the neuron budget matched to one head, every method at it, the
    base model scored on the first 16 held-out examples."""
    from mechattr import Site
    from mechattr.finetune import masks, n_trained
    from mechattr.finetune.budgets import BudgetCurves
    from mechattr.finetune.evaluation import task_scores
    from mechattr.tasks import train_heldout

    curves = BudgetCurves.load(out)
    assert sorted((r["kind"], r["method"], r["seed"]) for r in curves.rows) == [
        ("neuron", m, 3) for m in ("atp", "exact", "random")]
    # --units neuron trains the neuron budget matched to one head's parameters (ranked, not trained): every
    # SmolLM2 neuron owns as many entries (its gate and up rows, its down column).
    (budget,) = curves.meta["budgets"]["neuron"]
    per_neuron = n_trained(masks(model, [Site("neuron", 0, neuron=0)]))
    per_head = n_trained(masks(model, [Site("z", 0, head=0)]))
    assert curves.meta["budgets"]["head"] == [] and abs(budget * per_neuron - per_head) <= per_neuron / 2
    assert f"neurons ranked exactly: AtP's top {2 * budget} (--shortlist)" in printed
    size = {r["method"]: r["n_trained"] for r in curves.rows}
    assert size["random"] == size["exact"] == size["atp"] == budget * per_neuron
    # The base model's held-out accuracy is that of the first 16 examples of greater_than's held-out split.
    heldout = train_heldout(model, "greater_than", n=512, seed=0, heldout=0.5)[1].subset(slice(0, 16))
    assert curves.base["heldout_accuracy"] == pytest.approx(task_scores(model, heldout)["accuracy"])
    assert curves.meta["n_heldout"] == 16
    assert all(line in printed for line in curves.verdicts()) and (out / "curves.png").is_file()


def check_export(run: Path, folder: Path, printed: str) -> None:
    """`finetune --export` trains on the checkpoint's own weights, and the folder it exports computes the
    trained model's logits under plain transformers."""
    import torch
    from transformers import AutoModelForCausalLM

    import mechattr
    from mechattr.finetune import Delta
    from mechattr.finetune.delta import CHECKPOINT

    assert "no compatibility mode" in printed
    delta = Delta.load(run / "delta.safetensors")
    assert delta.coordinates == CHECKPOINT == json.loads((run / "metrics.json").read_text())["coordinates"]
    tuned = delta.apply(mechattr.load_model("smollm2-135m", compatibility=False))
    exported = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    prompt = tuned.to_tokens("The Eiffel Tower is located in the city of")
    with torch.no_grad():
        assert float((exported(prompt).logits[:, -1] - tuned(prompt)[:, -1]).abs().max()) <= 1e-4


@pytest.mark.slow
def test_the_examples_run_in_order_without_warnings(tmp_path, quick_run, smollm2):
    # Each command uses the threads this process may use (every core, or a test worker's share).
    # `mechattr run` finds its stages done in its output directory (a copy of the quick run) and writes
    # the report from their records: the command and its resuming are what is checked here.
    run_out = tmp_path / "runs" / "main"
    shutil.copytree(quick_run[0], run_out)
    (run_out / "report.md").unlink()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "MPLBACKEND": "Agg"}
    lines = commands()
    assert lines[-1][:len(TORCHRUN)] == TORCHRUN and all(line[0] == "mechattr" for line in lines[:-1])
    args = _parser().parse_args(lines[-1][len(TORCHRUN) - 2:])
    assert args.distributed and args.out == "runs/ioi_2ranks"
    items = [{"python": shortened_python(code)} for code in blocks("python")]
    items += [{"argv": shortened(line)} for line in lines[:-1]]
    results = run_in_one_process(items, tmp_path, env)
    first, recipe, *ran = results
    assert len(results) == len(items) and all(result["status"] == 0 for result in results), (
        f"{items[len(results) - 1]}:\n{results[-1]['stderr'][-3000:]}")
    assert (tmp_path / "resid_pre.png").stat().st_size > 1000 and "Site(" in first["stdout"]
    assert (tmp_path / "tuned" / "model.safetensors").is_file() and "->" in recipe["stdout"]
    assert not any("Warning" in result["stderr"] for result in (first, recipe)), first["stderr"] + recipe["stderr"]
    for line, result in zip(lines[:-1], ran):
        assert "Warning" not in result["stderr"], f"{' '.join(line)}:\n{result['stderr'][-3000:]}"
        if line[:2] == ["mechattr", "run"]:
            assert "mechattr run:" not in result["stderr"], f"a stage was computed again:\n{result['stderr']}"
            assert (run_out / "report.md").is_file()
        out = dict(zip(line, line[1:])).get("--out")
        assert out is None or (tmp_path / out).is_dir(), f"{' '.join(line)} wrote no {out}"
    assert (tmp_path / "runs/ioi_check/verification.json").is_file()
    assert (tmp_path / "runs/ce_finetune/comparison.md").is_file()
    (curves,) = [result for line, result in zip(lines[:-1], ran) if line[1] == "curves"]
    check_curves(tmp_path / "runs/gt_curves", curves["stdout"], smollm2)
    (exported,) = [result for line, result in zip(lines[:-1], ran) if "--export" in line]
    check_export(tmp_path / "runs/ce_export", tmp_path / "runs/ce_model", exported["stdout"])
