"""Where the parameters a bridge reads live in its Hugging Face checkpoint.

Most are the checkpoint's own tensors, often under a second name (the bridge's `attn.o` is GPT-2's
`attn.c_proj`). Fused projections are not: TransformerLens 4.3 splits them at boot into copies that its
forward reads instead (see `mechattr.finetune.layouts`), so training changes the copies and leaves the
checkpoint's fused tensor as it was. `FUSIONS` holds, per family, the inverse of the bridge's split, read
from TransformerLens (`supported_architectures/{neox,bloom,falcon,phi3}.py`; GPT-2 uses
`JointQKVAttentionBridge._default_split_qkv_matrix`). Falcon's key is `variant(config)`: "falcon" when
multi_query, "falcon-per-head" otherwise.

| family | fused tensor | the bridge's split | inverse |
|---|---|---|---|
| gpt2 | Conv1D `c_attn` [in, 3 * out] | thirds of the columns, each transposed | `_conv1d` |
| gpt_neox, bloom, falcon-per-head | `query_key_value` [q_0 k_0 v_0 q_1 ...] | de-interleaved per head | `_per_head` |
| falcon (multi-query) | `query_key_value` [q; k; v] | rows [d_model, d_head, d_head] | `_concat` |
| phi3 | `qkv_proj` [q; k; v], `gate_up_proj` [gate; up] | rows by size | `_concat` |

Biases are split like the weights' output axis and joined the same way. A family whose split is not listed
(Falcon's new decoder architecture) has no entry: its copies have no place in the checkpoint, and export
refuses a model or delta that changed them.
"""

import copy
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from mechattr.finetune.delta import hf_name

__all__ = ["Fusion", "FUSIONS", "Place", "variant", "checkpoint_places", "skeleton"]

_LEAVES = ("weight", "bias")


def _concat(parts: Sequence[Tensor], n_heads: int) -> Tensor:
    """[q; k; v] (or [gate; up]) stacked along the output axis."""
    return torch.cat(list(parts), dim=0)


def _per_head(parts: Sequence[Tensor], n_heads: int) -> Tensor:
    """Each head's d_head output rows of q, k and v in turn: the part axis sits between head and row."""
    return torch.stack([p.unflatten(0, (n_heads, -1)) for p in parts], dim=1).flatten(0, 2)  # (3 * n * d, ...)


def _conv1d(parts: Sequence[Tensor], n_heads: int) -> Tensor:
    """GPT-2's Conv1D stores weights [in, out], the copies are nn.Linear [out, in]: [q | k | v] along the
    columns (a bias, 1-D, is only concatenated)."""
    return torch.cat([p.movedim(0, -1) for p in parts], dim=-1)


@dataclass(frozen=True)
class Fusion:
    """One fused Hugging Face projection of every layer, and the split copies the bridge reads instead."""

    fused: str  # the Hugging Face module, formatted with `layer`; its weight (and bias) hold the parts
    parts: tuple[str, ...]  # the bridge's split modules (names without wrappers), in the fused order
    join: Callable[[Sequence[Tensor], int], Tensor]  # (parts, n_heads) -> fused tensor: the split's inverse


def _qkv(fused: str, attention: str, join: Callable[[Sequence[Tensor], int], Tensor]) -> Fusion:
    return Fusion(fused, tuple(f"{attention}.{role}" for role in "qkv"), join)


_SELF_ATTENTION = "transformer.h.{layer}.self_attention"  # Bloom's and Falcon's attention
FUSIONS: dict[str, tuple[Fusion, ...]] = {
    "gpt2": (_qkv("transformer.h.{layer}.attn.c_attn", "transformer.h.{layer}.attn", _conv1d),),
    "gpt_neox": (_qkv("gpt_neox.layers.{layer}.attention.query_key_value", "gpt_neox.layers.{layer}.attention",
                      _per_head),),
    "bloom": (_qkv(f"{_SELF_ATTENTION}.query_key_value", _SELF_ATTENTION, _per_head),),
    "falcon": (_qkv(f"{_SELF_ATTENTION}.query_key_value", _SELF_ATTENTION, _concat),),  # multi-query
    "falcon-per-head": (_qkv(f"{_SELF_ATTENTION}.query_key_value", _SELF_ATTENTION, _per_head),),
    "phi3": (_qkv("model.layers.{layer}.self_attn.qkv_proj", "model.layers.{layer}.self_attn", _concat),
             Fusion("model.layers.{layer}.mlp.gate_up_proj",
                    ("model.layers.{layer}.mlp.gate", "model.layers.{layer}.mlp.in"), _concat)),
}


def variant(config: Any) -> str:
    """The `FUSIONS` key of a Hugging Face config: its model_type, Falcon's three layouts told apart."""
    if config.model_type != "falcon":
        return config.model_type
    if getattr(config, "new_decoder_architecture", False):
        return "falcon-new-decoder-architecture"  # grouped key/value heads; does not boot in TransformerLens 4.3
    return "falcon" if getattr(config, "multi_query", True) else "falcon-per-head"


@dataclass(frozen=True, eq=False)
class Place:
    """Where one bridge parameter's entries are in the checkpoint."""

    name: str  # the Hugging Face parameter
    shape: tuple[int, ...]  # its shape
    index: Tensor | None = None  # shaped like the bridge parameter: flat index of each entry; None: same tensor


def skeleton(hf_model: Any) -> Any:
    """The Hugging Face architecture of `hf_model`, built on the meta device (its own tensors, unallocated)."""
    with torch.device("meta"):
        return type(hf_model)(copy.deepcopy(hf_model.config))


def checkpoint_places(model: Any) -> dict[str, Place]:
    """{parameter name: `Place`} for `model`: a bridge (names as `named_parameters` gives them), or a plain
    or peft Hugging Face model (its names, wrappers removed). A bridge parameter only the bridge reads, whose
    fusion is not in `FUSIONS`, has no entry."""
    if not hasattr(model, "original_model"):
        return {n: Place(hf_name(n), tuple(p.shape)) for n, p in model.named_parameters(remove_duplicate=False)}
    shapes = {n: tuple(t.shape) for n, t in skeleton(model.original_model).state_dict().items()}
    aliases: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(param), []).append(hf_name(name))
    places = {}
    for name, param in model.named_parameters():
        own = [alias for alias in aliases[id(param)] if alias in shapes]
        if own:  # the checkpoint's tensor itself, under the name the checkpoint gives it
            places[name] = Place(own[0], shapes[own[0]])
    return {**places, **_split_places(model, shapes)}


def _split_places(model: Any, shapes: dict[str, tuple[int, ...]]) -> dict[str, Place]:
    """The places of the bridge's split copies of known fused projections, in every layer."""
    by_plain_name = {hf_name(n): (n, p) for n, p in model.named_parameters()}
    places = {}
    for fusion in FUSIONS.get(variant(model.original_model.config), ()):
        for layer in range(model.cfg.n_layers):
            for leaf in _LEAVES:
                names = [f"{part.format(layer=layer)}.{leaf}" for part in fusion.parts]
                fused = f"{fusion.fused.format(layer=layer)}.{leaf}"
                places.update(_fused_places(fusion, fused, names, by_plain_name, shapes, model.cfg.n_heads))
    return places


def _fused_places(fusion: Fusion, fused: str, names: list[str], by_plain_name: dict[str, tuple[str, Tensor]],
                  shapes: dict[str, tuple[int, ...]], n_heads: int) -> dict[str, Place]:
    """Each part's entries in `fused`: joining tensors of part-entry numbers shows which part entry each
    fused entry holds, and inverting that permutation gives each part entry's fused index."""
    missing = [n for n in names if n not in by_plain_name]
    if len(missing) == len(names):  # a projection without bias
        return {}
    if missing:
        raise ValueError(f"the bridge splits {fused!r} into {names}, but lacks {missing}")
    parts = [by_plain_name[n][1] for n in names]
    part_shapes = [tuple(p.shape) for p in parts]
    starts = [0]
    for p in parts:
        starts.append(starts[-1] + p.numel())
    numbers = fusion.join([torch.arange(a, b).view(p.shape) for a, b, p in zip(starts, starts[1:], parts)], n_heads)
    if fused not in shapes or tuple(numbers.shape) != shapes[fused]:
        found = shapes[fused] if fused in shapes else "no such tensor in the checkpoint"
        raise ValueError(f"cannot fuse the bridge's {names} {part_shapes} back into {fused!r}: joined they are "
                         f"{tuple(numbers.shape)}, the checkpoint's tensor is {found}")
    where = torch.empty(starts[-1], dtype=torch.long)
    where[numbers.flatten()] = torch.arange(starts[-1])  # part entry number -> flat index in the fused tensor
    return {by_plain_name[n][0]: Place(fused, shapes[fused], where[a:b].view(p.shape))
            for n, a, b, p in zip(names, starts, starts[1:], parts)}
