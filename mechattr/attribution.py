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
- "relp": relevance patching (Jafari et al. 2025): AtP with layer-wise relevance propagation's
  coefficients for the gradient (normalisation scales held constant, MLP activations passed on as
  linear, a gated product split in half; `mechattr.relevance`), at AtP's cost.
"""

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from mechattr.effects import Effects
from mechattr.interventions import INTERVENTIONS, Intervention
from mechattr.models import final_hook, model_shape
from mechattr.relevance import rules
from mechattr.runs import Pass, Runs, check_intervention, gradient_pass, setup
from mechattr.sites import KINDS, Grid, Site, hook_name, validate
from mechattr.tasks import Task

__all__ = ["attribute", "METHODS"]

METHODS = ("atp", "atp*", "ig", "relp")
_MAX_ROWS = 256  # rows of one gradient pass (ig stacks its steps as rows)
_PATTERN_TOLERANCE = 1e-4  # largest |pattern error| at which the QK fix trusts its own softmax


# Per-site reduction ------------------------------------------------------------------------------

def _named_dims(kind: str) -> tuple[str, ...]:
    return tuple(d for d in KINDS[kind].dims if d is not None)


def _reduce(kind: str, product: Tensor) -> Tensor:
    """Sum a [n, *act] product over the axes no site indexes -> [n, *named dims]."""
    axes = [i + 1 for i, d in enumerate(KINDS[kind].dims) if d is None]
    return product.sum(axes) if axes else product


def _lookup(kind: str, table: Tensor, sites: Sequence[Site], task: Task, all_pos: Tensor | None = None) -> Tensor:
    """Each site's entry of `table` [n, *named dims] -> [sites, n]; an axis a site leaves as None is
    summed, except that `all_pos` [n, *other dims] replaces the sum over positions when given
    (patching every position at once is not the sum of patching each one where the QK fix applies).
    A site at a named position reads each example at its own index of it (`Task.index_at`)."""
    dims = _named_dims(kind)
    n = table.shape[0]
    out = torch.empty(len(sites), n, dtype=table.dtype, device=table.device)
    groups: dict[tuple[tuple[bool, ...], bool], list[int]] = {}
    for i, site in enumerate(sites):
        groups.setdefault((tuple(getattr(site, d) is None for d in dims), isinstance(site.pos, str)), []).append(i)
    for (free, by_name), members in groups.items():
        t, kept = table, list(dims)
        if all_pos is not None and free[dims.index("pos")]:
            t, kept = all_pos, [d for d in dims if d != "pos"]
        for axis in reversed([i for i, d in enumerate(kept) if free[dims.index(d)]]):
            t = t.sum(axis + 1)
            kept.pop(axis)
        if by_name:
            # (members, n) indices: the example axis broadcast against each site's own coordinates.
            rows = torch.arange(n, device=table.device)[None]
            index = [torch.stack([task.index_at(sites[i]) for i in members]).to(table.device) if d == "pos" else
                     torch.tensor([getattr(sites[i], d) for i in members], device=table.device)[:, None] for d in kept]
            out[members] = t[(rows, *index)]
            continue
        index = [torch.tensor([getattr(sites[i], d) for i in members], device=table.device) for d in kept]
        out[members] = (t[(slice(None), *index)] if index else t[:, None].expand(-1, len(members))).T
    return out


@dataclass(frozen=True)
class _Term:
    """Sites of one (kind, layer) and how a gradient at `hook` becomes their estimates [sites, n]."""

    index: list[int]  # positions of the sites in the grid
    layer: int  # the block the sites belong to (GradDrop leaves a site's own layer out)
    hook: str  # where the gradient is read
    contract: Callable[[Tensor], Tensor]  # gradient [n, *act] at `hook` -> estimates [sites, n]


def _plain_term(index, sites, delta: Tensor, task: Task) -> _Term:
    kind = sites[0].kind
    return _Term(index, sites[0].layer, sites[0].hook,
                 lambda g: _lookup(kind, _reduce(kind, delta * g), sites, task))


# The QK fix ---------------------------------------------------------------------------------------

def _scores(q: Tensor, k: Tensor) -> Tensor:
    """Causal-masked attention logits [n, heads, T, S] of queries [n, T, heads, d] and keys
    [n, S, kv_heads, d] (GQA: query head h reads key/value head h // (heads / kv_heads))."""
    k = k.repeat_interleave(q.shape[2] // k.shape[2], dim=2)
    s = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(q.shape[-1])
    n_pos = q.shape[1]
    return s.masked_fill(torch.ones(n_pos, n_pos, dtype=torch.bool, device=s.device).triu(1), float("-inf"))


def _qk_terms(layer, groups, base, source, intervention, task: Task) -> list[_Term]:
    """Terms for the q and k sites of one layer: the pattern under the patched queries or keys is
    computed exactly, then linearised: change = sum (pattern_new - pattern) * d metric / d pattern."""
    rotary = hook_name("rot_q", layer) in base
    q_hook, k_hook = (hook_name(k, layer) for k in (("rot_q", "rot_k") if rotary else ("q", "k")))
    pattern_hook = hook_name("pattern", layer)
    q, k, pattern = base[q_hook], base[k_hook], base[pattern_hook]
    site = next(s for _, sites in groups.values() for s in sites)
    if rotary and not intervention.commutes_with_rotary:
        valid = [name for name, cls in INTERVENTIONS.items() if cls.commutes_with_rotary]
        raise ValueError(f"atp* cannot estimate site {site} under {intervention.name!r}: with rotary embeddings "
                         f"its QK fix needs an intervention that commutes with them ({', '.join(valid)}); use "
                         "method='atp' for this site")
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
            return _lookup("q", table, sites, task)
        terms.append(_Term(index, layer, pattern_hook, contract_q))
    if "k" in groups:
        index, sites = groups["k"]
        base_scores, new_scores = _scores(q, k), _scores(q, intervention(k, source[k_hook]))
        n_pos, n_kv = k.shape[1], k.shape[2]
        # Patching key s replaces column s of every row's logits: (n, H, s, T, S).
        one_key = torch.eye(n_pos, dtype=torch.bool, device=k.device)[:, None, :]
        dk = torch.where(one_key, new_scores[:, :, None], base_scores[:, :, None]).softmax(-1) - pattern[:, :, None]
        dk_all = new_scores.softmax(-1) - pattern  # every key patched at once

        def contract_k(g, dk=dk, dk_all=dk_all, sites=sites):
            per_head = (dk * g[:, :, None]).sum((-1, -2))  # (n, H, s)
            n = per_head.shape[0]
            table = per_head.reshape(n, n_kv, -1, n_pos).sum(2).transpose(1, 2)  # (n, s, kv)
            all_pos = (dk_all * g).sum((-1, -2)).reshape(n, n_kv, -1).sum(2)  # (n, kv)
            return _lookup("k", table, sites, task, all_pos)
        terms.append(_Term(index, layer, pattern_hook, contract_k))
    return terms


def _terms(grid, base, source, intervention, qk_fix: bool, task: Task) -> list[_Term]:
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
        # float32 products: a half-precision sum over d_model would round away small effects.
        terms.append(_plain_term(index, sites, (intervention(base[hook], source[hook]) - base[hook]).float(), task))
    for layer, qk in by_layer.items():
        terms.extend(_qk_terms(layer, qk, base, source, intervention, task))
    return terms


def _estimate(terms: list[_Term], grads: dict[str, Tensor], n_sites: int, n: int) -> Tensor:
    out = torch.zeros(n_sites, n, device=next(iter(grads.values())).device)
    for term in terms:
        out[term.index] = term.contract(grads[term.hook].float()).float()
    return out


def _qk_hooks(grid: Grid) -> tuple[set[str], set[str]]:
    """Hooks the QK fix reads: always, and where the model fires them (rotated queries and keys)."""
    layers = {s.layer for s in grid if s.kind in ("q", "k")}
    always = {hook_name(kind, layer) for layer in layers for kind in ("q", "k", "pattern")}
    rotary = {hook_name(kind, layer) for layer in layers for kind in ("rot_q", "rot_k")}
    return always, rotary


def _graddrop(model: Any, run: Pass, terms: list[_Term], plain: Tensor) -> Tensor:
    """GradDrop magnitude per site and example: mean over the layers l other than the site's own of
    |estimate with the gradient through block l's outputs dropped| [sites, n].

    Dropping block l leaves gradients after it unchanged and sends the residual gradient across it on
    the skip connection only, so for sites before l it is one backward from block l's input with the
    cotangent of block l's output."""
    n_layers = model_shape(model)["n_layers"]
    if n_layers < 2:
        raise ValueError("atp* needs a model with at least 2 layers: GradDrop averages over the other layers")
    layer = torch.zeros(plain.shape[0], 1, device=plain.device)
    for term in terms:
        layer[term.index] = float(term.layer)
    total = layer * plain.abs()  # every dropped layer before a site's own leaves its estimate unchanged
    for dropped in range(1, n_layers):
        below = [t for t in terms if t.layer < dropped]
        if not below:
            continue
        after = hook_name("resid_pre", dropped + 1) if dropped + 1 < n_layers else final_hook(model)
        names = sorted({t.hook for t in below})
        grads = torch.autograd.grad(run.live[hook_name("resid_pre", dropped)], [run.live[n] for n in names],
                                    grad_outputs=run.grads[after], retain_graph=True, allow_unused=True)
        grads = {n: torch.zeros_like(run.acts[n]) if g is None else g for n, g in zip(names, grads)}
        total += _estimate(below, grads, plain.shape[0], plain.shape[1]).abs()
    return total / (n_layers - 1)


def _check(method: str, intervention: Intervention, steps: int) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown attribution method {method!r}; valid: {', '.join(METHODS)}")
    if method == "ig" and not intervention.takes_source:
        raise ValueError(f"method 'ig' integrates along the path between the clean and corrupted inputs, so it "
                         f"estimates only Denoise() or Noise(), not {intervention.name!r}; use 'atp' or 'atp*'")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")


def _check_positions(task: Task, grid: Grid, intervention: Intervention) -> None:
    task.check_positions(grid.sites)
    check_intervention(task, intervention, grid.sites)
    named = next((s for s in grid if isinstance(s.pos, str)), None)
    if named is not None and not intervention.examplewise:
        # The estimate applies the intervention to whole activations, position by position; at a named
        # position an example's value would come from other examples at its own index, not at theirs.
        raise ValueError(f"site {named}: attribution at named positions needs an examplewise intervention, "
                         f"not {intervention.name!r}; use patch for it, or a site at a token index")


def ig_pass(runs: Runs, names: set[str], steps: int,
            reduce: Callable[[Pass], dict[str, Tensor]] | None = None, max_rows: int = _MAX_ROWS) -> Pass:
    """Gradients averaged over `steps` points alpha = 0, 1/steps, ... on the path from the base run's token
    embeddings to the source run's (`runs` recorded "hook_embed"); the activations and metric are the base
    run's (alpha = 0). `reduce` maps each pass to per-row tensors to average instead of its gradients (for
    quantities that need each point's activations)."""
    base_tokens, source_embed, last = runs.task.tokens(runs.base_run), runs.source.acts["hook_embed"], runs.task.last
    n = base_tokens.shape[0]
    per_pass = max(1, max_rows // n)
    first, sums = None, {}
    for start in range(0, steps, per_pass):
        alpha = torch.arange(start, min(steps, start + per_pass), dtype=source_embed.dtype) / steps
        copies = len(alpha)
        shift = alpha.repeat_interleave(n)[:, None, None].to(source_embed.device)  # (rows, 1, 1), copy-major rows
        target = source_embed.repeat(copies, 1, 1)
        path = lambda act, shift=shift, target=target: act + shift * (target - act)  # noqa: E731
        run = gradient_pass(runs.model, base_tokens.repeat(copies, 1), sorted(names), runs.row_metric(), embed=path,
                            last=None if last is None else last.repeat(copies))
        first = run if first is None else first
        for name, g in (run.grads if reduce is None else reduce(run)).items():
            sums[name] = sums.get(name, 0) + g.reshape(copies, n, *g.shape[1:]).sum(0)
    acts = {name: a[:n] for name, a in first.acts.items()}
    return Pass(first.metric[:n], first.logits[:n], acts, {k: v / steps for k, v in sums.items()}, {})


def attribute(model: Any, task: Task | Grid | Sequence[Site] | None = None,
              sites: Grid | Sequence[Site] | str | None = None, method: str = "atp", *, steps: int = 8,
              intervention: Intervention | None = None, graddrop: bool = True) -> Effects:
    """Estimate `patch(model, task, sites, intervention)` for every site from one source forward and one
    base forward and backward. "ig" runs `steps` points; "atp*" adds one partial backward per layer for
    GradDrop (`graddrop=False` keeps only its QK fix, at the cost of "atp").

    `attribute(model, task, sites, method, intervention=Denoise())`, or `attribute(runs, sites, method)` on
    unpatched runs shared with other calls (`mechattr.unpatched`); the gradients are a pass of their own.
    Returns an `Effects` like `patch`: `values` [grid] and `per_example` [grid, example] are the base
    metric plus the estimated change; `method` names the estimate. The intervention is applied to each
    hook's whole activation, so `GaussianNoise` draws its noise once per hook, not once per site as
    `patch` does.
    """
    if isinstance(model, Runs) and isinstance(sites, str):  # attribute(runs, sites, "atp")
        sites, method = None, sites
    runs: Runs
    runs, sites = setup(model, task, sites, intervention, "attribute")
    if sites is None:
        raise TypeError("attribute(model, task, sites): the sites are missing")
    grid = sites if isinstance(sites, Grid) else Grid.of(list(sites))
    _check(method, runs.intervention, steps)
    validate(grid.sites, runs.model, runs.task.n_pos)
    _check_positions(runs.task, grid, runs.intervention)
    qk, rotary = _qk_hooks(grid) if method == "atp*" else (set(), set())
    names = {s.hook for s in grid} | qk
    patterns = {h for h in qk if h.endswith("hook_pattern")}  # read in the base run only
    graddrop = graddrop and method == "atp*"
    if method == "ig":
        runs.record(source_hooks=sorted(names | {"hook_embed"}))
        run = ig_pass(runs, names, steps)
    else:
        layers = range(model_shape(runs.model)["n_layers"]) if graddrop else ()
        extra = {hook_name("resid_pre", layer) for layer in layers}
        rotary = {h for h in rotary if h in runs.model.hook_dict}  # rotated queries and keys: rotary models only
        runs.record(source_hooks=sorted(names - patterns | rotary))
        run = runs.gradients(sorted(names | extra), optional=sorted(rotary), keep_graph=graddrop,
                             rules=rules(runs.model) if method == "relp" else ())
    terms = _terms(grid, run.acts, runs.source.acts, runs.intervention, qk_fix=method == "atp*", task=runs.task)
    change = _estimate(terms, run.grads, len(grid), runs.task.n_examples)  # (sites, n)
    if graddrop:
        change = change.sign() * _graddrop(runs.model, run, terms, change)
    meta = {"steps": steps} if method == "ig" else {"graddrop": graddrop} if method == "atp*" else {}
    return Effects.of(runs, grid, runs.base_metric[None] + change, method, **meta)
