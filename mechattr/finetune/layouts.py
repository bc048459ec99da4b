"""Where a head, a key/value group or an MLP neuron lives in a model's parameters.

One declarative `Layout` per architecture, read through the `TransformerBridge`'s own parameter names
(`model.layers.0._original_component.self_attn._original_component.q_proj._original_component.weight`):
each role lists the parameters it slices and the axis that runs over its units. A head owns `d_head`
consecutive entries along that axis, a neuron one.
"""

from dataclasses import dataclass
from typing import Any

__all__ = ["Slice", "Layout", "LAYOUTS", "find_layout"]


def _path(*modules: str) -> str:
    """A bridge parameter path: every wrapped module sits under `_original_component`."""
    return "._original_component.".join(modules)


@dataclass(frozen=True)
class Slice:
    """The entries of one parameter that belong to one unit (head, key/value group or neuron)."""

    param: str  # parameter name after the layer prefix
    axis: int  # axis that runs over the units (0: rows or bias entries, 1: columns)
    optional: bool = False  # absent in some models of the family (biases)


@dataclass(frozen=True)
class Layout:
    """Parameter layout of one architecture family, as seen through a `TransformerBridge`."""

    name: str
    layer: str  # prefix of layer l's parameters, formatted with `layer`
    attn: str  # prefix (after the layer's) of every attention-block parameter
    mlp: str  # prefix (after the layer's) of every MLP-block parameter
    q: tuple[Slice, ...]  # per query head: its W_Q rows (and bias entries)
    o: tuple[Slice, ...]  # per query head: its W_O columns
    k: tuple[Slice, ...]  # per key/value group: its W_K rows (and bias entries)
    v: tuple[Slice, ...]  # per key/value group: its W_V rows (and bias entries)
    neuron: tuple[Slice, ...]  # per MLP neuron: its input row(s) and output column
    embed: tuple[str, ...]  # full names of the embedding parameters

    def probe(self) -> str:
        """A parameter only this layout has (layer 0's W_Q)."""
        return self.layer.format(layer=0) + self.q[0].param


def _hf_attn(proj: str, axis: int) -> tuple[Slice, ...]:
    return (Slice(_path("self_attn", proj, "weight"), axis),
            Slice(_path("self_attn", proj, "bias"), 0, optional=True))


# Hugging Face Llama family (Llama, Mistral, Qwen2, SmolLM2): nn.Linear weights are [out, in], so a
# head's W_Q is a block of rows and its W_O a block of columns; the MLP is gated (gate, up, down).
LLAMA = Layout(
    name="llama",
    layer="model.layers.{layer}._original_component.",
    attn="self_attn.",
    mlp="mlp.",
    q=_hf_attn("q_proj", 0),
    o=(Slice(_path("self_attn", "o_proj", "weight"), 1),),  # the o_proj bias is shared by all heads
    k=_hf_attn("k_proj", 0),
    v=_hf_attn("v_proj", 0),
    neuron=(Slice(_path("mlp", "gate_proj", "weight"), 0), Slice(_path("mlp", "up_proj", "weight"), 0),
            Slice(_path("mlp", "down_proj", "weight"), 1)),
    embed=("model.embed_tokens._original_component.weight",),
)

# TransformerLens-native models (`mechattr.native_model`): nn.Linear q/k/v/o and a non-gated fc_in/fc_out
# MLP, all with biases.
NATIVE = Layout(
    name="native",
    layer="layers.{layer}._original_component.",
    attn="attn.",
    mlp="mlp.",
    q=(Slice(_path("attn", "q", "weight"), 0), Slice(_path("attn", "q", "bias"), 0)),
    o=(Slice(_path("attn", "o", "weight"), 1),),
    k=(Slice(_path("attn", "k", "weight"), 0), Slice(_path("attn", "k", "bias"), 0)),
    v=(Slice(_path("attn", "v", "weight"), 0), Slice(_path("attn", "v", "bias"), 0)),
    neuron=(Slice(_path("mlp", "fc_in", "weight"), 0), Slice(_path("mlp", "fc_in", "bias"), 0),
            Slice(_path("mlp", "fc_out", "weight"), 1)),
    embed=("tok_embed._original_component.weight", "pos._original_component.weight"),
)

LAYOUTS: tuple[Layout, ...] = (LLAMA, NATIVE)


def find_layout(model: Any) -> Layout:
    """The layout whose layer-0 W_Q the model has; a ValueError names the known layouts otherwise."""
    names = {name for name, _ in model.named_parameters()}
    for layout in LAYOUTS:
        if layout.probe() in names:
            return layout
    first = sorted(names)[:4]
    raise ValueError("no known parameter layout fits this model; known layouts: "
                     + ", ".join(f"{layout.name} (expects {layout.probe()!r})" for layout in LAYOUTS)
                     + f"; the model's first parameters: {first}")
