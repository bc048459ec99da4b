"""Masks: which parameter entries a set of sites owns.

`masks(model, sites)` returns `{param_name: bool tensor shaped like the parameter}`, the union over all
sites (a site never clears what another set). Positions are ignored: weights are shared across positions.

Ownership, by site kind:
- z, q, pattern (a query head h): W_Q rows and bias entries of h (and its q_norm entries on OLMo-2),
  W_O columns of h; with `kv="any"` also the W_K / W_V rows of h's key/value group (shared by every
  head of the group on GQA models); with `kv="never"` those are never trained by head sites.
- k, v (a key/value group g): W_K (resp. W_V) rows and bias entries of g (W_K: k_norm entries on OLMo-2).
- neuron i: row i of the input projection(s) (gate and up when gated), its bias entry, column i of the
  output projection (rows and columns swap for Conv1D weights, stored [in, out]). Mixture-of-experts
  MLPs have no maskable neurons: a neuron site there is a ValueError naming the model.
- attn_out at layer l: every parameter of layer l's attention block; mlp_out: the MLP block; resid_pre,
  resid_mid, resid_post: both blocks of layer l; embed: the embedding matrices. A block never includes a
  fused projection that the bridge split at boot and no longer reads (see `mechattr.finetune.layouts`).
`head=None` or `neuron=None` means every head or neuron of the layer.
"""

from typing import Any, Iterable

import torch
from jaxtyping import Bool
from torch import Tensor

from mechattr.finetune.layouts import Layout, find_layout, unused_parameters
from mechattr.models import model_name, model_shape
from mechattr.sites import Site, validate

__all__ = ["masks", "n_trained", "full_masks", "union", "KV_MODES"]

KV_MODES = ("any", "never")  # head sites train their key/value group: whenever selected, or never
Unit = tuple[str, int | None]  # (role, unit index); None: every unit of the role, or the whole block

_BLOCKS = {"attn_out": ("attn",), "mlp_out": ("mlp",), "resid_pre": ("attn", "mlp"),
           "resid_mid": ("attn", "mlp"), "resid_post": ("attn", "mlp"), "embed": ("embed",)}


def _units(site: Site, shape: dict[str, int], kv: str) -> list[Unit]:
    """The (role, unit) pairs a site owns."""
    if site.kind in _BLOCKS:
        return [(block, None) for block in _BLOCKS[site.kind]]
    if site.kind == "neuron":
        return [("neuron", site.neuron)]
    if site.kind in ("k", "v"):
        return [(site.kind, site.head)]
    heads = range(shape["n_heads"]) if site.head is None else [site.head]
    per_group = shape["n_heads"] // shape["n_kv_heads"]
    units: list[Unit] = [(role, h) for h in heads for role in ("q", "o")]
    if kv == "any":
        groups = sorted({h // per_group for h in heads})
        units += [(role, g) for g in groups for role in ("k", "v")]
    return units


def _mark(out: dict[str, Tensor], params: dict[str, Tensor], name: str, axis: int | None,
          start: int = 0, width: int = 0) -> None:
    """Set entries [start, start + width) along `axis` (all entries when axis is None) of param `name`."""
    mask = out.get(name)
    if mask is None:  # not setdefault: its default would allocate a parameter-sized mask on every call
        mask = out[name] = torch.zeros(params[name].shape, dtype=torch.bool, device=params[name].device)
    if axis is None:
        mask.fill_(True)
    else:
        mask.narrow(axis, start, width).fill_(True)


def _units_of(role: str, shape: dict[str, int], d_head: int) -> tuple[int, int]:
    """(number of units, entries per unit) of a role along its axis."""
    if role == "neuron":
        return shape["d_mlp"], 1
    return shape["n_kv_heads" if role in ("k", "v") else "n_heads"], d_head


def _mark_slices(out, params, model: Any, layout: Layout, layer: int, role: str, unit: int | None,
                 units: tuple[int, int]) -> None:
    prefix = layout.layer.format(layer=layer)
    n_units, width = units
    for part in getattr(layout, role):
        name = prefix + part.param
        if name not in params:
            if part.optional:
                continue
            raise ValueError(f"model {model_name(model)!r}: layout {layout.name!r} expects parameter {name!r}, "
                             "which the model lacks")
        if params[name].shape[part.axis] != n_units * width:
            raise ValueError(f"model {model_name(model)!r}: parameter {name!r} has {params[name].shape[part.axis]} "
                             f"entries along axis {part.axis}, but {n_units} {role} units of {width} need "
                             f"{n_units * width} (layout {layout.name!r}; the model's config disagrees with its weights)")
        if unit is None:
            _mark(out, params, name, None)
        else:
            _mark(out, params, name, part.axis, unit * width, width)


def _mark_blocks(out, params, layout: Layout, layer: int, role: str) -> None:
    """Every parameter of layer `layer`'s attention or MLP block that the forward reads."""
    prefix = layout.layer.format(layer=layer)
    starts = tuple(prefix + p for p in getattr(layout, role))
    unused = tuple(prefix + p for p in layout.unused)
    for name in params:
        if name.startswith(starts) and not name.startswith(unused):
            _mark(out, params, name, None)


def masks(model: Any, sites: Iterable[Site], kv: str = "any") -> dict[str, Bool[Tensor, "..."]]:
    """{parameter name: bool mask shaped like it} for the entries the sites own (see module doc).

    Only parameters with at least one owned entry appear.
    """
    if kv not in KV_MODES:
        raise ValueError(f"kv must be one of {KV_MODES}, got {kv!r}")
    sites = list(sites)
    validate(sites, model)
    layout = find_layout(model)
    shape = model_shape(model)
    params = dict(model.named_parameters())
    out: dict[str, Tensor] = {}
    for site in sites:
        if site.kind == "neuron" and layout.no_neurons:
            raise ValueError(f"site {site}: neuron sites cannot be masked on model {model_name(model)!r} "
                             f"(layout {layout.name!r}): {layout.no_neurons}")
        for role, unit in _units(site, shape, kv):
            if role == "embed":
                for name in layout.embed:
                    _mark(out, params, name, None)
            elif role in ("attn", "mlp"):
                _mark_blocks(out, params, layout, site.layer, role)
            else:
                _mark_slices(out, params, model, layout, site.layer, role, unit,
                             _units_of(role, shape, model.cfg.d_head))
    return out


def full_masks(model: Any) -> dict[str, Bool[Tensor, "..."]]:
    """Every entry of every parameter the forward reads: full fine-tuning. (The fused projections a bridge
    split at boot are copies nothing reads; counting them would inflate the trained-entry count.)"""
    unused = unused_parameters(model)
    return {name: torch.ones(p.shape, dtype=torch.bool, device=p.device) for name, p in model.named_parameters()
            if name not in unused}


def union(*mask_sets: dict[str, Tensor]) -> dict[str, Bool[Tensor, "..."]]:
    """Entry-wise OR of several mask dictionaries."""
    out: dict[str, Tensor] = {}
    for mask_set in mask_sets:
        for name, mask in mask_set.items():
            out[name] = out[name] | mask if name in out else mask.clone()
    return out


def n_trained(mask_set: dict[str, Tensor]) -> int:
    """Number of parameter entries the masks select."""
    return int(sum(int(m.count_nonzero()) for m in mask_set.values()))
