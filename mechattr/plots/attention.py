"""Attention patterns: where a head reads from, the first thing to look at once patching has named it.

    heads = [site for site, _ in effects.top(4)]                  # z sites from a head grid
    fig = plot_attention(attention_patterns(model, task.clean, heads), heads, task.str_tokens)

On GQA models each query head has its own pattern (the key/value group is shared, the pattern is not),
so a `Site("z", layer, head=h)` reads the pattern of query head h.
"""

import math
from typing import Any, Sequence

import matplotlib.pyplot as plt
import torch
from jaxtyping import Float, Int
from matplotlib.figure import Figure
from torch import Tensor

from mechattr.forward import Forward
from mechattr.models import model_shape
from mechattr.sites import Site, hook_name

__all__ = ["attention_patterns", "plot_attention"]

_HEAD_KINDS = ("z", "q", "pattern")


def _check(heads: Sequence[Site], n_layers: int, n_heads: int) -> None:
    if not heads:
        raise ValueError("attention_patterns needs at least one head site")
    for site in heads:
        if site.kind not in _HEAD_KINDS or site.head is None:
            raise ValueError(f"{site} is not a query head; give sites of kind {', '.join(_HEAD_KINDS)} with a head")
        if not (0 <= site.layer < n_layers and 0 <= site.head < n_heads):
            raise ValueError(f"{site} is out of range: the model has {n_layers} layers of {n_heads} query heads")


@torch.no_grad()
def attention_patterns(model: Any, tokens: Int[Tensor, "n pos"], heads: Sequence[Site]
                       ) -> Float[Tensor, "head query key"]:
    """Each head's attention pattern on `tokens`, averaged over the prompts (rows sum to 1)."""
    shape = model_shape(model)
    _check(heads, shape["n_layers"], shape["n_heads"])
    hooks = {site: hook_name("pattern", site.layer) for site in heads}
    _, cache = Forward(model, tokens).cache(set(hooks.values()))
    return torch.stack([cache[hooks[site]][:, site.head].float().mean(0) for site in heads])


def plot_attention(patterns: Float[Tensor, "head query key"], heads: Sequence[Site],
                   str_tokens: Sequence[str] = (), ncols: int | None = None) -> Figure:
    """One [query, key] panel per head (darker = more attention), token labels on both axes."""
    if len(heads) != patterns.shape[0]:
        raise ValueError(f"{patterns.shape[0]} patterns but {len(heads)} heads")
    n_pos = patterns.shape[-1]
    if str_tokens and len(str_tokens) != n_pos:
        raise ValueError(f"{len(str_tokens)} token labels for patterns over {n_pos} positions")
    labels = [f"{t!r}"[1:-1][:12] for t in str_tokens] if str_tokens else [str(p) for p in range(n_pos)]
    ncols = ncols or min(len(heads), 3)
    nrows = math.ceil(len(heads) / ncols)
    side = max(3.0, 0.28 * n_pos + 1.2)
    fig, axes = plt.subplots(nrows, ncols, figsize=(side * ncols, side * nrows), layout="constrained",
                             squeeze=False)
    for ax, site, pattern in zip(axes.flat, heads, patterns):
        image = ax.imshow(pattern.numpy(), cmap="Blues", vmin=0.0, vmax=1.0)
        ax.set_title(f"head {site.layer}.{site.head}", fontsize=11)
        ax.set_xticks(range(n_pos), labels, rotation=90, fontsize=7)
        ax.set_yticks(range(n_pos), labels, fontsize=7)
        ax.set_xlabel("key (attended to)")
        ax.set_ylabel("query")
    for ax in axes.flat[len(heads):]:
        ax.remove()
    fig.colorbar(image, ax=list(axes.flat[: len(heads)]), shrink=0.6, label="attention (mean over prompts)")
    return fig
