"""The main job end to end on the quick configuration: outputs agree with each other, reruns resume."""

import json
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch

import mechattr
from mechattr.app import DELTA_FILE, STAGE_DIR, RunConfig, run
from mechattr.app.config import CURVE_TASKS
from mechattr.finetune import Delta
from mechattr.finetune.budgets import BudgetCurves
from mechattr.storage import write_json
from mechattr.tasks import cause_effect


@pytest.mark.parametrize("changes, field, options", [
    ({"networks": ("asia", "asai")}, "networks", "sachs"),
    ({"component_network": "nope"}, "component_network", "asia"),
    ({"top_k": 0}, "top_k", "positive"),
    ({"candidates": 2, "top_k": 4}, "candidates", "top_k=4"),
    ({"networks": ("asia",), "reattribute": ("sachs",)}, "reattribute", "not in networks"),
    ({"component_kinds": ("attention",)}, "component_kinds", "attn_out"),
    ({"trials": 1}, "trials", "at least 2"),
    ({"component_layers": (-1,)}, "component_layers", "None (every layer)"),
    ({"examples": 7}, "examples", "even count >= 2 (whole pairs), got 7"),
    ({"curve_others": 0}, "curve_others", "at least 1"),
    ({"component_stride": 0}, "component_stride", "at least 1 (1: every layer)"),
    ({"curve_exact_examples": 0}, "curve_exact_examples", "None (every ranking example) or a positive count, got 0"),
])
def test_bad_config_names_the_field(changes, field, options):
    with pytest.raises(ValueError, match=rf"RunConfig\.{field}:.*{re.escape(options)}"):
        RunConfig(**changes)


def test_directory_of_another_configuration_is_refused(tmp_path):
    write_json(tmp_path / "config.json", vars(RunConfig.quick()), strict=True)
    with pytest.raises(ValueError, match=r"another configuration.*'top_k': \(4, 3\)"):
        run(RunConfig.quick(top_k=3), tmp_path, progress=False)


def test_the_knowledge_view_patches_every_other_layer_by_default_and_every_layer_in_full():
    assert RunConfig().knowledge_layers(30) == tuple(range(0, 30, 2))
    assert RunConfig().knowledge_layers(5) == (0, 2, 4)
    assert RunConfig.full().knowledge_layers(30) == tuple(range(30))
    assert RunConfig.quick().knowledge_layers(30) == (12, 24)  # named layers win over the stride
    assert RunConfig().networks == ("asia",) and RunConfig.full().networks == ("asia", "sachs")


def test_config_json_roundtrip():
    config = RunConfig.quick(seeds=(3, 1), lr=3e-4)
    assert RunConfig.from_json(json.dumps(vars(config))) == config


def test_exact_patching_ranks_curve_heads_on_fewer_examples_except_in_full():
    assert RunConfig().curve_exact_examples == 8 and RunConfig.full().curve_exact_examples is None
    # A run saved before the field existed ranked on every example: its directory is another configuration.
    saved = {k: v for k, v in vars(RunConfig()).items() if k != "curve_exact_examples"}
    assert RunConfig.from_json(json.dumps(saved)) == RunConfig(curve_exact_examples=None) != RunConfig()


def _report_cells(report: str, first_cell: str) -> list[str]:
    """The cells of the first report table row starting with `first_cell`."""
    line = next(x for x in report.splitlines() if x.startswith(f"| {first_cell} |"))
    return [c.strip() for c in line.strip("|").split("|")]


@pytest.mark.slow
def test_outputs_are_complete(quick_run):
    out, metrics = quick_run
    assert json.loads((out / "metrics.json").read_text()) == metrics
    assert all(log["status"] == "computed" for log in metrics["stages"].values())
    assert set(metrics["stages"]) == {"table_before_cancer", "knowledge_before", "sites", f"curves_{CURVE_TASKS[0]}",
                                      "delta", "export", "heldout", "knowledge_after", "table_after_cancer"}
    report = (out / "report.md").read_text()
    figures = re.findall(r"!\[[^]]*\]\(([^)]+)\)", report)
    assert len(figures) >= 5 and all((out / f).is_file() and (out / f).stat().st_size > 1000 for f in figures)
    loaded = mechattr.effects.load_effects(out / "effects" / "knowledge_S3_before")
    assert set(loaded) == {"attn_out"} and [s.layer for s in loaded["attn_out"].sites] == [12, 24]
    assert metrics["knowledge"]["before"]["S3"]["layers"] == [12, 24]
    assert "The output of each of layers 12, 24 is patched" in report
    assert loaded["attn_out"].clean_metric == pytest.approx(
        metrics["knowledge"]["before"]["S3"]["kinds"]["attn_out"]["clean_metric"], abs=1e-6)
    assert not (out / "finetune" / "precision.ckpt").exists()  # removed once the delta is saved
    # Both splits capped at the configuration's first examples (the full splits hold 62 and 28).
    assert metrics["sites"]["n_train"] == metrics["sites"]["n_heldout"] == RunConfig.quick().examples


@pytest.mark.slow
def test_report_tables_match_metrics(quick_run):
    out, metrics = quick_run
    report = (out / "report.md").read_text()
    table = metrics["tables"]["before"]["cancer"]
    for key, label in (("S1", "raw"), ("S3", "omit knowledge"), ("S6", "random")):
        tdr = table["settings"][key]["TDR"]
        expected = f"{tdr['mean']:.3f} [{tdr['ci_low']:.3f}, {tdr['ci_high']:.3f}]"
        assert _report_cells(report, f"{key} {label}")[1] == expected
    cak = table["attributions"]["CAK"]
    assert _report_cells(report, "CAK")[2:5] == [f"{cak['mean']:.3f}", f"{cak['sd']:.3f}",
                                                  f"[{cak['ci_low']:.3f}, {cak['ci_high']:.3f}]"]
    exact = next(e for e in metrics["curves"][CURVE_TASKS[0]]["summary"] if e["method"] == "exact")
    assert _report_cells(report, "head | 1 | exact")[4] == \
        f"{exact['accuracy']:.3f} [{exact['accuracy_low']:.3f}, {exact['accuracy_high']:.3f}]"


@pytest.mark.slow
def test_budget_curves_are_saved_scored_and_matched(quick_run, smollm2):
    out, metrics = quick_run
    name = CURVE_TASKS[0]
    curves = BudgetCurves.load(out / "curves" / name)
    assert curves.summary() == metrics["curves"][name]["summary"]
    heldout = curves.meta["n_heldout"]
    assert heldout == RunConfig.quick().curve_heldout and len(curves.base_correct) == heldout
    rows = {(r["method"], r["seed"]): r for r in curves.rows}
    assert {m for m, _ in rows} == {"exact", "atp", "random"}
    per_head = 576 * 64 * 2  # a query head's W_Q rows and W_O columns
    for seed in RunConfig.quick().curve_seeds:
        assert abs(rows[("random", seed)]["n_trained"] - rows[("exact", seed)]["n_trained"]) <= per_head
    verdicts = metrics["curves"][name]["verdicts"]
    assert len(verdicts) == 2 and all(re.search(r": (beats|loses|ties|undecided)", v) for v in verdicts)


@pytest.mark.slow
def test_attributions_follow_from_the_trials(quick_run):
    out, metrics = quick_run
    table = metrics["tables"]["before"]["cancer"]
    trials = pd.read_csv(out / "tables" / "cancer_before" / "trials.csv")
    tdr = trials.groupby("setting").TDR.mean()  # an independent read of the per-trial scores
    for key in ("S1", "S2", "S3", "S6"):
        assert table["settings"][key]["TDR"]["mean"] == pytest.approx(tdr[key], abs=1e-12)
    s = table["settings"]
    assert table["attributions"]["CAK"]["mean"] == pytest.approx(s["S1"]["TDR"]["mean"] - s["S3"]["TDR"]["mean"])
    assert table["attributions"]["MAD"]["mean"] == pytest.approx(s["S3"]["TDR"]["mean"] - s["S6"]["TDR"]["mean"])
    assert len(trials) == 6 * metrics["config"]["trials"]


def _heldout(model) -> mechattr.Task:
    """The quick run's held-out pairs, built independently of the run."""
    quick = RunConfig.quick()
    return cause_effect(model, "heldout", heldout=quick.heldout, seed=quick.seed).subset(slice(0, quick.examples))


@pytest.mark.slow
def test_delta_reproduces_heldout_accuracy(quick_run):
    out, metrics = quick_run
    model = Delta.load(out / DELTA_FILE).apply(mechattr.load_model("smollm2-135m"))
    heldout = _heldout(model)
    with torch.no_grad():
        last = model(heldout.clean)[:, -1]  # (n, vocab)
    right = (last.gather(-1, heldout.answer[:, None]) > last.gather(-1, heldout.wrong[:, None])).float().mean()
    assert float(right) == pytest.approx(metrics["delta"]["heldout"]["accuracy"], abs=1e-9)
    assert float(right) == pytest.approx(metrics["heldout"]["tuned"]["accuracy"], abs=1e-9)
    assert sorted(metrics["delta"]["sites"]) == sorted(metrics["sites"]["sites"])


@pytest.mark.slow
def test_rerun_recomputes_only_the_missing_stage(quick_run, smollm2, tmp_path):
    first_out, first = quick_run
    out = tmp_path / "copy"
    shutil.copytree(first_out, out)
    # The knowledge patching after fine-tuning: a late stage that reads the delta, and the quick run's cheapest.
    (out / "effects" / "knowledge_S3_after" / "effects.safetensors").unlink()
    delta_mtime = (out / DELTA_FILE).stat().st_mtime_ns
    again = run(RunConfig.quick(), out, progress=False, model=smollm2)
    assert {name for name, log in again["stages"].items() if log["status"] == "computed"} == {"knowledge_after"}
    assert (out / DELTA_FILE).stat().st_mtime_ns == delta_mtime
    strip = lambda m: {k: v for k, v in m.items() if k not in ("stages", "wall_s")}  # noqa: E731
    assert strip(again) == strip(first)
    record = json.loads((out / STAGE_DIR / "knowledge_after.json").read_text())
    assert record["result"] == first["knowledge"]["after"]


@pytest.mark.slow
def test_exported_folder_loads_with_plain_transformers(quick_run, smollm2):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out, metrics = quick_run
    e = metrics["export"]
    assert e["coordinates"] == "checkpoint" and e["max_logit_gap"] < 1e-3
    assert 0 < e["entries_changed"] <= e["n_trained"]
    model = AutoModelForCausalLM.from_pretrained(out / "export", dtype=torch.float32).eval()
    heldout = _heldout(smollm2)
    with torch.no_grad():
        last = model(heldout.clean).logits[:, -1]
    right = (last.gather(-1, heldout.answer[:, None]) > last.gather(-1, heldout.wrong[:, None])).float().mean()
    assert float(right) == pytest.approx(e["heldout"]["accuracy"], abs=1e-9)
    exported = load_file(str(out / "export" / "model.safetensors"))
    original = load_file(str(Path(mechattr.models.checkpoint_of("smollm2-135m")) / "model.safetensors"))
    assert sum(int((exported[k] != v).sum()) for k, v in original.items() if k in exported) == e["entries_changed"]
    assert set(original) - set(exported) <= {"lm_head.weight"}  # tied to the embedding, saved once


@pytest.mark.slow
def test_report_says_what_the_full_job_adds(quick_run, tmp_path):
    """A run at other sizes than `--full` says in its report what `--full` would add (figures redrawn in a copy)."""
    from dataclasses import asdict

    from mechattr.app.report import render

    out, metrics = quick_run
    shutil.copytree(out, tmp_path / "copy")
    config = {**asdict(RunConfig.quick()), "fast": False}
    report = render(tmp_path / "copy", {**metrics, "config": config})
    assert "> The input-level table on cancer; the component view at layers 12, 24; `mechattr run --full` adds " \
           "asia, sachs and patches every layer." in report
    assert "> Budget curves at 1 head(s) (no neuron budgets)" in report
    assert "sites ranked by AtP on 2 training examples and by exact patching on those;" in report
    # Both networks at every other layer, heads ranked exactly on one of the two ranking examples.
    other = {**config, "networks": ["asia", "sachs"], "component_layers": None, "component_stride": 2,
             "curve_exact_examples": 1}
    report = render(tmp_path / "copy", {**metrics, "config": other})
    assert "; `mechattr run --full` patches every layer.\n" in report
    assert "against random sites, heads ranked exactly on 1 of the 2 ranking examples; `mechattr run --full` runs " \
           "every budget (1-16 heads and matched neurons) on every task, against every baseline, ranked exactly on " \
           "every ranking example." in report
    views = {**other, "component_stride": 1}
    assert "component view at layers" not in render(tmp_path / "copy", {**metrics, "config": views})
    fewer = {**metrics["curves"][CURVE_TASKS[0]], "n_rank_exact": 1}
    report = render(tmp_path / "copy", {**metrics, "config": config, "curves": {CURVE_TASKS[0]: fewer}})
    assert "sites ranked by AtP on 2 training examples and by exact patching on the first 1;" in report
