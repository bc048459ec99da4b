"""Fine-tuning figures: the training loss, and the comparison of methods (held-out accuracy against
collateral change)."""

from typing import Any, Sequence

import matplotlib.pyplot as plt

from mechattr.finetune.compare import ComparisonTable

__all__ = ["plot_losses", "plot_comparison"]


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
