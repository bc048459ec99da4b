"""report.md and its figures for `mechattr run`, drawn from the run's metrics and saved effects.

Every number in report.md is read from the metrics dict that `run` also writes to metrics.json, so
the two agree; figures are PNGs under `figures/`, linked relatively.
"""

import json
import textwrap
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np

from mechattr import plots
from mechattr.app.config import FULL_CURVES, FULL_VIEWS
from mechattr.causal import ATTRIBUTIONS, SETTINGS
from mechattr.effects import Effects, load_effects
from mechattr.finetune.budgets import BudgetCurves, summary_markdown
from mechattr.plots.finetune import plot_budget_curves

__all__ = ["render"]

_FIGURES = "figures"
_CONTRASTS = {"S3": "names replaced by made-up words (knowledge removed)",
              "S2": "data values masked by '?' (data removed)"}


def _num(x: float | None, fmt: str = "{:.3f}") -> str:
    return "n/a" if x is None else fmt.format(x)


def _ci(s: dict, fmt: str = "{:.3f}") -> str:
    """`mean [low, high]`."""
    return f"{_num(s['mean'], fmt)} [{_num(s['ci_low'], fmt)}, {_num(s['ci_high'], fmt)}]"


def _msd(s: dict, fmt: str = "{:.3f}") -> str:
    return f"{_num(s['mean'], fmt)} ± {_num(s['sd'], fmt)}"


def _verdict(s: dict) -> str:
    if s["ci_low"] is None:
        return "no interval (one trial)"
    if s["ci_low"] > 0 or s["ci_high"] < 0:
        return f"interval excludes 0, {'positive' if s['mean'] > 0 else 'negative'}"
    return "interval includes 0"


# Figures -------------------------------------------------------------------------------------------------
def _tdr_figure(tables: dict[str, dict], path: Path) -> None:
    """Mean TDR per setting with 95% t intervals, before (and after) fine-tuning, with chance level."""
    networks = list(tables["before"])
    fig, axes = plt.subplots(1, len(networks), figsize=(5.2 * len(networks), 3.6), squeeze=False,
                             layout="constrained")
    x = np.arange(len(SETTINGS))
    for ax, network in zip(axes[0], networks):
        shown = [(w, tables[w][network]) for w in ("before", "after") if network in tables[w]]
        width = 0.8 / len(shown)
        for i, (when, table) in enumerate(shown):
            tdr = [table["settings"][k]["TDR"] for k in SETTINGS]
            mean = np.array([t["mean"] for t in tdr])
            low, high = (np.array([np.nan if t[k] is None else t[k] for t in tdr]) for k in ("ci_low", "ci_high"))
            ax.bar(x + (i - (len(shown) - 1) / 2) * width, mean, width, yerr=[mean - low, high - mean], capsize=3,
                   label=f"{when} fine-tuning", color=("tab:blue", "tab:orange")[i])
        ax.axhline(shown[0][1]["chance_tdr"], color="0.3", linestyle="--", linewidth=1,
                   label="chance (random |E| pairs)")
        ax.set_xticks(x, [f"{k}\n" + "\n".join(textwrap.wrap(s.label, 10)) for k, s in SETTINGS.items()], fontsize=7)
        ax.set_ylabel("TDR")
        ax.set_ylim(0, 1)
        ax.set_title(f"{network}: true discovery rate per setting (95% CI)", fontsize=10)
        ax.legend(fontsize=7, frameon=False, loc="upper right")
    plots.save(fig, path)


def _knowledge_figure(out: Path, against: str, path: Path) -> None:
    """Each site kind before and after fine-tuning side by side, on one colour scale."""
    grids = {when: load_effects(out / "effects" / f"knowledge_{against}_{when}") for when in ("before", "after")}
    panels = [(when, grids[when][kind]) for kind in grids["before"] for when in grids]
    fig = plots.grids([e for _, e in panels], value="effect", ncols=len(panels),
                      title=f"S1 vs {against}: {_CONTRASTS[against]}; effect of patching one layer's clean output")
    for ax, (when, e) in zip(fig.axes, panels):  # the panels come first, then the colour bar
        ax.set_title(f"{e.kind}, {when}", fontsize=10)
    plots.save(fig, path)


def _delta_figure(metrics: dict[str, Any], path: Path) -> None:
    """The kept precision run: held-out accuracy and training loss per step."""
    delta = metrics["delta"]
    fig, ax = plt.subplots(figsize=(5, 3.6), layout="constrained")
    ax.plot([s for s, _ in delta["history"]], [h["accuracy"] for _, h in delta["history"]], "o-",
            label="held-out accuracy")
    ax.plot(range(1, len(delta["losses"]) + 1), delta["losses"], color="0.5", label="training loss")
    ax.set_xlabel("step")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_title(f"precision run, seed {delta['seed']}", fontsize=10)
    ax.legend(fontsize=7, frameon=False)
    plots.save(fig, path)


def _figures(out: Path, metrics: dict[str, Any]) -> dict[str, str]:
    """Draw every figure; returns {name: relative path}."""
    names = ["tdr", "sites", "delta"] + [f"knowledge_{against}" for against in _CONTRASTS] + \
        [f"curves_{name}" for name in metrics["curves"]]
    paths = {name: f"{_FIGURES}/{name}.png" for name in names}
    _tdr_figure(metrics["tables"], out / paths["tdr"])
    for against in _CONTRASTS:
        _knowledge_figure(out, against, out / paths[f"knowledge_{against}"])
    ax = plots.heatmap(Effects.load(out / "effects" / "sites_atp"), value="effect",
                       title="AtP estimate: effect of each head on the cause-effect training pairs")
    plots.save(ax.figure, out / paths["sites"])
    _delta_figure(metrics, out / paths["delta"])
    for name in metrics["curves"]:
        plots.save(plot_budget_curves(BudgetCurves.load(out / "curves" / name)), out / paths[f"curves_{name}"])
    return paths


# Sections ------------------------------------------------------------------------------------------------
def _table_section(network: str, table: dict) -> list[str]:
    rows = table["rows_per_trial"]
    lines = [f"### {network} ({table['n_variables']} variables, {table['n_edges']} true edges; "
             f"{min(rows)}-{max(rows)} data rows in prompts of at most {table['max_tokens']} tokens; chance TDR "
             f"{table['chance_tdr']:.3f})", "",
             "| setting | TDR, mean [95% CI] | FDR | F1 | SHD | AUROC |", "|---|---|---|---|---|---|"]
    for key, s in SETTINGS.items():
        m = table["settings"][key]
        lines.append(f"| {key} {s.label} | {_ci(m['TDR'])} | {_msd(m['FDR'])} | {_msd(m['F1'])} | "
                     f"{_msd(m['SHD'], '{:.1f}')} | {_msd(m['AUROC'])} |")
    lines += ["", "| score | definition | mean | sd | 95% CI | reading |", "|---|---|---|---|---|---|"]
    for name, (a, b) in ATTRIBUTIONS.items():
        s = table["attributions"][name]
        lines.append(f"| {name} | TDR({a}) - TDR({b}) | {_num(s['mean'])} | {_num(s['sd'])} | "
                     f"[{_num(s['ci_low'])}, {_num(s['ci_high'])}] | {_verdict(s)} |")
    return lines + [""]


def _effects_rows(summary: dict, label: str) -> list[str]:
    return [f"| {label} | `{t['site']}` | {_ci(t, '{:+.3f}')} | {'yes' if t['significant'] else 'no'} |"
            for t in summary["top"]]


def _knowledge_section(knowledge: dict, paths: dict) -> list[str]:
    lines = []
    for against, what in _CONTRASTS.items():
        before, after = knowledge["before"][against], knowledge["after"][against]
        n = next(iter(before["kinds"].values()))["n_examples"]
        lines += [f"### S1 vs {against}: {what}", "",
                  f"{before['task']}: {n} prompts of {before['n_pos']} tokens (answers alternate Yes / No).", "",
                  "```", f"clean:     {before['clean_prompt']}", f"corrupted: {before['corrupt_prompt']}", "```", "",
                  "| model | kind | clean metric | corrupted metric | significant layers (BH 0.05) | "
                  "largest abs effect |", "|---|---|---|---|---|---|"]
        for when, block in (("before", before), ("after", after)):
            for kind, s in block["kinds"].items():
                lines.append(f"| {when} | {kind} | {s['clean_metric']:+.3f} | {s['corrupt_metric']:+.3f} | "
                             f"{s['n_significant']} of {s['n_sites']} | {s['max_abs_effect']:.3f} |")
        lines += ["", "Top layers (effect = patched minus corrupted metric, mean [95% t interval over examples]):",
                  "", "| model | site | effect | BH-significant |", "|---|---|---|---|"]
        for when, block in (("before", before), ("after", after)):
            for s in block["kinds"].values():
                lines += _effects_rows(s, when)
        lines += ["", f"![S1 vs {against}]({paths[f'knowledge_{against}']})", ""]
    return lines


def _sites_section(sites: dict, paths: dict) -> list[str]:
    lines = [f"Task `{sites['task']}`: {sites['n_train']} training and {sites['n_heldout']} held-out prompts "
             f"of {sites['n_pos']} tokens, split by pair. Metric: logit(answer) - logit(other answer). "
             f"Base model on the training prompts: clean {sites['clean_metric']:+.3f}, corrupted "
             f"(reversed question) {sites['corrupt_metric']:+.3f}.", "", "```",
             f"clean:     {sites['clean_prompt']}", f"corrupted: {sites['corrupt_prompt']}", "```", "",
             "Sites: every attention head's output (`z`) was ranked by AtP (one forward and backward pass); the "
             f"top {len(sites['candidates'])} were patched exactly (denoising), and the {len(sites['sites'])} "
             "of largest exact |effect| are the precision sites.", "",
             "| head | AtP estimate | exact effect [95% CI] | trained |", "|---|---|---|---|"]
    lines += [f"| `{c['site']}` | {c['atp']:+.4f} | {_ci(c, '{:+.4f}')} | {'yes' if c['chosen'] else ''} |"
              for c in sites["candidates"]]
    return lines + ["", f"![AtP per head]({paths['sites']})", ""]


def _delta_section(metrics: dict, paths: dict) -> list[str]:
    config, delta = metrics["config"], metrics["delta"]
    return [f"The heads above trained on the {metrics['sites']['n_train']} training pairs, {config['steps']} AdamW "
            f"steps of {config['batch_size']} at lr {config['lr']:g}, seed {delta['seed']}: {delta['n_trained']:,} "
            f"entries, loss {delta['losses'][0]:.3f} -> {delta['losses'][-1]:.3f}, held-out accuracy "
            f"{delta['heldout']['accuracy']:.3f} (metric {delta['heldout']['metric']:+.3f}). Whether such sites beat "
            "chance is what the budget curves (section 4) measure, on tasks large enough to tell.", "",
            f"![precision run]({paths['delta']})", ""]


def _export_section(metrics: dict) -> list[str]:
    e, model = metrics["export"], metrics["config"]["model"]
    return [f"The same run on the checkpoint's own weights (`load_model({model!r}, compatibility=False)`; "
            "compatibility mode folds LayerNorm into the weights), exported to `export/` as a Hugging Face "
            f"folder: `AutoModelForCausalLM.from_pretrained(\"{e['folder']}\")` gives the trained bridge's "
            f"last-position logits on the held-out prompts to within {e['max_logit_gap']:.2e}, and "
            f"{e['entries_changed']:,} entries differ from the original checkpoint ({e['n_trained']:,} were "
            f"trained). Held-out accuracy of the exported model with plain `transformers`: "
            f"{e['heldout']['accuracy']:.3f} (metric {e['heldout']['metric']:+.3f}). `export/delta.safetensors` "
            "holds the trained entries against the original checkpoint, keyed by Hugging Face names "
            "(docs/export.md).", ""]


def _curves_section(metrics: dict, paths: dict) -> list[str]:
    config = metrics["config"]
    lines = ["At each budget every method trains from a fresh base model on the same examples, steps and seeds: "
             "`exact` / `atp` train the top-k sites by exact patching / by AtP; `random` trains sites drawn at "
             "random (per seed and draw) until the parameter count is closest to `exact`'s; `bottom-k` the k "
             "sites of least estimated effect; `lora` adapts q_proj and v_proj with the rank closest to that "
             "count; `full` trains everything. Neuron budgets match the head budgets' parameter counts. "
             "Accuracy intervals are two-level bootstrap intervals over seeds and held-out examples (inside "
             "[0, 1]); precision - random is paired by seed and example. A verdict says `beats` or `loses` "
             "when its interval excludes 0, `ties` when it lies within ±0.05, else `undecided`, naming the end "
             "of the interval beyond ±0.05: more seeds and random draws narrow it (`mechattr run --full` runs 3 "
             "draws per seed). Collateral change: KL from the base model on unrelated text, and the other tasks' "
             "accuracy (docs/budget_curves.md).", ""]
    for name, c in metrics["curves"].items():
        meta = c["meta"]
        lines += [f"### {name}", "",
                  f"{c['n_train']} training and {c['n_heldout']} held-out examples, e.g. "
                  f"{c['clean_prompt']!r} -> {c['answer']!r} (not {c['wrong']!r}); sites ranked by AtP on "
                  f"{c['n_rank']} training examples and by exact patching on "
                  + (f"the first {c['n_rank_exact']}" if c["n_rank_exact"] < c["n_rank"] else "those")
                  + (f", neurons' exact ranking among the {c['n_neuron_shortlist']} with the largest AtP "
                     "estimates" if c["n_neuron_shortlist"] else "")
                  + f"; {config['curve_steps']} steps, seeds {meta['seeds']}, {meta['draws']} random draw(s) per "
                  f"seed. Base model held-out accuracy {c['base']['heldout_accuracy']:.3f}.", "",
                  summary_markdown(c["summary"]), "", f"![budget curves]({paths[f'curves_{name}']})", ""]
        lines += [f"- {v}" for v in c["verdicts"]] + [""]
        lines += [f"Note: {note}" for note in meta.get("notes", [])] + [""]
    return lines


def _after_section(metrics: dict) -> list[str]:
    h = metrics["heldout"]
    lines = ["The saved delta applied to a freshly loaded base model:", "",
             "| model | held-out accuracy | held-out metric | training accuracy |", "|---|---|---|---|",
             f"| base | {h['base']['accuracy']:.3f} | {h['base']['metric']:+.3f} | {h['base_train']['accuracy']:.3f} |",
             f"| precision-tuned | {h['tuned']['accuracy']:.3f} | {h['tuned']['metric']:+.3f} | "
             f"{h['tuned_train']['accuracy']:.3f} |", "",
             f"Exact effect of each trained head on the held-out prompts (clean vs reversed question: base "
             f"{h['sites_before']['clean_metric']:+.3f} vs {h['sites_before']['corrupt_metric']:+.3f}; tuned "
             f"{h['sites_after']['clean_metric']:+.3f} vs {h['sites_after']['corrupt_metric']:+.3f}):", "",
             "| head | before [95% CI] | after [95% CI] |", "|---|---|---|"]
    after = {t["site"]: t for t in h["sites_after"]["top"]}
    lines += [f"| `{t['site']}` | {_ci(t, '{:+.3f}')} | {_ci(after[t['site']], '{:+.3f}')} |"
              for t in h["sites_before"]["top"]]
    for network, table in metrics["tables"]["after"].items():
        before = metrics["tables"]["before"][network]
        lines += ["", f"Input-level attribution on {network}, before -> after (mean [95% CI]):", "",
                  "| row | before | after |", "|---|---|---|"]
        lines += [f"| TDR {k} {s.label} | {_ci(before['settings'][k]['TDR'])} | {_ci(table['settings'][k]['TDR'])} |"
                  for k, s in SETTINGS.items()]
        lines += [f"| {name} | {_ci(before['attributions'][name])} | {_ci(table['attributions'][name])} |"
                  for name in ATTRIBUTIONS]
    return lines + [""]


def _summary(metrics: dict) -> list[str]:
    lines = []
    for network, table in metrics["tables"]["before"].items():
        a = table["attributions"]
        lines.append(f"- **{network}, input level:** TDR(S1) {_ci(table['settings']['S1']['TDR'])} against chance "
                     f"{table['chance_tdr']:.3f}; " + "; ".join(f"{n} {_ci(a[n])} ({_verdict(a[n])})" for n in a) + ".")
    for against, what in _CONTRASTS.items():
        lines.append(f"- **Component level, {what}:** " + "; ".join(
            f"{when} fine-tuning, " + _component_reading(metrics["knowledge"][when][against]) for when in
            ("before", "after")) + ".")
    for name, c in metrics["curves"].items():
        lines.append(f"- **Budget curves, {name}** (base held-out accuracy {c['base']['heldout_accuracy']:.3f}, "
                     f"{c['n_heldout']} held-out examples, {len(c['meta']['seeds'])} seeds): "
                     + "; ".join(v.split(": ", 1)[1] if ": " in v else v for v in c["verdicts"]) + ".")
    for network, table in metrics["tables"]["after"].items():
        a = table["attributions"]
        lines.append(f"- **After fine-tuning, {network}:** " + "; ".join(
            f"{n} {_num(metrics['tables']['before'][network]['attributions'][n]['mean'])} -> {_ci(a[n])} "
            f"({_verdict(a[n])})" for n in ATTRIBUTIONS)
            + " (the table asks \"Question: Does A cause B? Answer:\", another wording than the training prompts).")
    return lines + ["", _reading(metrics), ""]


def _component_reading(block: dict) -> str:
    first = next(iter(block["kinds"].values()))  # every kind shares the task's baselines
    strongest = max((s["top"][0] for s in block["kinds"].values()), key=lambda t: abs(t["mean"]))
    return (f"the metric is {first['corrupt_metric']:+.3f} on the corrupted prompt and {first['clean_metric']:+.3f} "
            f"on the clean one; the strongest single layer, `{strongest['site']}`, moves it by "
            f"{strongest['mean']:+.3f} ({'significant' if strongest['significant'] else 'not significant'} after BH)")


def _reading(metrics: dict) -> str:
    """Which attribution intervals exclude 0, before and after fine-tuning."""
    found = {when: [f"{n} on {network} ({_num(s['mean'], '{:+.3f}')})"
                    for network, table in metrics["tables"][when].items()
                    for n, s in table["attributions"].items() if _verdict(s).startswith("interval excludes")]
             for when in ("before", "after")}
    parts = [f"{when} fine-tuning, " + (f"the interval of {', '.join(items)} excludes 0" if len(items) == 1 else
                                         f"the intervals of {', '.join(items)} exclude 0" if items else
                                         "no interval excludes 0") for when, items in found.items()]
    return ("Reading the input level: " + "; ".join(parts) + ". A score whose interval includes 0 is not evidence "
            "that the answers rest on (or ignore) knowledge or data; more trials narrow the intervals.")


def _differs(config: dict[str, Any], preset: dict[str, Any]) -> bool:
    """Whether the run's configuration (as saved) differs from `preset` in any setting it names."""
    return any((tuple(config[k]) if isinstance(v, tuple) else config[k]) != v for k, v in preset.items())


def _layers(metrics: dict[str, Any]) -> str:
    """The layers the component view patched, as "0, 2, ..., 28" when evenly spaced."""
    layers = next(iter(metrics["knowledge"]["before"].values()))["layers"]
    steps = {b - a for a, b in zip(layers, layers[1:])}
    if len(layers) > 3 and len(steps) == 1:
        return f"{layers[0]}, {layers[1]}, ..., {layers[-1]}"
    return ", ".join(map(str, layers))


def render(out: Path, metrics: dict[str, Any]) -> str:
    """Draw the figures into `out/figures/` and return the text of report.md."""
    paths = _figures(out, metrics)
    config = metrics["config"]
    lines = [f"# Knowledge or data? Causal attribution and precision fine-tuning of {config['model']}", ""]
    if config["fast"]:
        lines += ["> **Smoke-test configuration** (`--fast`): tiny sizes; the numbers show that the pipeline "
                  "runs, not what the model does.", ""]
    else:
        if _differs(config, FULL_CURVES):
            exact = config["curve_exact_examples"]
            fewer = exact is not None and exact < config["curve_rank_examples"]
            lines += [f"> Budget curves at {', '.join(map(str, config['curve_heads']))} head(s)"
                      + ("" if config["curve_neurons"] else " (no neuron budgets)")
                      + f" on {', '.join(config['curve_tasks'])}, against {', '.join(config['curve_baselines'])} "
                      "sites" + (f", heads ranked exactly on {exact} of the {config['curve_rank_examples']} ranking "
                                 "examples" if fewer else "")
                      + "; `mechattr run --full` runs every budget (1-16 heads and matched neurons) on every task, "
                      "against every baseline" + (", ranked exactly on every ranking example" if fewer else "")
                      + ".", ""]
        missing = [n for n in FULL_VIEWS["networks"] if n not in config["networks"]]
        adds = ([f"adds {', '.join(missing)}"] if missing else []) + \
            (["patches every layer"] if config["component_layers"] is not None or config["component_stride"] != 1
             else [])
        if adds:
            lines += [f"> The input-level table on {', '.join(config['networks'])}; the component view at layers "
                      f"{_layers(metrics)}; `mechattr run --full` {' and '.join(adds)}.", ""]
    shown = {k: config[k] for k in ("networks", "trials", "data_tokens", "component_network", "top_k", "steps",
                                    "seeds", "lr", "seed", "curve_tasks", "curve_heads", "curve_seeds")}
    lines += [f"Configuration: `{json.dumps(shown)}` (all of it in `config.json`); {metrics['threads']} torch "
              "thread(s).", "",
              "Attribution at two levels (the prompt, then the model's components), precision fine-tuning of the "
              "heads that carry a causal-direction question, and the same measurements after fine-tuning.", "",
              "## Summary", "", *_summary(metrics),
              "## 1. Input level: what the answer rests on", "",
              "Every ordered pair of variables is asked as \"Question: Does A cause B? Answer:\" after a context "
              "under one of six do-operators on the prompt (S1 raw, S2 data omitted, S3 names replaced by made-up "
              "words, S4 data relabelled in reversed causal order and scored against the relabelled graph, S5 the "
              "S4 prompt scored against the true graph, S6 made-up names and no data); the |E| pairs of highest "
              "log-odds of \" Yes\" over \" No\" form the predicted graph. "
              f"{config['trials']} trials per network (column order, data rows and made-up names redrawn); "
              "intervals are 95% t intervals over trials.", "", f"![TDR per setting]({paths['tdr']})", ""]
    for network, table in metrics["tables"]["before"].items():
        lines += _table_section(network, table)
    lines += ["## 2. Component level: which layers carry knowledge, which carry data", "",
              f"On {config['component_network']}: each prompt shows the two variables of one true edge and asks "
              "about it in both directions (answers \" Yes\" and \" No\"); the clean prompt is S1 and the "
              "corrupted one differs only where the do-operator acts, position by position. The output of each of "
              f"layers {_layers(metrics)} is patched from the clean run into the corrupted one (all positions "
              "at once).", "",
              *_knowledge_section(metrics["knowledge"], paths),
              "## 3. Precision fine-tuning for pairwise causal direction", "", *_sites_section(metrics["sites"], paths),
              *_delta_section(metrics, paths), *_export_section(metrics),
              "## 4. Budget curves: do attribution-selected sites beat chance?", "",
              *_curves_section(metrics, paths), "## 5. After fine-tuning", "", *_after_section(metrics),
              "## Files", "", "`metrics.json` (every number above), `config.json`, `stages/` (one record per stage), "
              "`tables/<network>_<before|after>/` (per-trial scores and pair scores), `effects/` (saved `Effects`: "
              "`mechattr.effects.load_effects(dir)`), `curves/<task>/curves.{md,json}` (every run, with per-example "
              "correctness: `BudgetCurves.load(dir)`), "
              "`export/` (the Hugging Face folder), `delta.safetensors` "
              "(`Delta.load(path).apply(mechattr.load_model(name))`), `figures/`.", "",
              "| stage | status in this run | seconds |", "|---|---|---|"]
    lines += [f"| {name} | {log['status']} | {log['seconds']:.0f} |" for name, log in metrics["stages"].items()]
    lines.append(f"| all stages | | {sum(log['seconds'] for log in metrics['stages'].values()):.0f} |")
    return "\n".join(lines) + "\n"
