"""The computational graph that edges and circuits are drawn on.

Nodes write into the residual stream: the token embedding (`Site("embed")`), one head's output through
its W_O (`Site("z", layer, head=h)`), or an MLP (`Site("mlp_out", layer)`). Receivers read it: one head's
query, key or value input (`Site("q"|"k"|"v", layer, head=h)`; k and v index key/value heads on GQA
models), an MLP's input (`Site("mlp_out", layer)`), or the unembedding (`Site("resid_post", last layer)`,
"the logits"). An `Edge` is a sender node and a receiver that reads after it writes.

A receiver's output is a function of its own input: ln1(x) @ W_Q[h] + b_Q[h] for a query (likewise keys
and values), mlp(ln2(x)) for an MLP, x itself for the logits (`receive`).
"""

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from mechattr.models import model_name, model_shape
from mechattr.sites import Site, hook_name

__all__ = ["Edge", "nodes", "receivers", "all_edges", "receive", "n_inputs", "input_hook", "output_hook",
           "contributions", "receiver_groups", "check_receivers", "unit_from_json", "SENDER_KINDS", "RECEIVER_KINDS",
           "HEAD_INPUTS"]

SENDER_KINDS = ("embed", "z", "mlp_out")
RECEIVER_KINDS = ("q", "k", "v", "mlp_out", "resid_post")
HEAD_INPUTS = ("q", "k", "v")


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

    kind = "edge"  # what a grid of edges is called

    def __post_init__(self):
        s, r = self.sender, self.receiver
        if s.kind not in SENDER_KINDS or (s.kind == "z") != (s.head is not None) or s.pos is not None:
            raise ValueError(f"edge sender {s}: must be embed, z with a head, or mlp_out, at all positions")
        if r.kind not in RECEIVER_KINDS or (r.kind in HEAD_INPUTS) != (r.head is not None) or r.pos is not None:
            raise ValueError(f"edge receiver {r}: must be q/k/v with a head, mlp_out or resid_post, at all positions")
        if _writes_at(s) >= _reads_at(r):
            raise ValueError(f"edge {self}: the sender writes after the receiver reads")

    def to_json(self) -> list:
        return [self.sender.to_json(), self.receiver.to_json()]

    def __str__(self) -> str:
        return f"{self.sender} -> {self.receiver}"


def unit_from_json(value: Sequence) -> Site | Edge:
    """A `Site` or an `Edge` from its `to_json()` form."""
    if value and isinstance(value[0], (list, tuple)):
        return Edge(Site.from_json(value[0]), Site.from_json(value[1]))
    return Site.from_json(value)


def nodes(model: Any) -> list[Site]:
    """The nodes (every sender), in forward order: the embedding, then per layer each head's output and
    the MLP. Ablating them all reproduces the source run exactly."""
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
    send = nodes(model)
    return [Edge(s, r) for r in receivers(model) for s in send if _writes_at(s) < _reads_at(r)]


def n_inputs(model: Any, receiver_kind: str) -> int:
    """How many receivers of a head-input kind one layer has (query heads, or key/value heads)."""
    shape = model_shape(model)
    return shape["n_heads"] if receiver_kind == "q" else shape["n_kv_heads"]


def receive(model: Any, receiver_kind: str, layer: int, x: Tensor) -> Tensor:
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


def input_hook(receiver_kind: str, layer: int) -> str:
    """Where the base run's receiver input is read: the residual before attention or before the MLP."""
    if receiver_kind == "resid_post":
        return hook_name("resid_post", layer)
    return hook_name("resid_mid" if receiver_kind == "mlp_out" else "resid_pre", layer)


def output_hook(receiver_kind: str, layer: int) -> str:
    """Where a receiver's output is: its q/k/v hook, the MLP's output, or (logits) the final residual."""
    if receiver_kind == "resid_post":
        return input_hook(receiver_kind, layer)
    return hook_name(receiver_kind, layer)


def contributions(model: Any, sender_sites: Sequence[Site], acts: dict[str, Tensor]
                  ) -> Float[Tensor, "sender n pos d_model"]:
    """Each sender's write into the residual stream (biases left out: they cancel in differences)."""
    out = []
    for s in sender_sites:
        a = acts[s.hook]
        if s.kind == "z":
            a = a[:, :, s.head] @ model.blocks[s.layer].attn.W_O[s.head]  # (n, P, d_model)
        out.append(a)
    return torch.stack(out)


def receiver_groups(model: Any, edges: Sequence[Edge]) -> dict[tuple[str, int], list[Site]]:
    """Receivers by (kind, layer); a ValueError names a receiver whose input the model does not expose
    (an MLP that reads the block's input, with attention in parallel, has no resid_mid)."""
    groups: dict[tuple[str, int], list[Site]] = {}
    for r in dict.fromkeys(e.receiver for e in edges):
        if input_hook(r.kind, r.layer) not in model.hook_dict:
            raise ValueError(f"edges into {r} are not supported on model {model_name(model)}: it has no hook "
                             f"{input_hook(r.kind, r.layer)!r} to read the receiver's input from")
        groups.setdefault((r.kind, r.layer), []).append(r)
    return groups


def check_receivers(model: Any, groups: dict[tuple[str, int], list[Site]], acts: dict[str, Tensor]) -> None:
    """The receiver functions must reproduce the model's own outputs on the base run: edges, exact or
    estimated, are computed through them."""
    for kind, layer in groups:
        x = acts[input_hook(kind, layer)]
        if kind in HEAD_INPUTS:
            x = x[:, :, None].expand(-1, -1, n_inputs(model, kind), -1)
        expected = acts[output_hook(kind, layer)]
        unsupported = f"edges into {kind}[L{layer}] are not supported on model {model_name(model)}"
        try:
            error = float((receive(model, kind, layer, x) - expected).abs().max())
        except (AttributeError, RuntimeError, TypeError) as failure:  # e.g. no ln1/ln2, an MLP that needs more
            raise ValueError(f"{unsupported}: the receiver cannot be recomputed from its input "
                             f"({type(failure).__name__}: {str(failure).splitlines()[0][:160]})") from None
        if error > 1e-4 * max(1.0, float(expected.abs().max())):
            raise ValueError(f"{unsupported}: recomputing the receiver from its input misses the model's own output "
                             f"by {error:.2g}")
