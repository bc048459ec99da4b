"""Relevance patching (RelP; Jafari et al. 2025, arXiv 2508.21258): attribution patching with the
gradient replaced by layer-wise relevance propagation (LRP) coefficients, at AtP's cost (one source
forward, one base forward and backward).

In gradient terms, the LRP rules RelP uses for a transformer by default (its reference code's
`['LN-rule', 'Identity-rule', 'Half-rule']`) change the backward pass only; every forward value stays
the model's own:

- normalisation (every LayerNorm and RMSNorm: before and after attention and MLP, on queries and keys,
  final): the scale is held constant (LN-rule): `hook_scale` returns a detached copy;
- the MLP: its activation passes relevance on as if it were linear (identity rule: the gradient of
  act(x) becomes act(x) / x), and a gated MLP's product act(gate) x up sends half of it to each factor
  (half rule).

Attention keeps its gradient. The reference code's optional AH-rule (attention weights held constant)
is left out: it gives queries and keys no relevance at all, and on SmolLM2 IOI it dropped the heads
that act through later attention out of the top 10 (docs/verification.md).

`rules(model)` returns these as forward hooks for `runs.gradient_pass`. A model whose hooks cannot
carry a rule (a missing or read-only hook, an activation that is not `cfg.act_fn`) is refused with the
hook named, never estimated with a rule left out.
"""

import warnings
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from mechattr.models import hook_problem, is_bridge, model_name, model_shape

__all__ = ["rules", "applied", "scale_edits_allowed", "RelevanceError"]

_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": F.gelu, "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"), "silu": F.silu, "swish": F.silu, "relu": F.relu}
_EPS = 1e-6  # |x| below which act(x) / x is taken at x = eps (every activation here is smooth or 0 there)


class RelevanceError(ValueError):
    """The model has no hook (or activation) that a RelP rule needs; the message names it."""


@contextmanager
def scale_edits_allowed() -> Iterator[None]:
    """Silence TL's warning that a hook edited a norm's scale (it then rebuilds the norm's output from
    the hooked values, equal up to float rounding): the LN-rule edits it on purpose, on every norm."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="A forward hook edited hook_scale")
        yield


@contextmanager
def applied(model: Any, relevance: Sequence[tuple[str, Callable]]) -> Iterator[None]:
    """`relevance` (from `rules`) on `model` for the block's forwards and their backward; nothing when empty."""
    if not relevance:
        yield
        return
    with model.hooks(fwd_hooks=list(relevance)), scale_edits_allowed():
        yield


def _constant(act: Tensor, hook: Any) -> Tensor:
    """The forward value, with no gradient through it (LN-rule)."""
    return act.detach()


def _ratio(act_fn: Callable[[Tensor], Tensor], pre: Tensor) -> Tensor:
    """act(pre) / pre, the identity rule's slope, taken at eps where |pre| < eps."""
    safe = torch.where(pre.abs() < _EPS, torch.full_like(pre, _EPS), pre)
    return (act_fn(safe) / safe).detach()


def _mlp_rules(layer: int, act_fn: Callable[[Tensor], Tensor], gated: bool, name: str) -> list[tuple[str, Callable]]:
    """Hooks that record the MLP's live inputs and rewrite its output's backward (identity and half rules)."""
    live: dict[str, Tensor] = {}

    def keep(key):
        def hook(act, hook):
            live[key] = act
            return act
        return hook

    def post(act, hook):
        pre = live.pop("pre")
        ratio = _ratio(act_fn, pre)
        if gated:
            up = live.pop("up")
            value = act_fn(pre)
            if not torch.allclose(value * up, act, rtol=1e-4, atol=1e-5 * float(act.detach().abs().max()) + 1e-7):
                raise RelevanceError(f"relp: model {name}'s MLP {layer} is not act(gate) x up with act "
                                     "cfg.act_fn, so the half rule cannot be applied")
            surrogate = 0.5 * (value.detach() * up + pre * ratio * up.detach())
        else:
            surrogate = pre * ratio
        return act.detach() + (surrogate - surrogate.detach())

    hooks = [(f"blocks.{layer}.mlp.hook_pre", keep("pre"))]
    if gated:
        hooks.append((f"blocks.{layer}.mlp.hook_pre_linear", keep("up")))
    return hooks + [(f"blocks.{layer}.mlp.hook_post", post)]


def rules(model: Any) -> list[tuple[str, Callable]]:
    """The RelP rules of `model` as (hook name, forward hook) pairs, in the order they must be added
    (before any site probe at the same hooks); raises `RelevanceError` naming what a rule lacks."""
    from transformer_lens.model_bridge.generalized_components.normalization import NormalizationBridge

    cfg, name = model.cfg, model_name(model)
    if not is_bridge(model):
        raise RelevanceError(f"relp: model {name} is not a TransformerBridge, whose hooks carry the rules")
    hooks = model.hook_dict  # the bridge rebuilds it on every access
    scales = [h for h in hooks if h.endswith("hook_scale")]  # every norm: pre, post, query/key and final
    norms = sum(isinstance(m, NormalizationBridge) for m in model.modules())
    if len(scales) != norms:
        raise RelevanceError(f"relp: model {name} has {norms} normalisations but {len(scales)} hook_scale points, "
                             "so some normalisation scale cannot be held constant")
    attn_only = getattr(cfg, "attn_only", False)
    gated = bool(getattr(cfg, "gated_mlp", False))
    act_fn = None if attn_only else _ACTIVATIONS.get(str(getattr(cfg, "act_fn", None)))
    if not attn_only and act_fn is None:
        raise RelevanceError(f"relp: model {name}'s MLP activation {getattr(cfg, 'act_fn', None)!r} has no identity "
                             f"rule here; supported: {', '.join(_ACTIVATIONS)}")
    # The blocks are alike: the first one's hooks (and the final norm's) stand for every block's.
    needed = [h for h in scales if not h.startswith("blocks.") or h.startswith("blocks.0.")]
    if not attn_only:
        needed += ["blocks.0.mlp.hook_pre", "blocks.0.mlp.hook_post"]
        needed += ["blocks.0.mlp.hook_pre_linear"] if gated else []
    for hook in needed:
        with scale_edits_allowed():  # the probe adds a zero at the hook: an edit to TL
            problem = hook_problem(model, hook)
        if problem is not None:
            raise RelevanceError(f"relp: model {name} cannot carry its rules: {problem}")
    out = [(h, _constant) for h in scales]
    if not attn_only:
        for layer in range(model_shape(model)["n_layers"]):
            out += _mlp_rules(layer, act_fn, gated, name)
    return out
