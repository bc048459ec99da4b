"""Fine-tuning figures: the training loss, the comparison of methods (held-out accuracy against
collateral change), and budget curves (accuracy against trained parameters, precision - random)."""

from typing import Any, Sequence

import matplotlib.pyplot as plt

from mechattr.finetune.budgets import BudgetCurves
from mechattr.finetune.compare import ComparisonTable

__all__ = ["plot_losses", "plot_comparison", "plot_budget_curves"]


def plot_losses(losses: Sequence[float], ax: Any = None, label: str | None = None) -> Any:
    """Training loss per optimizer step."""
    ax = ax or plt.subplots(figsize=(6, 4))[1]
    ax.plot(range(1, len(losses) + 1), losses, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    if label:
        ax.legend()
    return ax


def plot_comparison(table: ComparisonTable) -> Any:
    """Two panels sharing the methods: held-out accuracy (mean ± sd over seeds, the base model dashed)
    and KL from the base model on unrelated text (log scale). Returns the figure."""
    summary = table.summary()
    names = [s["method"] for s in summary]
    fig, (acc, kl) = plt.subplots(1, 2, figsize=(10, 0.5 * len(names) + 2), sharey=True)
    y = range(len(names))
    acc.barh(y, [s["heldout_accuracy"] for s in summary], xerr=[s["heldout_accuracy_sd"] for s in summary],
             color="tab:blue", capsize=3)
    acc.axvline(table.base["heldout_accuracy"], color="gray", linestyle="--", label="base model")
    acc.set_yticks(list(y), names)
    acc.set_xlim(0, 1)
    acc.set_xlabel("held-out accuracy")
    acc.legend(loc="lower right")
    kl.barh(y, [max(s["kl_unrelated"], 1e-8) for s in summary], xerr=[s["kl_unrelated_sd"] for s in summary],
            color="tab:red", capsize=3)
    kl.set_xscale("log")
    kl.set_xlabel("KL from base on unrelated text (nats)")
    acc.invert_yaxis()
    seeds = table.meta.get("seeds", [])
    fig.suptitle(f"{table.meta.get('data', '')}: {len(seeds)} seed(s), held-out {table.meta.get('heldout', '')}")
    fig.tight_layout()
    return fig


_STYLE = {"exact": ("tab:blue", "o"), "atp": ("tab:cyan", "s"), "random": ("tab:gray", "^"),
          "bottom-k": ("tab:brown", "v"), "lora": ("tab:green", "D"), "full": ("black", "*")}
_DASH = {"head": "-", "neuron": ":", "all": ""}


def plot_budget_curves(curves: BudgetCurves) -> Any:
    """Two panels over trained parameters (log axis): held-out accuracy per method and unit kind (heads
    solid, neurons dotted) with 95% bootstrap intervals, the base model dashed; and precision - random
    (paired by seed and example) per budget with its interval, the tie band shaded. Returns the figure."""
    summary = curves.summary()
    fig, (acc, diff) = plt.subplots(1, 2, figsize=(12, 4.5))
    for kind in ("head", "neuron", "all"):
        for method, (colour, marker) in _STYLE.items():
            points = sorted((e["n_trained"], e) for e in summary if (e["kind"], e["method"]) == (kind, method))
            if not points:
                continue
            x = [p for p, _ in points]
            y = [e["accuracy"] for _, e in points]
            err = [[e["accuracy"] - e["accuracy_low"] for _, e in points],
                   [e["accuracy_high"] - e["accuracy"] for _, e in points]]
            acc.errorbar(x, y, yerr=err, color=colour, marker=marker, linestyle=_DASH[kind], capsize=3,
                         label=f"{method} ({kind}s)" if kind != "all" else method)
    acc.axhline(curves.base["heldout_accuracy"], color="gray", linestyle="--", label="base model")
    acc.set_xscale("log")
    acc.set_ylim(0, 1)
    acc.set_xlabel("trained parameters")
    acc.set_ylabel("held-out accuracy (95% CI)")
    acc.legend(fontsize=7, ncol=2, loc="lower right")
    margin = curves.meta.get("tie_margin", 0.05)
    diff.axhspan(-margin, margin, color="0.9", label=f"tie band ±{margin:g}")
    diff.axhline(0, color="gray", linewidth=0.8)
    for kind in ("head", "neuron"):
        for method in ("exact", "atp"):
            points = sorted((e["n_trained"], e) for e in summary
                            if (e["kind"], e["method"]) == (kind, method) and "minus_random" in e)
            if not points:
                continue
            colour, marker = _STYLE[method]
            y = [e["minus_random"] for _, e in points]
            err = [[e["minus_random"] - e["minus_random_low"] for _, e in points],
                   [e["minus_random_high"] - e["minus_random"] for _, e in points]]
            diff.errorbar([p for p, _ in points], y, yerr=err, color=colour, marker=marker, linestyle=_DASH[kind],
                          capsize=3, label=f"{method} - random ({kind}s)")
    diff.set_xscale("log")
    diff.set_xlabel("trained parameters")
    diff.set_ylabel("accuracy difference, paired (95% CI)")
    diff.legend(fontsize=7, loc="best")
    meta = curves.meta
    fig.suptitle(f"{meta.get('task', '')}: {len(meta.get('seeds', []))} seeds, {meta.get('draws')} random draws, "
                 f"held-out n = {len(curves.base_correct)}")
    fig.tight_layout()
    return fig
