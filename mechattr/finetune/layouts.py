"""Where a head, a key/value group or an MLP neuron lives in a model's parameters.

One declarative `Layout` per parameter layout, read through the `TransformerBridge`'s own parameter
names (`model.layers.0._original_component.self_attn._original_component.q_proj._original_component.weight`):
each role lists the parameters it slices and the axis that runs over its units. A head owns `d_head`
consecutive entries along that axis, a neuron one.

Fused projections need no strides here: the bridge splits a fused QKV (GPT-2's Conv1D `c_attn`,
GPT-NeoX's and Bloom's per-head interleaved `query_key_value`, Falcon's, Phi-3's `qkv_proj`) and Phi-3's
`gate_up_proj` into separate head-major `[out, in]` projections when it boots, and its forward reads
only those. The fused originals stay registered as parameters that nothing reads; a layout lists them
as `unused`, and no mask ever selects them (training them would only inflate the count).
"""

from dataclasses import dataclass
from typing import Any

__all__ = ["Slice", "Layout", "LAYOUTS", "SUPPORTED_FAMILIES", "find_layout", "unused_parameters"]

_WRAP = "._original_component."


def _name(path: str) -> str:
    """A bridge parameter name from a short path: each '/' is a wrapped module (`._original_component.`)."""
    return path.replace("/", _WRAP)


@dataclass(frozen=True)
class Slice:
    """The entries of one parameter that belong to one unit (head, key/value group or neuron)."""

    param: str  # parameter name after the layer prefix
    axis: int  # axis that runs over the units (0: rows or bias entries, 1: columns)
    optional: bool = False  # absent in some models of the family (biases)


@dataclass(frozen=True)
class Layout:
    """Parameter layout of one or more architecture families, as seen through a `TransformerBridge`."""

    name: str
    families: tuple[str, ...]  # families (named as in `mechattr.families`) checked to have this layout
    layer: str  # prefix of layer l's parameters, formatted with `layer`
    attn: tuple[str, ...]  # prefixes (after the layer's) of the attention block's parameters
    mlp: tuple[str, ...]  # prefixes (after the layer's) of the MLP block's parameters
    q: tuple[Slice, ...]  # per query head: its W_Q rows (and bias entries)
    o: tuple[Slice, ...]  # per query head: its W_O entries
    k: tuple[Slice, ...]  # per key/value group: its W_K rows (and bias entries)
    v: tuple[Slice, ...]  # per key/value group: its W_V rows (and bias entries)
    neuron: tuple[Slice, ...]  # per MLP neuron: its input entries and output entries
    embed: tuple[str, ...]  # full names of the embedding parameters
    unused: tuple[str, ...] = ()  # prefixes (after the layer's) of parameters the forward never reads
    no_neurons: str = ""  # why neuron sites cannot be masked; "" when they can
    marker: str = ""  # a layer parameter only this layout has, besides its W_Q and neuron slices

    def probes(self) -> tuple[str, ...]:
        """Layer-0 parameters that every model of this layout has."""
        own = [self.q[0].param, *(s.param for s in self.neuron[:1]), *([self.marker] if self.marker else [])]
        return tuple(self.layer.format(layer=0) + p for p in own)


def _proj(path: str, axis: int, bias: bool | None) -> tuple[Slice, ...]:
    """A projection's weight slice, and its bias entries (bias=None: only in some models)."""
    weight = Slice(_name(f"{path}/weight"), axis)
    if bias is False:
        return (weight,)
    return weight, Slice(_name(f"{path}/bias"), 0, optional=bias is None)


def _linear_mlp(up: str, down: str, up_bias: bool | None = True) -> tuple[Slice, ...]:
    """Neuron i of a non-gated nn.Linear MLP: row i (and bias entry i) of `up`, column i of `down`."""
    return (*_proj(up, 0, up_bias), Slice(_name(f"{down}/weight"), 1))


# Hugging Face Llama family: nn.Linear weights are [out, in], so a head's W_Q is a block of rows and its
# W_O a block of columns; the MLP is gated (gate, up, down). The o_proj bias is shared by all heads.
_LLAMA_ATTN = dict(q=_proj("self_attn/q_proj", 0, None), k=_proj("self_attn/k_proj", 0, None),
                   v=_proj("self_attn/v_proj", 0, None), o=_proj("self_attn/o_proj", 1, False))
_GATED = (*_proj("mlp/gate_proj", 0, None), *_proj("mlp/up_proj", 0, None), Slice(_name("mlp/down_proj/weight"), 1))

LLAMA = Layout(
    name="llama",
    families=("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "stablelm"),
    layer=_name("model.layers.{layer}/"), attn=(_name("self_attn."),), mlp=(_name("mlp."),), **_LLAMA_ATTN,
    neuron=_GATED, embed=(_name("model.embed_tokens/weight"),),
)

# OLMo-2 normalises the whole query (key) projection before splitting it into heads, so its q_norm
# (k_norm) weight has one entry per query (key) channel: head h owns entries h*d_head:(h+1)*d_head.
# (Qwen3's and Gemma 3's per-head norms are one [d_head] vector shared by every head: no unit owns it.)
OLMO2 = Layout(
    name="olmo2", families=("olmo2",),
    layer=LLAMA.layer, attn=LLAMA.attn, mlp=LLAMA.mlp,
    q=(*LLAMA.q, Slice(_name("self_attn/q_norm/weight"), 0)), k=(*LLAMA.k, Slice(_name("self_attn/k_norm/weight"), 0)),
    v=LLAMA.v, o=LLAMA.o, neuron=_GATED, embed=LLAMA.embed,
)

# Mixtral: Llama attention; the MLP is a mixture of experts whose weights are stacked per expert
# ([n_experts, 2 * d_mlp, d_model]). A neuron site names no expert, so neurons are not maskable.
MIXTRAL = Layout(
    name="mixtral", families=("mixtral",),
    layer=LLAMA.layer, attn=LLAMA.attn, mlp=LLAMA.mlp, **_LLAMA_ATTN, neuron=(), embed=LLAMA.embed,
    no_neurons="its MLP is a mixture of experts, and a neuron site does not say which expert's neuron it "
               "means; mask mlp_out (the whole layer's experts and router) instead",
    marker=_name("mlp/experts.gate_up_proj"),
)

# Phi-1/2: Llama-style names with biases, W_O in `dense`, a non-gated fc1/fc2 MLP.
PHI = Layout(
    name="phi", families=("phi",),
    layer=LLAMA.layer, attn=LLAMA.attn, mlp=LLAMA.mlp,
    q=_proj("self_attn/q_proj", 0, True), k=_proj("self_attn/k_proj", 0, True), v=_proj("self_attn/v_proj", 0, True),
    o=_proj("self_attn/dense", 1, False), neuron=_linear_mlp("mlp/fc1", "mlp/fc2"), embed=LLAMA.embed,
)

# Phi-3: fused qkv_proj and gate_up_proj, split by the bridge into q/k/v and gate/in projections.
PHI3 = Layout(
    name="phi3", families=("phi3",),
    layer=LLAMA.layer, attn=LLAMA.attn, mlp=LLAMA.mlp,
    q=_proj("self_attn.q", 0, None), k=_proj("self_attn.k", 0, None), v=_proj("self_attn.v", 0, None),
    o=_proj("self_attn.o", 1, False),
    neuron=(Slice(_name("mlp.gate/weight"), 0), Slice(_name("mlp.in/weight"), 0), Slice(_name("mlp/down_proj/weight"), 1)),
    embed=LLAMA.embed, unused=(_name("self_attn.qkv/"), _name("mlp/gate_up_proj.")),
)

# GPT-2: the bridge splits Conv1D `c_attn` ([in, 3 * out]) into [out, in] q/k/v projections, but keeps
# the other Conv1D weights as stored, [in, out]: W_O (`attn.o`, c_proj) and `c_proj` of the MLP are
# sliced by rows, `c_fc` by columns.
GPT2 = Layout(
    name="gpt2", families=("gpt2",),
    layer=_name("transformer.h.{layer}/"), attn=(_name("attn."),), mlp=(_name("mlp."),),
    q=_proj("attn.q", 0, True), k=_proj("attn.k", 0, True), v=_proj("attn.v", 0, True), o=_proj("attn.o", 0, False),
    neuron=(*_proj("mlp/c_fc", 1, True), Slice(_name("mlp/c_proj/weight"), 0)),
    embed=(_name("transformer.wte/weight"), _name("transformer.wpe/weight")), unused=(_name("attn.qkv/"),),
)

# GPT-NeoX (Pythia): `query_key_value` interleaves [q, k, v] per head; the bridge de-interleaves it into
# head-major q/k/v projections.
GPT_NEOX = Layout(
    name="gpt_neox", families=("gpt_neox",),
    layer=_name("gpt_neox.layers.{layer}/"), attn=(_name("attention."),), mlp=(_name("mlp."),),
    q=_proj("attention.q", 0, True), k=_proj("attention.k", 0, True), v=_proj("attention.v", 0, True),
    o=_proj("attention.o", 1, False), neuron=_linear_mlp("mlp/dense_h_to_4h", "mlp/dense_4h_to_h"),
    embed=(_name("gpt_neox.embed_in/weight"),), unused=(_name("attention.qkv/"),),
)

# GPT-J: separate nn.Linear q/k/v (no biases in the checkpoint), W_O in `out_proj`, fc_in/fc_out MLP.
GPTJ = Layout(
    name="gptj", families=("gptj",),
    layer=_name("transformer.h.{layer}/"), attn=(_name("attn/"),), mlp=(_name("mlp/"),),
    q=_proj("attn/q_proj", 0, None), k=_proj("attn/k_proj", 0, None), v=_proj("attn/v_proj", 0, None),
    o=_proj("attn/out_proj", 1, False), neuron=_linear_mlp("mlp/fc_in", "mlp/fc_out"),
    embed=(_name("transformer.wte/weight"),),
)

# OPT: the MLP's fc1/fc2 sit directly in the decoder layer (no MLP module).
OPT = Layout(
    name="opt", families=("opt",),
    layer=_name("model.decoder.layers.{layer}/"), attn=(_name("self_attn/"),), mlp=(_name("fc1/"), _name("fc2/")),
    q=_proj("self_attn/q_proj", 0, True), k=_proj("self_attn/k_proj", 0, True), v=_proj("self_attn/v_proj", 0, True),
    o=_proj("self_attn/out_proj", 1, False), neuron=_linear_mlp("fc1", "fc2"),
    embed=(_name("model.decoder.embed_tokens/weight"), _name("model.decoder.embed_positions/weight")),
)

# Bloom and Falcon: fused `query_key_value` (Bloom: interleaved per head; Falcon: multi-query), split by
# the bridge into q/k/v; W_O in `o`, a dense_h_to_4h/dense_4h_to_h MLP. (Falcon's new architecture with
# several key/value heads does not boot in TransformerLens 4.3.)
BLOOM = Layout(
    name="bloom", families=("bloom", "falcon"),
    layer=_name("transformer.h.{layer}/"), attn=(_name("self_attention."),), mlp=(_name("mlp."),),
    q=_proj("self_attention.q", 0, None), k=_proj("self_attention.k", 0, None),
    v=_proj("self_attention.v", 0, None), o=_proj("self_attention.o", 1, False),
    neuron=_linear_mlp("mlp/dense_h_to_4h", "mlp/dense_4h_to_h", None),
    embed=(_name("transformer.word_embeddings/weight"),), unused=(_name("self_attention.qkv/"),),
)

# TransformerLens-native models (`mechattr.native_model`): nn.Linear q/k/v/o and a non-gated fc_in/fc_out
# MLP, all with biases.
NATIVE = Layout(
    name="native", families=("native",),
    layer=_name("layers.{layer}/"), attn=(_name("attn."),), mlp=(_name("mlp."),),
    q=_proj("attn/q", 0, True), k=_proj("attn/k", 0, True), v=_proj("attn/v", 0, True), o=_proj("attn/o", 1, False),
    neuron=_linear_mlp("mlp/fc_in", "mlp/fc_out"),
    embed=(_name("tok_embed/weight"), _name("pos/weight")),
)

LAYOUTS: tuple[Layout, ...] = (LLAMA, OLMO2, MIXTRAL, PHI, PHI3, GPT2, GPT_NEOX, GPTJ, OPT, BLOOM, NATIVE)
# The Hugging Face families of `mechattr.families` with a layout (Mixtral: heads and blocks, no neurons).
SUPPORTED_FAMILIES: tuple[str, ...] = tuple(f for layout in LAYOUTS if layout is not NATIVE for f in layout.families)


def _owned(layout: Layout, params: dict[str, Any]) -> int | None:
    """How many layer-0 parameters the layout's slices name, or None when it does not fit: a probe or a
    required slice is missing, or a slice's axis is not as long as the first slice's of its role (the
    units must tile every slice alike; this tells OLMo-2's per-channel q_norm from Qwen3's shared one)."""
    if not all(p in params for p in layout.probes()):
        return None
    prefix = layout.layer.format(layer=0)
    named = 0
    for role in ("q", "o", "k", "v", "neuron"):
        extent = None
        for part in getattr(layout, role):
            param = params.get(prefix + part.param)
            if param is None:
                if part.optional:
                    continue
                return None
            if part.axis >= param.dim() or extent not in (None, param.shape[part.axis]):
                return None
            extent = param.shape[part.axis]
            named += 1
    return named


def _fitting(params: dict[str, Any]) -> Layout | None:
    """The layout that fits (the most specific one when several fit), or None."""
    fits = [(n, -i, layout) for i, layout in enumerate(LAYOUTS) if (n := _owned(layout, params)) is not None]
    return max(fits, key=lambda fit: fit[:2])[2] if fits else None


def unused_parameters(model: Any) -> set[str]:
    """Names of the parameters the model's forward never reads (a known layout's `unused`; else none)."""
    params = dict(model.named_parameters())
    layout = _fitting(params)
    if layout is None:
        return set()
    unused = tuple(layout.layer.format(layer=layer) + p for layer in range(model.cfg.n_layers) for p in layout.unused)
    return {name for name in params if unused and name.startswith(unused)}


def find_layout(model: Any) -> Layout:
    """The layout that fits the model's parameters (the most specific one when several fit);
    a ValueError names the model and the known layouts otherwise."""
    params = dict(model.named_parameters())
    layout = _fitting(params)
    if layout is not None:
        return layout
    cfg = getattr(model, "cfg", None)
    name = getattr(cfg, "model_name", None) or type(model).__name__
    first = sorted(params)[:4]
    raise ValueError(f"no known parameter layout fits model {name!r}; known layouts: "
                     + ", ".join(f"{layout.name} ({', '.join(layout.families)}; expects {layout.probes()[0]!r})"
                                 for layout in LAYOUTS)
                     + f"; the model's first parameters: {first}")
