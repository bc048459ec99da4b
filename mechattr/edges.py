"""Edges: patching and attributing the direct path from one node's output to a receiver's input.

Patching an edge (see `mechattr.graph`) changes only that receiver's input, by the sender's (new - base)
contribution; everything downstream of the receiver then follows. Exact single edges compute the
receiver's output under the changed input and patch it in as cells (`mechattr.cells`); attribution pulls the
gradient at the receiver's output back through the receiver function. Both return an `Effects` over
the edges (`Grid.of(edges)`, kind "edge"), called on a model and a task or on shared unpatched runs
(`patch_edges(runs, edges)`). Circuits ablate many edges at once (`mechattr.ablation`).
"""

from typing import Any, Sequence

import torch
from torch import Tensor

from mechattr.attribution import ig_pass
from mechattr.cells import run_cells
from mechattr.effects import Effects
from mechattr.graph import (HEAD_INPUTS, Edge, all_edges, check_receivers, contributions, input_hook, n_inputs,
                            output_hook, receive, receiver_groups)
from mechattr.interventions import Intervention
from mechattr.relevance import applied, rules
from mechattr.runs import Pass, Runs, check_intervention, setup
from mechattr.sites import Grid, Site, hook_name, validate
from mechattr.tasks import Task

__all__ = ["attribute_edges", "patch_edges", "EDGE_METHODS"]

EDGE_METHODS = ("atp", "ig", "relp")


def _input_grads(model: Any, groups: dict[tuple[str, int], list[Site]], run: Pass,
                 relevance: Sequence[tuple[str, Any]] = ()) -> dict[Site, Tensor]:
    """d metric / d (each receiver's own input) [rows, P, d_model]: the gradient at the receiver's output
    pulled back through its receiver function at the run's input, under the `relevance` rules that
    made the run's gradients (relp's rules reach inside the receiver: its norm and its MLP)."""
    out = {}
    with torch.enable_grad(), applied(model, relevance):
        for (kind, layer), sites in groups.items():
            x = run.acts[input_hook(kind, layer)]
            g = run.grads[output_hook(kind, layer)]
            if kind == "resid_post":
                out.update({site: g for site in sites})
            elif kind == "mlp_out":
                x = x.detach().requires_grad_()
                (grad,) = torch.autograd.grad(receive(model, kind, layer, x), x, g)
                out.update({site: grad for site in sites})
            else:
                heads = x[:, :, None].expand(-1, -1, n_inputs(model, kind), -1).detach().requires_grad_()
                (grad,) = torch.autograd.grad(receive(model, kind, layer, heads), heads, g)  # (rows, P, heads, d)
                out.update({site: grad[:, :, site.head] for site in sites})
    return out


def _scores(model, groups, send, delta, run, relevance=()) -> Tensor:
    """(new - base contribution) . input gradient for every sender x receiver [rows, S, R] (delta is
    repeated over the run's copies of the batch)."""
    grads = _input_grads(model, groups, run, relevance)
    recv = [r for sites in groups.values() for r in sites]
    rows = run.metric.shape[0]
    delta = delta.repeat(1, rows // delta.shape[1], 1, 1)  # (S, rows, P, d)
    g = torch.stack([grads[r] for r in recv], 1)  # (rows, R, P, d)
    return torch.bmm(delta.transpose(0, 1).flatten(2), g.flatten(2).transpose(1, 2))  # (rows, S, R)


def attribute_edges(model: Any, task: Task | Sequence[Edge] | None = None, edges: Sequence[Edge] | str | None = None,
                    method: str = "atp", *, steps: int = 8, intervention: Intervention | None = None) -> Effects:
    """Edge attribution patching: change = (sender's new - base contribution) . d metric / d receiver input
    for every edge from one backward ("ig": the gradient averaged along the embedding path, EAP-IG;
    "relp": relevance coefficients for the gradient, `mechattr.relevance`). `attribute_edges(model, task,
    edges=None, method)` (None: every edge of the model), or `attribute_edges(runs, edges, method)`."""
    if isinstance(model, Runs) and isinstance(edges, str):  # attribute_edges(runs, edges, "atp")
        edges, method = None, edges
    runs: Runs
    runs, edges = setup(model, task, edges, intervention, "attribute_edges")
    model, task, intervention = runs.model, runs.task, runs.intervention
    if method not in EDGE_METHODS:
        raise ValueError(f"edges cannot be estimated with method {method!r}; the methods that can: "
                         f"{', '.join(EDGE_METHODS)} (atp*'s QK fix and GradDrop are defined for nodes)")
    if method == "ig" and not intervention.takes_source:
        raise ValueError(f"method 'ig' estimates only Denoise() or Noise(), not {intervention.name!r}; use 'atp'")
    edges = list(all_edges(model) if edges is None else edges)
    validate(edges, model, task.n_pos)
    check_intervention(task, intervention, edges)
    send = list(dict.fromkeys(e.sender for e in edges))
    groups = receiver_groups(model, edges)
    inputs = {input_hook(kind, layer) for kind, layer in groups}
    outputs = {output_hook(kind, layer) for kind, layer in groups}
    names = {s.hook for s in send} | inputs
    relevance = rules(model) if method == "relp" else ()
    if method == "ig":
        runs.record(sorted(names), base_hooks=sorted(outputs), source_hooks=["hook_embed"])
        base = runs.base
    else:
        runs.record(source_hooks=sorted(names))
        base = runs.gradients(sorted(names | outputs), rules=relevance)
    source = runs.source
    check_receivers(model, groups, base.acts)
    delta = contributions(model, send, {h: intervention(base.acts[h], source.acts[h]) for h in names}) \
        - contributions(model, send, base.acts)  # (S, n, P, d_model)
    reduce = lambda run: {"scores": _scores(model, groups, send, delta, run, relevance)}  # noqa: E731
    if method == "ig":
        run = ig_pass(runs, inputs | outputs, steps, reduce=reduce, max_rows=64)
        scores = run.grads["scores"]
    else:
        scores = reduce(base)["scores"]
    recv = {r: i for i, r in enumerate(r for sites in groups.values() for r in sites)}
    s_index = {s: i for i, s in enumerate(send)}
    change = torch.stack([scores[:, s_index[e.sender], recv[e.receiver]] for e in edges])  # (E, n)
    return Effects.of(runs, Grid.of(edges), runs.base_metric[None] + change, method,
                      **({"steps": steps} if method == "ig" else {}))


def patch_edges(model: Any, task: Task | Sequence[Edge] | None = None, edges: Sequence[Edge] | None = None,
                intervention: Intervention | None = None) -> Effects:
    """Exact edge patching: for each edge alone, the receiver's input becomes base input + the sender's
    (new - base) contribution; the metric is read at the last position. `patch_edges(model, task, edges,
    intervention=Denoise())`, or `patch_edges(runs, edges)` on shared unpatched runs."""
    runs: Runs
    runs, edges = setup(model, task, edges, intervention, "patch_edges")
    if edges is None:
        raise TypeError("patch_edges(model, task, edges): the edges are missing")
    model, task, intervention = runs.model, runs.task, runs.intervention
    edges = list(edges)
    validate(edges, model, task.n_pos)
    check_intervention(task, intervention, edges)
    send = list(dict.fromkeys(e.sender for e in edges))
    groups = receiver_groups(model, edges)
    layers = sorted({layer for _, layer in groups})
    names = {s.hook for s in send} | {input_hook(k, l) for k, l in groups} | {output_hook(k, l) for k, l in groups}
    runs.record(sorted(names), base_hooks=[hook_name("resid_pre", layer) for layer in layers], block_inputs=True)
    base, source = runs.base, runs.source
    check_receivers(model, groups, base.acts)
    delta = contributions(model, send, {h: intervention(base.acts[h], source.acts[h]) for h in names}) \
        - contributions(model, send, base.acts)  # (S, n, P, d_model)
    s_index = {s: i for i, s in enumerate(send)}
    cells = []
    for e in edges:
        r = e.receiver
        x = base.acts[input_hook(r.kind, r.layer)] + delta[s_index[e.sender]]  # (n, P, d_model)
        if r.kind in HEAD_INPUTS:
            x = x[:, :, None].expand(-1, -1, n_inputs(model, r.kind), -1)
            value = receive(model, r.kind, r.layer, x)[:, :, r.head]
        else:
            value = receive(model, r.kind, r.layer, x)
        cells.append([(r, value)])
    patched = run_cells(runs, cells, layers, desc="patching edges")  # (E, n)
    return Effects.of(runs, Grid.of(edges), patched, "patch")
