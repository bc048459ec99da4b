"""Attribution: gradient estimates of activation patching for every site at once.

All methods estimate what `patch` measures, the metric under do(site := intervention(base, source)),
as the base run's metric plus a first-order change, from one source forward and one base forward and
backward shared by every site:

- "atp": attribution patching (Nanda 2023; Syed et al. 2023), change = (a_new - a_base) . d metric / d a.
- "atp*": AtP* (Kramar et al. 2024). Query and key sites recompute the attention softmax exactly and
  linearise only after the pattern (the QK fix). GradDrop then repeats the backward pass once per layer
  l with the gradient through block l's outputs dropped; the magnitude is the mean over the other layers
  of |estimate| (their Eq. 11), which exposes effects that cancel between direct and indirect paths.
  GradDrop's magnitude is unsigned, so the signed change takes its sign from the QK-fixed estimate.
- "ig": integrated gradients along the path from the base run's token embeddings to the source run's
  (EAP-IG, Hanna et al. 2024), a left Riemann sum of `steps` points, so steps=1 is exactly AtP.
"""

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechattr.effects import Effects
from mechattr.interventions import Denoise, Intervention, Mean, Noise, Resample, Zero
from mechattr.sites import KINDS, Grid, Site, model_shape, validate
from mechattr.tasks import Task

__all__ = ["attribute", "METHODS", "gradient_pass", "GradientPass"]

METHODS = ("atp", "atp*", "ig")
_MAX_ROWS = 256  # rows of one gradient pass (ig stacks its steps as rows)
_PATTERN_TOLERANCE = 1e-4  # largest |pattern error| at which the QK fix trusts its own softmax


class _Stop(Exception):
    """Raised by the last block's hook: the metric needs only the last position's logits."""


@dataclass
class GradientPass:
    """One forward and backward of a batch: activations, metric per row, and metric gradients."""

    metric: Float[Tensor, " rows"] | None  # None without a backward
    logits: Float[Tensor, "rows vocab"]  # last position
    acts: dict[str, Tensor]  # hook name -> activation [rows, *act]
    grads: dict[str, Tensor]  # hook name -> d sum(metric) / d activation [rows, *act]
    live: dict[str, Tensor]  # hook name -> the graph's tensor (only with keep_graph)


def _final_hook(model: Any) -> str:
    return f"blocks.{model_shape(model)['n_layers'] - 1}.hook_resid_post"


def gradient_pass(model: Any, tokens: Int[Tensor, "rows pos"], names: Sequence[str],
                  metric: Callable[[Tensor], Tensor] | None, *, optional: Sequence[str] = (),
                  embed: Callable[[Tensor], Tensor] | None = None, keep_graph: bool = False) -> GradientPass:
    """Run `tokens` with a zero probe added at each hook in `names` and differentiate sum(metric(logits)).

    The gradient at a probe is the gradient at the activation, on every hook the model lets a hook
    rewrite (the bridge reshapes some activations before hooks see them, so `retain_grad` on the
    hooked tensor would not work). `metric` maps last-position logits [rows, vocab] to [rows]; rows do
    not interact, so the gradient of the sum is each row's own gradient; None = no backward (grads
    empty). Hooks in `optional` are recorded only if the model fires them. `embed` rewrites the token
    embeddings first (ig's path). With `keep_graph` the graph stays alive for more backwards.
    """
    final = _final_hook(model)
    optional = [n for n in optional if n in model.hook_dict]
    names = list(dict.fromkeys([*names, *optional, final]))
    acts, probes, live = {}, {}, {}

    def probe(name):
        def hook(act, hook):
            if name == "hook_embed" and embed is not None:
                act = embed(act)
            acts[name] = act.detach()
            if metric is None:
                live[name] = act
            else:
                probes[name] = torch.zeros_like(act, requires_grad=True)
                live[name] = act + probes[name]
            if name == final:
                raise _Stop
            return live[name]
        return hook

    hooks = [(name, probe(name)) for name in names]
    if embed is not None and "hook_embed" not in names:
        hooks.append(("hook_embed", lambda act, hook: embed(act)))
    with torch.set_grad_enabled(metric is not None), model.hooks(fwd_hooks=hooks):
        try:
            model(tokens)
        except _Stop:
            pass
        missing = set(names) - set(live) - set(optional)
        if missing:
            raise ValueError(f"the model has no hook point(s) {sorted(missing)}; check the site kinds")
        logits = model.unembed(model.ln_final(live[final][:, -1:]))[:, 0].float()
        if metric is None:
            return GradientPass(None, logits, acts, {}, {})
        values = metric(logits)
        fired = [n for n in names if n in probes]
        grads = torch.autograd.grad(values.sum(), [probes[n] for n in fired], retain_graph=keep_graph,
                                    allow_unused=True)
    grads = {n: torch.zeros_like(acts[n]) if g is None else g for n, g in zip(fired, grads)}
    return GradientPass(values.detach(), logits.detach(), acts, grads, live if keep_graph else {})


# Per-site reduction ------------------------------------------------------------------------------

def _named_dims(kind: str) -> tuple[str, ...]:
    return tuple(d for d in KINDS[kind].dims if d is not None)


def _reduce(kind: str, product: Tensor) -> Tensor:
    """Sum a [n, *act] product over the axes no site indexes -> [n, *named dims]."""
    axes = [i + 1 for i, d in enumerate(KINDS[kind].dims) if d is None]
    return product.sum(axes) if axes else product


def _lookup(kind: str, table: Tensor, sites: Sequence[Site], all_pos: Tensor | None = None) -> Tensor:
    """Each site's entry of `table` [n, *named dims] -> [sites, n]; an axis a site leaves as None is
    summed, except that `all_pos` [n, *other dims] replaces the sum over positions when given
    (patching every position at once is not the sum of patching each one where the QK fix applies)."""
    dims = _named_dims(kind)
    out = torch.empty(len(sites), table.shape[0], dtype=table.dtype)
    groups: dict[tuple[bool, ...], list[int]] = {}
    for i, site in enumerate(sites):
        groups.setdefault(tuple(getattr(site, d) is None for d in dims), []).append(i)
    for free, members in groups.items():
        t, kept = table, list(dims)
        if all_pos is not None and free[dims.index("pos")]:
            t, kept = all_pos, [d for d in dims if d != "pos"]
        for axis in reversed([i for i, d in enumerate(kept) if free[dims.index(d)]]):
            t = t.sum(axis + 1)
            kept.pop(axis)
        index = [torch.tensor([getattr(sites[i], d) for i in members]) for d in kept]
        out[members] = (t[(slice(None), *index)] if index else t[:, None].expand(-1, len(members))).T
    return out


@dataclass(frozen=True)
class _Term:
    """Sites of one (kind, layer) and how a gradient at `hook` becomes their estimates [sites, n]."""

    index: list[int]  # positions of the sites in the grid
    layer: int  # the block the sites belong to (GradDrop leaves a site's own layer out)
    hook: str  # where the gradient is read
    contract: Callable[[Tensor], Tensor]  # gradient [n, *act] at `hook` -> estimates [sites, n]


def _plain_term(index, sites, delta: Tensor) -> _Term:
    kind = sites[0].kind
    return _Term(index, sites[0].layer, sites[0].hook, lambda g: _lookup(kind, _reduce(kind, delta * g), sites))


# The QK fix ---------------------------------------------------------------------------------------

def _scores(q: Tensor, k: Tensor) -> Tensor:
    """Causal-masked attention logits [n, heads, T, S] of queries [n, T, heads, d] and keys
    [n, S, kv_heads, d] (GQA: query head h reads key/value head h // (heads / kv_heads))."""
    k = k.repeat_interleave(q.shape[2] // k.shape[2], dim=2)
    s = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(q.shape[-1])
    n_pos = q.shape[1]
    return s.masked_fill(torch.ones(n_pos, n_pos, dtype=torch.bool).triu(1), float("-inf"))


# Rotary embeddings are a fixed linear map per position, so the rotated activation of these
# interventions is the intervention of the rotated activations (a per-example mean, a permutation
# of examples, or one of the two runs).
_COMMUTE_WITH_ROTARY = (Denoise, Noise, Zero, Mean, Resample)


def _qk_terms(layer, groups, base, source, intervention) -> list[_Term]:
    """Terms for the q and k sites of one layer: the pattern under the patched queries or keys is
    computed exactly, then linearised: change = sum (pattern_new - pattern) * d metric / d pattern."""
    prefix = f"blocks.{layer}.attn."
    rotary = prefix + "hook_rot_q" in base
    q_hook, k_hook = (prefix + "hook_rot_q", prefix + "hook_rot_k") if rotary else (prefix + "hook_q", prefix + "hook_k")
    q, k, pattern = base[q_hook], base[k_hook], base[prefix + "hook_pattern"]
    site = next(s for _, sites in groups.values() for s in sites)
    if rotary and not isinstance(intervention, _COMMUTE_WITH_ROTARY):
        raise ValueError(f"atp* cannot estimate site {site} under {intervention.name!r}: with rotary embeddings "
                         f"its QK fix needs an intervention that commutes with them "
                         f"({', '.join(c.name for c in _COMMUTE_WITH_ROTARY)}); use method='atp' for this site")
    error = float((_scores(q, k).softmax(-1) - pattern).abs().max())
    if error > _PATTERN_TOLERANCE:
        raise ValueError(f"atp* cannot estimate site {site}: its QK fix rebuilds the attention softmax from the "
                         f"queries and keys, which misses this model's pattern by {error:.2g}; use "
                         "method='atp' or method='ig' for q and k sites")

    terms = []
    if "q" in groups:
        index, sites = groups["q"]
        new_q = intervention(q, source[q_hook])
        # Row t of the pattern depends only on query t: patching all queries at once gives every row's
        # exact single-query pattern.
        dq = _scores(new_q, k).softmax(-1) - pattern  # (n, H, T, S)

        def contract_q(g, dq=dq, sites=sites):
            table = (dq * g).sum(-1).transpose(1, 2)  # (n, T, H)
            return _lookup("q", table, sites)
        terms.append(_Term(index, layer, prefix + "hook_pattern", contract_q))
    if "k" in groups:
        index, sites = groups["k"]
        base_scores, new_scores = _scores(q, k), _scores(q, intervention(k, source[k_hook]))
        n_pos, n_kv = k.shape[1], k.shape[2]
        # Patching key s replaces column s of every row's logits: (n, H, s, T, S).
        one_key = torch.eye(n_pos, dtype=torch.bool)[:, None, :]
        dk = torch.where(one_key, new_scores[:, :, None], base_scores[:, :, None]).softmax(-1) - pattern[:, :, None]
        dk_all = new_scores.softmax(-1) - pattern  # every key patched at once

        def contract_k(g, dk=dk, dk_all=dk_all, sites=sites):
            per_head = (dk * g[:, :, None]).sum((-1, -2))  # (n, H, s)
            n = per_head.shape[0]
            table = per_head.reshape(n, n_kv, -1, n_pos).sum(2).transpose(1, 2)  # (n, s, kv)
            all_pos = (dk_all * g).sum((-1, -2)).reshape(n, n_kv, -1).sum(2)  # (n, kv)
            return _lookup("k", table, sites, all_pos)
        terms.append(_Term(index, layer, prefix + "hook_pattern", contract_k))
    return terms


def _terms(grid, base, source, intervention, qk_fix: bool) -> list[_Term]:
    groups: dict[tuple[str, int], tuple[list[int], list[Site]]] = {}
    for i, site in enumerate(grid):
        index, sites = groups.setdefault((site.kind, site.layer), ([], []))
        index.append(i)
        sites.append(site)
    terms, by_layer = [], {}
    for (kind, layer), (index, sites) in groups.items():
        if qk_fix and kind in ("q", "k"):
            by_layer.setdefault(layer, {})[kind] = (index, sites)
            continue
        hook = sites[0].hook
        terms.append(_plain_term(index, sites, intervention(base[hook], source[hook]) - base[hook]))
    for layer, qk in by_layer.items():
        terms.extend(_qk_terms(layer, qk, base, source, intervention))
    return terms


def _estimate(terms: list[_Term], grads: dict[str, Tensor], n_sites: int, n: int) -> Tensor:
    out = torch.zeros(n_sites, n)
    for term in terms:
        out[term.index] = term.contract(grads[term.hook]).float()
    return out


def _qk_hooks(grid: Grid) -> tuple[set[str], set[str]]:
    """Hooks the QK fix reads: always, and where the model fires them (rotated queries and keys)."""
    layers = {s.layer for s in grid if s.kind in ("q", "k")}
    always = {f"blocks.{layer}.attn.{name}" for layer in layers for name in ("hook_q", "hook_k", "hook_pattern")}
    rotary = {f"blocks.{layer}.attn.{name}" for layer in layers for name in ("hook_rot_q", "hook_rot_k")}
    return always, rotary


def _resid_hook(layer: int) -> str:
    return f"blocks.{layer}.hook_resid_pre"


def _graddrop(model: Any, run: GradientPass, terms: list[_Term], plain: Tensor) -> Tensor:
    """GradDrop magnitude per site and example: mean over the layers l other than the site's own of
    |estimate with the gradient through block l's outputs dropped| [sites, n].

    Dropping block l leaves gradients after it unchanged and sends the residual gradient across it on
    the skip connection only, so for sites before l it is one backward from block l's input with the
    cotangent of block l's output."""
    n_layers = model_shape(model)["n_layers"]
    if n_layers < 2:
        raise ValueError("atp* needs a model with at least 2 layers: GradDrop averages over the other layers")
    layer = torch.zeros(plain.shape[0], 1)
    for term in terms:
        layer[term.index] = float(term.layer)
    total = layer * plain.abs()  # every dropped layer before a site's own leaves its estimate unchanged
    for dropped in range(1, n_layers):
        below = [t for t in terms if t.layer < dropped]
        if not below:
            continue
        after = _resid_hook(dropped + 1) if dropped + 1 < n_layers else _final_hook(model)
        names = sorted({t.hook for t in below})
        grads = torch.autograd.grad(run.live[_resid_hook(dropped)], [run.live[n] for n in names],
                                    grad_outputs=run.grads[after], retain_graph=True, allow_unused=True)
        grads = {n: torch.zeros_like(run.acts[n]) if g is None else g for n, g in zip(names, grads)}
        total += _estimate(below, grads, plain.shape[0], plain.shape[1]).abs()
    return total / (n_layers - 1)


def _check(method: str, intervention: Intervention, steps: int) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown attribution method {method!r}; valid: {', '.join(METHODS)}")
    if method == "ig" and not isinstance(intervention, (Denoise, Noise)):
        raise ValueError(f"method 'ig' integrates along the path between the clean and corrupted inputs, so it "
                         f"estimates only Denoise() or Noise(), not {intervention.name!r}; use 'atp' or 'atp*'")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")


def _metric_fn(task: Task, reference: Tensor | None, copies: int) -> Callable[[Tensor], Tensor]:
    """Per-row metric of stacked copies of the task; reference None = the rows' own (clean) logits."""
    answer, wrong = task.answer.repeat(copies), task.wrong.repeat(copies)
    if reference is None:
        return lambda logits: task.metric(logits, answer, wrong, logits.detach().log_softmax(-1))
    reference = reference.repeat(copies, 1)
    return lambda logits: task.metric(logits, answer, wrong, reference)


def _ig_pass(model: Any, task: Task, base_tokens: Tensor, names: set[str], source_embed: Tensor,
             reference: Tensor | None, steps: int, reduce: Callable[[GradientPass], dict[str, Tensor]] | None = None,
             max_rows: int = _MAX_ROWS) -> GradientPass:
    """Gradients averaged over `steps` points alpha = 0, 1/steps, ... on the embedding path; the
    activations and metric are the base run's (alpha = 0). `reduce` maps each pass to per-row tensors
    to average instead of its gradients (for quantities that need each point's activations)."""
    n = base_tokens.shape[0]
    per_pass = max(1, max_rows // n)
    first, sums = None, {}
    for start in range(0, steps, per_pass):
        alpha = torch.arange(start, min(steps, start + per_pass), dtype=source_embed.dtype) / steps
        copies = len(alpha)
        shift = alpha.repeat_interleave(n)[:, None, None]  # (rows, 1, 1), copy-major rows
        path = lambda act, shift=shift, copies=copies: act + shift * (source_embed.repeat(copies, 1, 1) - act)  # noqa: E731
        run = gradient_pass(model, base_tokens.repeat(copies, 1), sorted(names),
                            _metric_fn(task, reference, copies), embed=path)
        first = run if first is None else first
        for name, g in (run.grads if reduce is None else reduce(run)).items():
            sums[name] = sums.get(name, 0) + g.reshape(copies, n, *g.shape[1:]).sum(0)
    acts = {name: a[:n] for name, a in first.acts.items()}
    return GradientPass(first.metric[:n], first.logits[:n], acts, {k: v / steps for k, v in sums.items()}, {})


def attribute(model: Any, task: Task, sites: Grid | Sequence[Site], method: str = "atp", *, steps: int = 8,
              intervention: Intervention = Denoise(), graddrop: bool = True) -> Effects:
    """Estimate `patch(model, task, sites, intervention)` for every site from one source forward and one
    base forward and backward. "ig" runs `steps` points; "atp*" adds one partial backward per layer for
    GradDrop (`graddrop=False` keeps only its QK fix, at the cost of "atp").

    Returns an `Effects` like `patch`: `values` [grid] and `per_example` [grid, example] are the base
    metric plus the estimated change; `method` names the estimate. The intervention is applied to each
    hook's whole activation, so `GaussianNoise` draws its noise once per hook, not once per site as
    `patch` does.
    """
    grid = sites if isinstance(sites, Grid) else Grid.of(list(sites))
    _check(method, intervention, steps)
    validate(grid.sites, model, task.n_pos)
    base_run = intervention.base_run
    source_run = "clean" if base_run == "corrupt" else "corrupt"
    qk, rotary = _qk_hooks(grid) if method == "atp*" else (set(), set())
    names = {s.hook for s in grid} | qk
    source_names = names - {h for h in qk if h.endswith("hook_pattern")} | ({"hook_embed"} if method == "ig" else set())
    source = gradient_pass(model, task.tokens(source_run), sorted(source_names), None, optional=sorted(rotary))
    reference = source.logits.log_softmax(-1) if source_run == "clean" else None
    base_tokens = task.tokens(base_run)
    if method == "ig":
        if reference is None:  # the path leaves the clean run, so its reference needs its own forward
            reference = gradient_pass(model, task.clean, [], None).logits.log_softmax(-1)
        run = _ig_pass(model, task, base_tokens, names, source.acts["hook_embed"], reference, steps)
    else:
        graddrop = graddrop and method == "atp*"
        extra = {_resid_hook(layer) for layer in range(model_shape(model)["n_layers"])} if graddrop else set()
        run = gradient_pass(model, base_tokens, sorted(names | extra), _metric_fn(task, reference, 1),
                            optional=sorted(rotary), keep_graph=graddrop)
    terms = _terms(grid, run.acts, source.acts, intervention, qk_fix=method == "atp*")
    change = _estimate(terms, run.grads, len(grid), task.n_examples)  # (sites, n)
    if method == "atp*" and graddrop:
        change = change.sign() * _graddrop(model, run, terms, change)
    reference = run.logits.log_softmax(-1) if reference is None else reference
    metrics = {base_run: run.metric, source_run: task.metric(source.logits, task.answer, task.wrong, reference)}
    per_example = (run.metric[None] + change).reshape(*grid.shape, task.n_examples)
    return Effects(values=per_example.mean(-1), per_example=per_example, clean=metrics["clean"],
                   corrupt=metrics["corrupt"], grid=grid, base_run=base_run, metric=task.metric.name,
                   intervention=intervention.name, method=method, str_tokens=task.str_tokens,
                   meta={"task": task.name, **({"steps": steps} if method == "ig" else {}),
                         **({"graddrop": graddrop} if method == "atp*" else {})})
