"""Edges: the direct path from one component's output to another's input along the residual stream.

A sender writes into the residual stream: the token embedding (`Site("embed")`), one head's output
through its W_O (`Site("z", layer, head=h)`), or an MLP (`Site("mlp_out", layer)`). A receiver reads it:
one head's query, key or value input (`Site("q"|"k"|"v", layer, head=h)`; k and v index key/value heads
on GQA models), an MLP's input (`Site("mlp_out", layer)`), or the unembedding (`Site("resid_post",
last layer)`, "the logits"). Patching an edge changes only that receiver's input, by the sender's
(new - base) contribution; everything downstream of the receiver then follows.

A receiver's output is a function of its own input: ln1(x) @ W_Q[h] + b_Q[h] for a query (likewise keys
and values), mlp(ln2(x)) for an MLP, x itself for the logits. Exact single edges compute the receiver's
output under the changed input and patch it in with `run_cells`; attribution pulls the gradient at the
receiver's output back through that function; circuits ablate many edges at once with hooks that
rebuild each receiver's input from the current run (`ablated_metric`), as ACDC does.
"""

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from mechattr.attribution import GradientPass, _ig_pass, _metric_fn, gradient_pass
from mechattr.interventions import Denoise, Intervention, Noise
from mechattr.patching import Forward, metric_readout, run_cells
from mechattr.sites import Site, model_shape
from mechattr.tasks import Task

__all__ = ["Edge", "EdgeEffects", "EdgeAblator", "senders", "receivers", "all_edges", "attribute_edges",
           "patch_edges", "ablated_metric"]

SENDER_KINDS = ("embed", "z", "mlp_out")
RECEIVER_KINDS = ("q", "k", "v", "mlp_out", "resid_post")
EDGE_METHODS = ("atp", "ig")
_HEAD_INPUTS = ("q", "k", "v")
_COPIES = 4  # circuits per ablation run: each copy holds every sender's contribution


def _writes_at(site: Site) -> int:
    """Order of a sender's write: embed, then per layer the attention heads, then the MLP."""
    return -1 if site.kind == "embed" else 2 * site.layer + (site.kind == "mlp_out")


def _reads_at(site: Site) -> int:
    return 2 * site.layer + (site.kind == "mlp_out") + 2 * (site.kind == "resid_post")


@dataclass(frozen=True)
class Edge:
    """sender -> receiver (see the module docstring for the site kinds each side takes)."""

    sender: Site
    receiver: Site

    def __post_init__(self):
        s, r = self.sender, self.receiver
        if s.kind not in SENDER_KINDS or (s.kind == "z") != (s.head is not None) or s.pos is not None:
            raise ValueError(f"edge sender {s}: must be embed, z with a head, or mlp_out, at all positions")
        if r.kind not in RECEIVER_KINDS or (r.kind in _HEAD_INPUTS) != (r.head is not None) or r.pos is not None:
            raise ValueError(f"edge receiver {r}: must be q/k/v with a head, mlp_out or resid_post, at all positions")
        if _writes_at(s) >= _reads_at(r):
            raise ValueError(f"edge {self}: the sender writes after the receiver reads")

    def __str__(self) -> str:
        return f"{self.sender} -> {self.receiver}"


def senders(model: Any) -> list[Site]:
    shape = model_shape(model)
    out = [Site("embed")]
    for layer in range(shape["n_layers"]):
        out += [Site("z", layer, head=h) for h in range(shape["n_heads"])] + [Site("mlp_out", layer)]
    return out


def receivers(model: Any) -> list[Site]:
    shape = model_shape(model)
    out = []
    for layer in range(shape["n_layers"]):
        out += [Site("q", layer, head=h) for h in range(shape["n_heads"])]
        out += [Site(kind, layer, head=h) for kind in "kv" for h in range(shape["n_kv_heads"])]
        out.append(Site("mlp_out", layer))
    return out + [Site("resid_post", shape["n_layers"] - 1)]


def all_edges(model: Any) -> list[Edge]:
    """Every edge of the model, receivers in forward order."""
    send = senders(model)
    return [Edge(s, r) for r in receivers(model) for s in send if _writes_at(s) < _reads_at(r)]


def _apply(model: Any, receiver_kind: str, layer: int, x: Tensor) -> Tensor:
    """Receiver function: outputs of every receiver of `receiver_kind` in `layer` from inputs x.
    q/k/v: x [rows, P, heads, d_model] -> [rows, P, heads, d_head]; mlp_out: [rows, P, d_model]."""
    block = model.blocks[layer]
    if receiver_kind == "mlp_out":
        return block.mlp(block.ln2(x))
    if receiver_kind == "resid_post":
        return x
    attn = block.attn
    weight, bias = {"q": (attn.W_Q, attn.b_Q), "k": (attn.W_K, attn.b_K), "v": (attn.W_V, attn.b_V)}[receiver_kind]
    rows, n_pos, heads, d_model = x.shape
    normed = block.ln1(x.reshape(rows, n_pos * heads, d_model)).reshape(x.shape)
    out = torch.einsum("bphd,hde->bphe", normed, weight)
    return out if bias is None else out + bias


def _input_hook(receiver_kind: str, layer: int) -> str:
    """Where the base run's receiver input is read: the residual before attention or before the MLP."""
    if receiver_kind == "resid_post":
        return f"blocks.{layer}.hook_resid_post"
    return f"blocks.{layer}.hook_resid_{'mid' if receiver_kind == 'mlp_out' else 'pre'}"


def _output_hook(receiver_kind: str, layer: int) -> str:
    if receiver_kind in _HEAD_INPUTS:
        return f"blocks.{layer}.attn.hook_{receiver_kind}"
    return _input_hook(receiver_kind, layer) if receiver_kind == "resid_post" else f"blocks.{layer}.hook_mlp_out"


def _n_heads(model: Any, receiver_kind: str) -> int:
    shape = model_shape(model)
    return shape["n_heads"] if receiver_kind == "q" else shape["n_kv_heads"]


def _input_grads(model: Any, groups: dict[tuple[str, int], list[Site]], run: GradientPass) -> dict[Site, Tensor]:
    """d metric / d (each receiver's own input) [rows, P, d_model]: the gradient at the receiver's output
    pulled back through its receiver function at the run's input."""
    out = {}
    for (kind, layer), sites in groups.items():
        x = run.acts[_input_hook(kind, layer)]
        g = run.grads[_output_hook(kind, layer)]
        if kind == "resid_post":
            out.update({site: g for site in sites})
            continue
        with torch.enable_grad():
            if kind == "mlp_out":
                x = x.detach().requires_grad_()
                (grad,) = torch.autograd.grad(_apply(model, kind, layer, x), x, g)
                out.update({site: grad for site in sites})
                continue
            heads = x[:, :, None].expand(-1, -1, _n_heads(model, kind), -1).detach().requires_grad_()
            (grad,) = torch.autograd.grad(_apply(model, kind, layer, heads), heads, g)  # (rows, P, heads, d)
        out.update({site: grad[:, :, site.head] for site in sites})
    return out


def _contributions(model: Any, sender_sites: Sequence[Site], acts: dict[str, Tensor]
                   ) -> Float[Tensor, "sender n pos d_model"]:
    """Each sender's write into the residual stream (biases left out: they cancel in differences)."""
    out = []
    for s in sender_sites:
        a = acts[s.hook]
        if s.kind == "z":
            a = a[:, :, s.head] @ model.blocks[s.layer].attn.W_O[s.head]  # (n, P, d_model)
        out.append(a)
    return torch.stack(out)


@dataclass(frozen=True, eq=False)
class EdgeEffects:
    """Metric with each edge patched (exactly or estimated), like `Effects` over a list of edges."""

    edges: tuple[Edge, ...]
    values: Float[Tensor, " edge"]  # mean metric with the edge patched
    per_example: Float[Tensor, "edge example"]
    clean: Float[Tensor, " example"]
    corrupt: Float[Tensor, " example"]
    base_run: str = "corrupt"  # the run intervened on
    intervention: str = "denoise"
    method: str = "patch"  # "patch" (exact) or the estimate's name

    @property
    def base(self) -> Float[Tensor, " example"]:
        return self.corrupt if self.base_run == "corrupt" else self.clean

    @property
    def effect(self) -> Float[Tensor, " edge"]:
        """Change of the metric caused by patching the edge."""
        return self.values - self.base.mean()

    @property
    def normalized(self) -> Float[Tensor, " edge"]:
        """effect / (clean - corrupt)."""
        return self.effect / (self.clean.mean() - self.corrupt.mean())

    def top(self, k: int = 10) -> list[tuple[Edge, float]]:
        order = self.effect.abs().argsort(descending=True)[:k]
        return [(self.edges[int(i)], float(self.effect[i])) for i in order]


def _runs(model, task, intervention, names, grad_names=None, metric_copies=1):
    """Source run (no gradients) and base run (gradients at `grad_names`, if given) with activations."""
    base_run = intervention.base_run
    source_run = "clean" if base_run == "corrupt" else "corrupt"
    source = gradient_pass(model, task.tokens(source_run), sorted(names), None)
    reference = source.logits.log_softmax(-1) if source_run == "clean" else None
    base = gradient_pass(model, task.tokens(base_run), sorted(names | set(grad_names or ())),
                         None if grad_names is None else _metric_fn(task, reference, metric_copies))
    if reference is None:
        reference = base.logits.log_softmax(-1)
    logits = {base_run: base.logits, source_run: source.logits}
    metrics = {run: task.metric(lg, task.answer, task.wrong, reference) for run, lg in logits.items()}
    return base, source, reference, metrics


def _receiver_groups(edges: Sequence[Edge]) -> dict[tuple[str, int], list[Site]]:
    groups: dict[tuple[str, int], list[Site]] = {}
    for r in dict.fromkeys(e.receiver for e in edges):
        groups.setdefault((r.kind, r.layer), []).append(r)
    return groups


def _result(edges, intervention, base_metric, change, metrics, method) -> EdgeEffects:
    per_example = base_metric[None] + change
    return EdgeEffects(edges=tuple(edges), values=per_example.mean(-1), per_example=per_example,
                       clean=metrics["clean"], corrupt=metrics["corrupt"], base_run=intervention.base_run,
                       intervention=intervention.name, method=method)


def _scores(model, groups, send, delta, run) -> Tensor:
    """(new - base contribution) . input gradient for every sender x receiver [rows, S, R] (delta is
    repeated over the run's copies of the batch)."""
    grads = _input_grads(model, groups, run)
    recv = [r for sites in groups.values() for r in sites]
    rows = run.metric.shape[0]
    delta = delta.repeat(1, rows // delta.shape[1], 1, 1)  # (S, rows, P, d)
    g = torch.stack([grads[r] for r in recv], 1)  # (rows, R, P, d)
    return torch.bmm(delta.transpose(0, 1).flatten(2), g.flatten(2).transpose(1, 2))  # (rows, S, R)


def attribute_edges(model: Any, task: Task, edges: Sequence[Edge] | None = None, method: str = "atp", *,
                    steps: int = 8, intervention: Intervention = Denoise()) -> EdgeEffects:
    """Edge attribution patching: change = (sender's new - base contribution) . d metric / d receiver input
    for every edge from one backward ("ig": the gradient averaged along the embedding path, EAP-IG)."""
    if method not in EDGE_METHODS:
        raise ValueError(f"edges cannot be estimated with method {method!r}; the methods that can: "
                         f"{', '.join(EDGE_METHODS)} (atp*'s QK fix and GradDrop are defined for nodes)")
    if method == "ig" and not isinstance(intervention, (Denoise, Noise)):
        raise ValueError(f"method 'ig' estimates only Denoise() or Noise(), not {intervention.name!r}; use 'atp'")
    edges = list(all_edges(model) if edges is None else edges)
    send = list(dict.fromkeys(e.sender for e in edges))
    groups = _receiver_groups(edges)
    inputs = {_input_hook(kind, layer) for kind, layer in groups}
    outputs = {_output_hook(kind, layer) for kind, layer in groups}
    names = {s.hook for s in send} | inputs | ({"hook_embed"} if method == "ig" else set())
    base, source, reference, metrics = _runs(model, task, intervention, names, outputs if method == "atp" else None)
    delta = _contributions(model, send, {h: intervention(base.acts[h], source.acts[h]) for h in names}) \
        - _contributions(model, send, base.acts)  # (S, n, P, d_model)
    reduce = lambda run: {"scores": _scores(model, groups, send, delta, run)}  # noqa: E731
    if method == "ig":
        run = _ig_pass(model, task, task.tokens(intervention.base_run), inputs | outputs, source.acts["hook_embed"],
                       reference, steps, reduce=reduce, max_rows=64)
        scores = run.grads["scores"]
    else:
        scores = reduce(base)["scores"]
    recv = {r: i for i, r in enumerate(r for sites in groups.values() for r in sites)}
    s_index = {s: i for i, s in enumerate(send)}
    change = torch.stack([scores[:, s_index[e.sender], recv[e.receiver]] for e in edges])  # (E, n)
    return _result(edges, intervention, metrics[intervention.base_run], change, metrics, method)


def patch_edges(model: Any, task: Task, edges: Sequence[Edge], intervention: Intervention = Denoise()) -> EdgeEffects:
    """Exact edge patching: for each edge alone, the receiver's input becomes base input + the sender's
    (new - base) contribution; the metric is read at the last position."""
    edges = list(edges)
    send = list(dict.fromkeys(e.sender for e in edges))
    groups = _receiver_groups(edges)
    layers = {layer for _, layer in groups}
    names = {s.hook for s in send} | {_input_hook(k, l) for k, l in groups} | {_output_hook(k, l) for k, l in groups} \
        | {f"blocks.{l}.hook_resid_pre" for l in layers}
    base, source, reference, metrics = _runs(model, task, intervention, names)
    _check_receivers(model, groups, base.acts)
    delta = _contributions(model, send, {h: intervention(base.acts[h], source.acts[h]) for h in names}) \
        - _contributions(model, send, base.acts)  # (S, n, P, d_model)
    s_index = {s: i for i, s in enumerate(send)}
    cells = []
    for e in edges:
        r = e.receiver
        x = base.acts[_input_hook(r.kind, r.layer)] + delta[s_index[e.sender]]  # (n, P, d_model)
        if r.kind in _HEAD_INPUTS:
            x = x[:, :, None].expand(-1, -1, _n_heads(model, r.kind), -1)
            value = _apply(model, r.kind, r.layer, x)[:, :, r.head]
        else:
            value = _apply(model, r.kind, r.layer, x)
        cells.append([(r, value)])
    forward = Forward(model, task.tokens(intervention.base_run))
    resid = {f"blocks.{l}.hook_resid_pre": base.acts[f"blocks.{l}.hook_resid_pre"] for l in layers}
    patched = run_cells(forward, cells, resid, metric_readout(task, reference), desc="patching edges")  # (E, n)
    change = patched - metrics[intervention.base_run][None]
    return _result(edges, intervention, metrics[intervention.base_run], change, metrics, "patch")


def _check_receivers(model: Any, groups, acts: dict[str, Tensor]) -> None:
    """The receiver functions must reproduce the model's own outputs on the base run."""
    for kind, layer in groups:
        x = acts[_input_hook(kind, layer)]
        if kind in _HEAD_INPUTS:
            x = x[:, :, None].expand(-1, -1, _n_heads(model, kind), -1)
        expected = acts[_output_hook(kind, layer)]
        error = float((_apply(model, kind, layer, x) - expected).abs().max())
        if error > 1e-4 * max(1.0, float(expected.abs().max())):
            raise ValueError(f"edges into {kind}[L{layer}] are not supported on this model: recomputing the "
                             f"receiver from its input misses the model's own output by {error:.2g}")


class _Ablation:
    """Hooks for one run of K stacked copies of the batch, copy k with the edges where `ablated[k]` is
    True set to their ablated senders' values: each receiver reads the current residual minus, for each
    ablated edge, the sender's (current - ablated) contribution."""

    def __init__(self, model: Any, send: list[Site], recv: list[Site], ablated: Tensor, ablated_acts: dict[str, Tensor]):
        self.model, self.send, self.n_copies = model, send, ablated.shape[0]
        self.ablated_acts = ablated_acts  # sender hook -> ablated activation [n, ...]
        self.masks: dict[tuple[str, int], Tensor] = {}  # (kind, layer) -> (K, S, receivers) float
        for j, r in enumerate(recv):
            key = (r.kind, r.layer)
            width = _n_heads(model, r.kind) if r.kind in _HEAD_INPUTS else 1
            mask = self.masks.setdefault(key, torch.zeros(self.n_copies, len(send), width))
            mask[:, :, r.head or 0] = ablated[:, :, j].float()
        self.sender_slots = {}
        for i, s in enumerate(send):
            self.sender_slots.setdefault(s.hook, []).append(i)
        self.diff: Tensor | None = None  # (K, n, P, S, d_model), filled as senders run
        self.resid: dict[int, Tensor] = {}

    def _removal(self, kind: str, layer: int) -> Tensor:
        """Sum of ablated senders' (current - ablated) contributions per receiver: (rows, P, width, d)."""
        removal = torch.einsum("knpsd,ksr->knprd", self.diff, self.masks[(kind, layer)])
        return removal.flatten(0, 1)

    def sender(self, site_hook: str):
        def hook(act, hook):
            k = self.n_copies
            if self.diff is None:
                n = act.shape[0] // k
                self.diff = act.new_zeros(k, n, act.shape[1], len(self.send), self.model.cfg.d_model)
            now = _contributions(self.model, [self.send[i] for i in self.sender_slots[site_hook]], {site_hook: act})
            then = _contributions(self.model, [self.send[i] for i in self.sender_slots[site_hook]],
                                  {site_hook: self.ablated_acts[site_hook]})  # (s, n, P, d)
            diff = now - then.repeat(1, k, 1, 1)
            self.diff[:, :, :, self.sender_slots[site_hook]] = diff.reshape(diff.shape[0], k, -1, *diff.shape[2:]
                                                                            ).permute(1, 2, 3, 0, 4)
        return hook

    def capture(self, layer: int):
        def hook(act, hook):
            self.resid[layer] = act
        return hook

    def head_receiver(self, kind: str, layer: int):
        def hook(act, hook):
            x = self.resid[layer][:, :, None] - self._removal(kind, layer)  # (rows, P, heads, d)
            return _apply(self.model, kind, layer, x)
        return hook

    def residual_receiver(self, kind: str, layer: int):
        def hook(act, hook):
            return act - self._removal(kind, layer)[:, :, 0]
        return hook

    def hooks(self) -> list[tuple[str, Any]]:
        out = [(hook, self.sender(hook)) for hook in self.sender_slots]
        out += [(f"blocks.{layer}.hook_resid_pre", self.capture(layer))
                for layer in sorted({layer for kind, layer in self.masks if kind in _HEAD_INPUTS})]
        for kind, layer in self.masks:
            if kind in _HEAD_INPUTS:
                out.append((f"blocks.{layer}.attn.hook_{kind}", self.head_receiver(kind, layer)))
            else:
                where = f"blocks.{layer}.ln2.hook_in" if kind == "mlp_out" else _input_hook(kind, layer)
                out.append((where, self.residual_receiver(kind, layer)))
        return out


class EdgeAblator:
    """Evaluates edge circuits: the task metric of the base run (clean for `Noise`) with every edge outside
    a circuit ablated, its receiver reading the sender's `ablation` value (the corrupted run's for `Noise`)
    instead of the current one. `edges` is the graph (default: all edges of the model). The unpatched
    runs are cached once, so each call costs one forward per `_COPIES` circuits."""

    def __init__(self, model: Any, task: Task, ablation: Intervention = Noise(), edges: Sequence[Edge] | None = None):
        self.model, self.task = model, task
        self.edges = list(all_edges(model) if edges is None else edges)
        self.send = list(dict.fromkeys(e.sender for e in self.edges))
        self.recv = list(dict.fromkeys(e.receiver for e in self.edges))
        self.s_index = {s: i for i, s in enumerate(self.send)}
        self.r_index = {r: j for j, r in enumerate(self.recv)}
        base, source, self.reference, self.metrics = _runs(model, task, ablation, {s.hook for s in self.send})
        self.values = {s.hook: ablation(base.acts[s.hook], source.acts[s.hook]) for s in self.send}
        self.forward = Forward(model, task.tokens(ablation.base_run), resumable=False)

    def _mask(self, circuits: Sequence[set[Edge]]) -> Tensor:
        ablated = torch.zeros(len(circuits), len(self.send), len(self.recv), dtype=torch.bool)
        for e in self.edges:
            ablated[:, self.s_index[e.sender], self.r_index[e.receiver]] = True
        for k, circuit in enumerate(circuits):
            for e in circuit:
                ablated[k, self.s_index[e.sender], self.r_index[e.receiver]] = False
        return ablated

    def __call__(self, circuits: Sequence[set[Edge]]) -> Float[Tensor, "circuit example"]:
        ablated = self._mask(circuits)
        readout = metric_readout(self.task, self.reference)
        out = []
        for start in range(0, len(circuits), _COPIES):
            chunk = ablated[start:start + _COPIES]
            logits = self.forward.run(chunk.shape[0], _Ablation(self.model, self.send, self.recv, chunk,
                                                                self.values).hooks())
            out.append(readout(logits).reshape(chunk.shape[0], -1))
        return torch.cat(out)


def ablated_metric(model: Any, task: Task, circuits: Sequence[set[Edge]], ablation: Intervention = Noise(),
                   edges: Sequence[Edge] | None = None) -> Float[Tensor, "circuit example"]:
    """The metric [circuit, example] of the base run with every edge outside each circuit ablated
    (see `EdgeAblator`)."""
    return EdgeAblator(model, task, ablation, edges)(circuits)
