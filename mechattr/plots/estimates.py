"""Plots for attribution and circuits (matplotlib only): a circuit as a layered graph, the faithfulness
curve, and attribution estimates against exact patching."""

from typing import Any

import matplotlib.pyplot as plt

from mechattr.verification import Verification
from mechattr.circuits import Circuit
from mechattr.sites import Site

__all__ = ["plot_circuit", "plot_faithfulness", "plot_estimate_vs_exact"]

_COLORS = {"q": "tab:blue", "k": "tab:green", "v": "tab:orange", "mlp_out": "tab:purple", "resid_post": "tab:gray"}


def _component(site: Site) -> tuple[str, int, int | None]:
    """The drawn node of a site: heads by (layer, head); q/k/v inputs are drawn at their head's node
    (on GQA models k/v index key/value heads and are drawn at that index)."""
    if site.kind == "embed":
        return "embed", -1, None
    if site.kind in ("z", "q", "k", "v"):
        return "head", site.layer, site.head
    if site.kind == "resid_post":
        return "logits", site.layer + 1, None
    return "mlp", site.layer, None


_BOTTOM = -1.2  # the row under the heads for the embedding, MLPs and logits


def _position(component: tuple[str, int, int | None]) -> tuple[float, float]:
    """Layered layout: x by layer (an MLP half a step after its layer's heads), heads at y = head, the
    embedding, MLPs and logits on a row below them."""
    kind, layer, head = component
    if kind == "head":
        return float(layer), float(head)
    return (layer + 0.5 if kind == "mlp" else float(layer)), _BOTTOM


def plot_circuit(circuit: Circuit, ax: Any = None) -> Any:
    """The circuit's nodes laid out by layer (x) and head (y); edge circuits draw their edges coloured by
    the receiver's input (q, k, v, MLP, logits). The model's shape comes from `circuit.meta`."""
    ax = ax or plt.subplots(figsize=(10, 5))[1]
    components = list(dict.fromkeys(_component(s) for s in circuit.nodes))
    n_heads = circuit.meta.get("n_heads") or 1 + max([c[2] for c in components if c[2] is not None], default=0)
    n_layers = circuit.meta.get("n_layers") or 1 + max([c[1] for c in components], default=0)
    for sender, receiver in ((e.sender, e.receiver) for e in circuit.edges):
        (x0, y0), (x1, y1) = _position(_component(sender)), _position(_component(receiver))
        ax.annotate("", (x1, y1), (x0, y0), arrowprops={"arrowstyle": "-|>", "alpha": 0.6, "shrinkA": 8,
                                                        "shrinkB": 8, "color": _COLORS.get(receiver.kind, "black")})
    for c in components:
        x, y = _position(c)
        label = {"head": f"{c[1]}.{c[2]}", "mlp": f"M{c[1]}", "embed": "emb", "logits": "out"}[c[0]]
        ax.scatter([x], [y], s=300, color="tab:red" if c[0] == "head" else "lightgray", edgecolor="black", zorder=3)
        ax.annotate(label, (x, y), ha="center", va="center", fontsize=7, zorder=4)
    ax.set_xticks(range(-1, n_layers + 1), ["embed", *map(str, range(n_layers)), "logits"], fontsize=7)
    ax.set_yticks([_BOTTOM, *range(n_heads)], ["MLP", *map(str, range(n_heads))])
    ax.set_xlim(-1.5, n_layers + 0.5)
    ax.set_ylim(_BOTTOM - 0.6, n_heads - 0.5)
    ax.set_xlabel("layer")
    ax.set_ylabel("head")
    ax.set_title(f"{circuit.level} circuit: {circuit.size} {circuit.level}s, faithfulness {circuit.faithfulness:.2f}")
    return ax


def plot_faithfulness(circuit: Circuit, ax: Any = None) -> Any:
    """Faithfulness of the top-n components by attribution against the fraction kept (log x), with the AUC;
    with the circuit's MIB measurement (`discover(mib=...)`), its signed curve and random floor too."""
    ax = ax or plt.subplots(figsize=(6, 4))[1]
    total = len(circuit.ranking)
    x = [max(n, 0.5) / total for n in circuit.sizes]  # n = 0 drawn at half a component on the log axis
    ax.plot(x, circuit.curve, marker="o", label="top-n by |estimate|")
    ax.axhline(1.0, color="gray", linestyle=":")
    title = f"faithfulness curve ({circuit.meta.get('method', '')}), AUC {circuit.auc:.3f}"
    mib = circuit.meta.get("mib")
    if mib:  # `discover(mib=...)`: MIB's shares, the signed order and the random floor
        ax.plot(mib["shares"], mib["cpr_curve"], marker="s", label="MIB, signed order")
        ax.plot(mib["shares"], mib["random_curve"], linestyle="--", color="gray", label="MIB, random rankings")
        ax.legend(fontsize=8)
        title += f"\nMIB CPR {mib['cpr']:.2f} (random {mib['random_cpr'][0]:.2f}), CMD {mib['cmd']:.2f}"
    ax.set_xscale("log")
    ax.set_xlabel(f"fraction of {circuit.level}s kept (of {total})")
    ax.set_ylabel("faithfulness (fraction of gap recovered)")
    ax.set_title(title, fontsize=10)
    return ax


def plot_estimate_vs_exact(verification: Verification, ax: Any = None) -> Any:
    """Estimated against exact effects of the checked sites (top ones and the stratified sample of the
    rest), with the identity line; the title leads with the interval on missed important sites."""
    ax = ax or plt.subplots(figsize=(5, 5))[1]
    est, exact = verification.estimated_effect, verification.exact.effect
    n_top = verification.n_top
    ax.scatter(exact[:n_top], est[:n_top], label=f"top {n_top}", color="tab:red")
    ax.scatter(exact[n_top:], est[n_top:], label="sample of the rest", color="tab:blue", alpha=0.7)
    lo = float(min(est.min(), exact.min()))
    hi = float(max(est.max(), exact.max()))
    ax.plot([lo, hi], [lo, hi], color="gray", linestyle="--", label="identity")
    ax.set_xlabel("exact effect (patching)")
    ax.set_ylabel(f"estimated effect ({verification.estimate.method})")
    low, high = verification.missed_ci
    ax.set_title(f"missed important sites {low:.0f} to {high:.0f} of {verification.n_rest}; "
                 f"Spearman {verification.spearman:.2f}", fontsize=10)
    ax.legend()
    return ax
