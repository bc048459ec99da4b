"""The main job (`mechattr run`): attribute, precision fine-tune, re-attribute, report.

    metrics = run(RunConfig(), "runs/main")     # RunConfig.quick() for a smoke test

Stages, each recorded in `stages/<name>.json` (written last, atomically, after its output files); a
rerun into the same directory skips every stage whose record and files are complete:

1. `table_before_<network>`: the input-level causal attribution table of the base model (TDR per
   setting S1..S6; CAK, CAD, MAK, MAD with 95% t intervals over trials).
2. `knowledge_before`: component-level knowledge vs data on `component_network`: exact patching of
   the attention and MLP output of the layers `RunConfig.knowledge_layers` names (every other one by
   default) between S1 and S3 prompts (names replaced) and between S1 and S2 prompts (data values
   masked), see `causal.components`.
3. `sites`: the attention heads that carry the direction of a cause-effect question: AtP over every
   head on the training pairs of `tasks.cause_effect`, its top `candidates` verified by exact
   patching; the `top_k` of largest exact |effect| are the precision sites.
4. `curves_<task>`: budget curves on each of `curve_tasks` (generated tasks with room to improve):
   heads ranked by AtP on `curve_rank_examples` training examples and by exact patching on the
   first `curve_exact_examples` of them, neurons by AtP with its top ones verified by exact
   patching; then `finetune.budget_curves` of exact- and AtP-selected sites against random sites of
   the same parameter count and the other baselines, at every budget and seed, each scored on the
   held-out split and on the other tasks.
5. `delta`: precision fine-tuning of the stage-3 heads on the cause-effect pairs (first seed); its
   delta is kept for stages 7-8.
6. `export`: stage 5's run again on the checkpoint's own weights, exported as a Hugging Face folder
   (`export/`), loaded back with plain `transformers` and compared with the trained bridge.
7. `heldout`: the saved delta applied to a fresh base model and scored on held-out pairs, with the
   precision heads' exact effects there before and after.
8. `knowledge_after`, `table_after_<network>`: stages 2 and 1 on the fine-tuned model.

`report.md`, `figures/` and `metrics.json` are then written from the stage records.
"""

import json
import time
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch

from mechattr import causal
from mechattr.app.config import RunConfig
from mechattr.app.report import render
from mechattr.app.store import DELTA_FILE, EXPORT_DIR, RunDirectory
from mechattr.attribution import attribute
from mechattr.causal.components import AGAINST, knowledge_effects
from mechattr.causal.prompts import context, question
from mechattr.effects import Effects
from mechattr.finetune import Checkpoint, Delta, Evaluate, TopSites, TrainConfig, train
from mechattr.finetune.budgets import BudgetPlan, budget_curves
from mechattr.finetune.ranking import rank_units
from mechattr.finetune.evaluation import task_scores
from mechattr.finetune.export import INFO_FILE, export
from mechattr.models import checkpoint_of, load_model
from mechattr.patching import patch
from mechattr.runs import unpatched
from mechattr.selection import select
from mechattr.sites import grid
from mechattr.stats import summarize
from mechattr.storage import write_json, write_text
from mechattr.tasks import ioi
from mechattr.tasks.registry import train_heldout

__all__ = ["run", "effects_summary"]


def _summary(values: list[float]) -> dict[str, float]:
    """Mean, sd and 95% t interval of `values`, as a JSON-ready dict."""
    return vars(summarize(values))


def effects_summary(e: Effects, k: int = 5) -> dict[str, Any]:
    """Baselines and the k sites of largest |effect|, each with a 95% t interval of its per-example
    effect (patched minus unpatched metric) and its Benjamini-Hochberg significance."""
    significant = e.significant().flatten()
    index = {s: i for i, s in enumerate(e.sites)}
    per_example = (e.per_example - e.base).reshape(len(e.sites), -1)  # (sites, n)
    top = [{"site": str(s), **_summary(per_example[index[s]].tolist()), "significant": bool(significant[index[s]])}
           for s, _ in e.top(k)]
    return {"clean_metric": e.clean_metric, "corrupt_metric": e.corrupt_metric, "n_examples": e.n_examples,
            "n_sites": len(e.sites), "n_significant": int(significant.sum()),
            "max_abs_effect": float(e.effect.abs().max()), "top": top}


def _budget(model: Any, problem: causal.Problem, config: RunConfig) -> int:
    """The table's prompt budget: its longest prompt without data over the trials (the made-up names
    differ per trial), plus `data_tokens`; so every network's prompts hold about as much data."""
    longest = 0
    for trial in range(config.trials):
        for c in causal.conditions(problem, seed=(config.seed, trial)).values():
            stem, ending = question(*sorted(c.shown, key=len)[-2:])  # the longest question, as the table sizes it
            longest = max(longest, model.to_tokens(context(c, 0) + stem + ending).shape[1])
    return longest + config.data_tokens


def _table(run: RunDirectory, model: Any, network: str, when: str) -> tuple[dict[str, Any], list[str]]:
    config = run.config
    problem = causal.load(network, n_samples=config.n_samples, seed=config.seed)
    table = causal.attribution_table(model, problem, trials=config.trials, seed=config.seed,
                                     max_tokens=_budget(model, problem, config))
    files = [f"tables/{network}_{when}/trials.csv", f"tables/{network}_{when}/pairs.csv"]
    write_text(run.out / files[0], table.trials.to_csv(index=False))
    write_text(run.out / files[1], table.pairs.to_csv(index=False))
    n = len(problem.variables)
    wide = table.trials.pivot(index="trial", columns="setting", values="TDR")
    result = {"network": network, "n_variables": n, "n_edges": len(problem.edges),
              "chance_tdr": len(problem.edges) / (n * (n - 1)), "rows_per_trial": table.meta["rows_per_trial"],
              "max_tokens": table.meta["max_tokens"],
              "settings": {key: {m: vars(table.summary(key, m)) for m in ("TDR", "FDR", "F1", "SHD", "AUROC")}
                           for key in causal.SETTINGS},
              "attributions": {name: vars(table.attribution(name)) for name in causal.ATTRIBUTIONS},
              "tdr_per_trial": {key: wide[key].tolist() for key in causal.SETTINGS}}
    return result, files


def _knowledge(run: RunDirectory, model: Any, when: str) -> tuple[dict[str, Any], list[str]]:
    config = run.config
    layers = config.knowledge_layers(len(model.blocks))
    result, files, decode = {}, [], model.tokenizer.decode
    for against in AGAINST:
        task = run.knowledge_task(against)  # the same prompts before and after fine-tuning
        effects = knowledge_effects(model, run.component_problem, config.component_kinds, against, run.knowledge_config,
                                    layers=layers, progress=run.progress, per_position=False, task=task)
        files += run.save_effects(f"knowledge_{against}_{when}", effects, task=task.name, against=against,
                                  problem=config.component_network, stage=when)
        result[against] = {"task": task.name, "n_pos": task.n_pos, "clean_prompt": decode(task.clean[0, 1:]),
                           "corrupt_prompt": decode(task.corrupt[0, 1:]), "layers": list(layers),
                           "kinds": {e.kind: effects_summary(e) for e in effects}}
    return result, files


def _sites(run: RunDirectory) -> tuple[dict[str, Any], list[str]]:
    config, model, task = run.config, run.base, run.task("train")
    runs = unpatched(model, task)  # shared by the estimate and the exact check of its shortlist
    estimate = attribute(runs, grid(model, "z"), "atp")
    shortlist = [site for site, _ in estimate.top(config.candidates)]
    exact = patch(runs, shortlist, progress=run.progress)
    files = run.save_effects("sites_atp", [estimate], task=task.name) + run.save_effects("sites_exact", [exact],
                                                                                         task=task.name)
    chosen = select(exact, top_k=config.top_k, significant_only=False)
    per_example = (exact.per_example - exact.base).tolist()  # (candidates, n)
    atp = dict(zip(estimate.sites, estimate.effect.flatten().tolist()))
    candidates = [{"site": str(s), "atp": atp[s], **_summary(per_example[i]), "chosen": s in chosen}
                  for i, s in enumerate(exact.sites)]
    heldout = run.task("heldout")
    return {"task": task.name, "n_train": task.n_examples, "n_heldout": heldout.n_examples, "n_pos": task.n_pos,
            "clean_prompt": model.tokenizer.decode(task.clean[0, 1:]),
            "corrupt_prompt": model.tokenizer.decode(task.corrupt[0, 1:]),
            "clean_metric": exact.clean_metric, "corrupt_metric": exact.corrupt_metric,
            "candidates": candidates, "sites": [str(s) for s in chosen]}, files


def _train_config(config: RunConfig) -> TrainConfig:
    return TrainConfig(lr=config.lr, steps=config.steps, batch_size=config.batch_size, seed=config.seeds[0])


def _curve_split(run: RunDirectory, name: str) -> tuple[Any, Any]:
    train_task, heldout = train_heldout(run.base, name, n=0, seed=run.config.seed, heldout=0.5)
    cap = run.config.curve_heldout
    return train_task, heldout if cap is None else heldout.subset(slice(0, cap))


def _curves(run: RunDirectory, name: str) -> tuple[dict[str, Any], list[str]]:
    config, model = run.config, run.base
    train_task, heldout = _curve_split(run, name)
    ranked = train_task.subset(slice(0, config.curve_rank_examples))
    rankings, neurons = rank_units(model, ranked, config.curve_heads, config.curve_neurons,
                                   exact_examples=config.curve_exact_examples, progress=run.progress)
    files = []
    for kind, pair in rankings.items():
        for ranking, effects in pair.items():
            files += run.save_effects(f"curves_{name}_{kind}_{ranking}", [effects], task=train_task.name)
    cap = config.curve_others
    others = [_curve_split(run, other)[1].subset(slice(0, cap)) for other in config.curve_tasks if other != name]
    others.append(ioi(model, n=min(64, cap), seed=config.seed))
    plan = BudgetPlan(heads=config.curve_heads, neurons=neurons,
                      seeds=config.curve_seeds, draws=config.curve_draws, baselines=config.curve_baselines,
                      config=TrainConfig(lr=config.lr, steps=config.curve_steps, batch_size=config.batch_size))
    curves = budget_curves(lambda: load_model(config.model), train_task, heldout, rankings, plan, others=others,
                           progress=run.progress)
    curves.save(run.out / "curves" / name)
    return ({"task": name, "meta": curves.meta, "base": curves.base, "summary": curves.summary(),
             "verdicts": curves.verdicts(), "n_train": train_task.n_examples, "n_heldout": heldout.n_examples,
             "n_rank": ranked.n_examples, "n_rank_exact": rankings["head"]["exact"].n_examples,
             "n_neuron_shortlist": len(rankings["neuron"]["exact"].sites) if "neuron" in rankings else 0,
             "clean_prompt": model.tokenizer.decode(train_task.clean[0, 1:]),
             "answer": model.tokenizer.decode(train_task.answer[:1]),
             "wrong": model.tokenizer.decode(train_task.wrong[:1])},
            files + [f"curves/{name}/curves.json", f"curves/{name}/curves.md"])


def _delta(run: RunDirectory) -> tuple[dict[str, Any], list[str]]:
    config = run.config
    model = load_model(config.model)
    setup = TopSites(run.effects("sites_exact"), k=config.top_k).build(model, config.seeds[0], None)
    history = Evaluate(run.task("heldout"), every=max(1, config.steps // 4))
    checkpoint = run.out / "finetune" / "precision.ckpt"  # an interrupted run resumes from here
    result = train(setup.model, setup.masks, run.task("train"), _train_config(config),
                   [history, Checkpoint(checkpoint, every=max(1, config.steps // 4))],
                   resume=checkpoint if checkpoint.is_file() else None, progress=run.progress,
                   sites=setup.sites, base_model=config.model)
    result.delta.save(run.out / DELTA_FILE)
    checkpoint.unlink()
    return {"seed": config.seeds[0], "n_trained": result.n_trained, "losses": list(result.losses),
            "sites": [str(s) for s in setup.sites], "history": [[step, s] for step, s in history.history],
            "heldout": task_scores(model, run.task("heldout"))}, [DELTA_FILE]


def _export(run: RunDirectory) -> tuple[dict[str, Any], list[str]]:
    """The delta stage's run again on the checkpoint's own weights (compatibility mode folds LayerNorm into
    them), exported as a Hugging Face folder, then loaded back with plain `transformers`."""
    from transformers import AutoModelForCausalLM

    config = run.config
    model = load_model(config.model, compatibility=False)
    setup = TopSites(run.effects("sites_exact"), k=config.top_k).build(model, config.seeds[0], None)
    result = train(setup.model, setup.masks, run.task("train"), _train_config(config), progress=run.progress,
                   sites=setup.sites, base_model=config.model)
    folder = export(model, run.out / EXPORT_DIR, delta=result.delta)
    loaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    heldout = run.task("heldout")
    with torch.no_grad():
        gap = float((model(heldout.clean)[:, -1] - loaded(heldout.clean).logits[:, -1]).abs().max())
    # Both as transformers loads them: file keys differ between checkpoints (GPT-NeoX's embed_out is lm_head).
    original = dict(AutoModelForCausalLM.from_pretrained(checkpoint_of(config.model),
                                                         dtype=torch.float32).named_parameters())
    changed = sum(int((p != original[k]).sum()) for k, p in loaded.named_parameters())
    return {"folder": EXPORT_DIR, "coordinates": result.delta.coordinates, "n_trained": result.n_trained,
            "entries_changed": changed, "max_logit_gap": gap, "heldout": task_scores(loaded, heldout),
            "sites": [str(s) for s in setup.sites]}, \
        [f"{EXPORT_DIR}/{f}" for f in ("config.json", "model.safetensors", DELTA_FILE, INFO_FILE)]


def _heldout(run: RunDirectory) -> tuple[dict[str, Any], list[str]]:
    heldout, train_task = run.task("heldout"), run.task("train")
    sites = list(Delta.load(run.out / DELTA_FILE).sites)
    before, after = (patch(m, heldout, sites, progress=run.progress) for m in (run.base, run.tuned))
    files = run.save_effects("heldout_sites_before", [before], task=heldout.name)
    files += run.save_effects("heldout_sites_after", [after], task=heldout.name)
    return {"task": heldout.name, "base": task_scores(run.base, heldout), "tuned": task_scores(run.tuned, heldout),
            "base_train": task_scores(run.base, train_task), "tuned_train": task_scores(run.tuned, train_task),
            "sites_before": effects_summary(before, k=len(sites)),
            "sites_after": effects_summary(after, k=len(sites))}, files


def run(config: RunConfig, out: str | Path, progress: bool = True, model: Any | None = None) -> dict[str, Any]:
    """Run every stage not already complete in `out`, then write report.md, figures/ and metrics.json.

    `model` is an already loaded `mechattr.load_model(config.model)` (saves loading it again; it is not
    changed). Returns the metrics written to metrics.json. A directory holding a run of another
    configuration is refused. The run uses torch's thread count (`torch.set_num_threads`, the command
    line's `--threads`), recorded in the metrics.
    """
    return _run_all(config, Path(out), progress, model)


def _run_all(config: RunConfig, out: Path, progress: bool, model: Any | None) -> dict[str, Any]:
    start = time.perf_counter()
    saved = out / "config.json"
    if saved.is_file() and RunConfig.from_json(saved.read_text()) != config:
        other = RunConfig.from_json(saved.read_text())
        differ = {f.name: (getattr(other, f.name), getattr(config, f.name)) for f in fields(RunConfig)
                  if getattr(other, f.name) != getattr(config, f.name)}
        raise ValueError(f"{out} holds a run of another configuration (saved vs given: {differ}); "
                         "choose another output directory or delete it")
    write_json(saved, asdict(config), strict=True)
    r = RunDirectory(config, out, progress, model)
    metrics: dict[str, Any] = {"config": asdict(config), "tables": {"before": {}, "after": {}}, "knowledge": {}}
    for network in config.networks:
        metrics["tables"]["before"][network] = r.stage(f"table_before_{network}",
                                                       lambda n=network: _table(r, r.base, n, "before"))
    metrics["knowledge"]["before"] = r.stage("knowledge_before", lambda: _knowledge(r, r.base, "before"))
    metrics["sites"] = r.stage("sites", lambda: _sites(r))
    metrics["curves"] = {name: r.stage(f"curves_{name}", lambda n=name: _curves(r, n)) for name in config.curve_tasks}
    metrics["delta"] = r.stage("delta", lambda: _delta(r))
    metrics["export"] = r.stage("export", lambda: _export(r))
    metrics["heldout"] = r.stage("heldout", lambda: _heldout(r))
    metrics["knowledge"]["after"] = r.stage("knowledge_after", lambda: _knowledge(r, r.tuned, "after"))
    for network in config.reattribute:
        metrics["tables"]["after"][network] = r.stage(f"table_after_{network}",
                                                      lambda n=network: _table(r, r.tuned, n, "after"))
    metrics["stages"] = r.log
    metrics["threads"] = torch.get_num_threads()
    write_text(out / "report.md", render(out, metrics))
    metrics["wall_s"] = time.perf_counter() - start  # this call, report included; each stage's time is in `stages`
    write_json(out / "metrics.json", metrics, strict=True)
    return json.loads((out / "metrics.json").read_text())
