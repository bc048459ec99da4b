"""Deltas: the trained entries of a fine-tuned model, saved as indices and values.

Coordinates: a delta holds (trained - base) for entries of the parameters of the model it was trained
on, and records which weights those are (`coordinates`):
- `COMPAT`: a bridge in compatibility mode (`mechattr.load_model(name)`). Compatibility mode folds
  LayerNorm into the weights and centres the unembedding in place, so those weights are not the
  original checkpoint's and the delta applies only to a model loaded the same way.
- `CHECKPOINT`: the checkpoint's own weights (`mechattr.load_model(name, compatibility=False)`, or a
  plain Hugging Face model). The delta applies to the raw bridge and to the plain `transformers` model
  alike: `apply` matches a parameter by its bridge name or by its Hugging Face name (the bridge's with
  every `._original_component.` removed). Except on fused projections (GPT-2's `c_attn`, ...): the
  bridge reads split copies of them, so a delta keyed by the fused Hugging Face tensor
  (`mechattr.finetune.export.checkpoint_delta`) applies to the plain model only, and the bridge refuses it.
`apply` checks the base: each delta carries the base values of a few of its entries ("probes") and
refuses a model whose values there differ.

The trainer writes base + delta into the weights, so applying a saved delta (scale 1) to a fresh copy
of the base model reproduces the trained weights bit for bit.

File format (`save`): one safetensors file with, per parameter NAME, `NAME::values` (the delta of each
trained entry), `NAME::indices` (int64 flat C-order indices of those entries; absent when every entry
is trained, in order) and `NAME::probe_index` / `NAME::probe_value`; its metadata key "mechattr" holds
JSON {format, base_model, coordinates, shapes, sites}. Applying it needs only torch and safetensors:

    tensors = safetensors.torch.load_file(path)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, values in tensors.items():
            if key.endswith("::values"):
                name = key.removesuffix("::values")
                flat, index = params[name].data.view(-1), tensors.get(name + "::indices")
                flat.copy_(flat + values) if index is None else flat.index_copy_(0, index, flat[index] + values)
"""

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor

from mechattr.finetune.layouts import unused_parameters
from mechattr.selection import SiteSet
from mechattr.storage import write_safetensors

__all__ = ["Delta", "merge", "COMPAT", "CHECKPOINT", "COORDINATES", "coordinates_of", "hf_name", "DELTA_FILE"]

DELTA_FILE = "delta.safetensors"  # where a run directory or an exported model folder keeps its Delta

COMPAT = "transformer_bridge_compat"  # weights as `mechattr.load_model` returns them (compatibility mode)
CHECKPOINT = "checkpoint"  # the checkpoint's own weights: a raw bridge or a plain Hugging Face model
# What a delta of each coordinates tag applies to, for messages (formatted with the base model's name).
COORDINATES = {COMPAT: "mechattr.load_model({name!r}) (compatibility-mode weights, not the original checkpoint)",
               CHECKPOINT: "the original checkpoint (mechattr.load_model({name!r}, compatibility=False), or the "
                           "plain Hugging Face model)"}
_WRAP = "._original_component."
_FORMAT = "mechattr.delta/1"
_N_PROBES = 8


def hf_name(name: str) -> str:
    """A bridge parameter name as the wrapped Hugging Face model names it (wrappers removed)."""
    return name.replace(_WRAP, ".")


def coordinates_of(model: Any) -> str:
    """`COMPAT` for a bridge in compatibility mode (TransformerLens sets `compatibility_mode`), else
    `CHECKPOINT` (a raw bridge, or a Hugging Face model as it was given)."""
    return COMPAT if getattr(model, "compatibility_mode", False) else CHECKPOINT


@dataclass(frozen=True, eq=False)
class Delta:
    """Trained-minus-base values of some entries of some parameters (flat, C order)."""

    values: dict[str, Tensor]  # per parameter: the delta of each trained entry
    indices: dict[str, Tensor | None]  # per parameter: flat indices of the entries; None = all, in order
    shapes: dict[str, tuple[int, ...]]  # per parameter: its shape
    probes: dict[str, tuple[Tensor, Tensor]]  # per parameter: (flat index, base value) of a few entries
    sites: SiteSet = field(default_factory=SiteSet)  # the sites that chose the entries
    base_model: str = ""  # name to pass to mechattr.load_model for the base weights
    coordinates: str = COMPAT  # which weights the delta is relative to

    @property
    def n_trained(self) -> int:
        return sum(v.numel() for v in self.values.values())

    def apply(self, model: Any, scale: float = 1.0, check: bool = True) -> Any:
        """Add `scale` x delta to `model`'s weights in place and return it. With `check`, first verify
        that the model's base values at the probe entries are the ones the delta was trained from. A
        parameter is found by its name in the delta, else by its Hugging Face name (`hf_name`); a fused
        projection that a bridge split at boot and no longer reads is refused."""
        params = self._parameters(model)
        for name in self.values:
            if name not in params:
                raise KeyError(f"delta parameter {name!r} is not in the model (a different architecture?); "
                               f"the model's first parameters: {list(params)[:3]}")
            if tuple(params[name].shape) != self.shapes[name]:
                raise ValueError(f"delta parameter {name!r} has shape {self.shapes[name]} but the model's is "
                                 f"{tuple(params[name].shape)}")
        if check:
            self._check_probes(params)
        with torch.no_grad():
            for name, values in self.values.items():
                flat = params[name].data.view(-1)
                values = values.to(flat.device)
                index = self.indices[name]
                if index is None:
                    flat.copy_(flat + scale * values)
                else:
                    index = index.to(flat.device)
                    flat.index_copy_(0, index, flat[index] + scale * values)
        return model

    def _parameters(self, model: Any) -> dict[str, Tensor]:
        """The model's parameters under the delta's names, where either spelling finds them."""
        params = dict(model.named_parameters())
        # remove_duplicate=False: a tied weight answers to both its names (embedding and unembedding).
        plain = {hf_name(n): p for n, p in model.named_parameters(remove_duplicate=False)}
        found = {**params, **{n: plain[hf_name(n)] for n in self.values if n not in params and hf_name(n) in plain}}
        # A bridge keeps a fused projection it split at boot (GPT-2's c_attn, ...) under its Hugging Face
        # name, but reads only the split copies: a delta written there would change nothing it computes.
        unread = {id(params[n]) for n in unused_parameters(model)}
        for name in self.values:
            if name in found and id(found[name]) in unread:
                raise ValueError(f"delta parameter {name!r} is, in this bridge, a fused projection split at boot "
                                 "that its forward no longer reads (it reads split copies): apply a delta keyed by "
                                 "Hugging Face names to the plain transformers model, and the training run's delta "
                                 "(bridge names) to the bridge")
        return found

    def _check_probes(self, params: dict[str, Tensor]) -> None:
        for name, (index, expected) in self.probes.items():
            actual = params[name].detach().view(-1)[index.to(params[name].device)].cpu()
            if not torch.equal(actual, expected):
                raise ValueError(
                    f"delta for {self.base_model!r} ({self.coordinates}) does not fit this model: parameter "
                    f"{name!r} holds {actual.tolist()} at the probed entries, the delta was trained from "
                    f"{expected.tolist()}. Apply it to {self.applies_to()} before any other change, or pass "
                    "check=False.")

    def applies_to(self) -> str:
        """The model this delta applies to, in words."""
        return COORDINATES.get(self.coordinates, f"{self.base_model!r} in coordinates {self.coordinates!r}").format(
            name=self.base_model)

    def save(self, path: str | Path) -> Path:
        """One safetensors file: `<param>::values`, `<param>::indices` (sparse ones), probes; the
        header (base model, coordinates, shapes, sites) in the file's metadata."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for name, values in self.values.items():
            tensors[f"{name}::values"] = values.detach().contiguous().cpu()
            if self.indices[name] is not None:
                tensors[f"{name}::indices"] = self.indices[name].contiguous().cpu()
            tensors[f"{name}::probe_index"] = self.probes[name][0].contiguous().cpu()
            tensors[f"{name}::probe_value"] = self.probes[name][1].contiguous().cpu()
        header = {"format": _FORMAT, "base_model": self.base_model, "coordinates": self.coordinates,
                  "shapes": {k: list(v) for k, v in self.shapes.items()}, "sites": self.sites.to_json()}
        return write_safetensors(path, tensors, {"mechattr": json.dumps(header)})

    @classmethod
    def load(cls, path: str | Path) -> "Delta":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no delta file at {path}")
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = (f.metadata() or {}).get("mechattr")
        if meta is None or json.loads(meta).get("format") != _FORMAT:
            raise ValueError(f"{path} is not a mechattr delta (expected safetensors metadata format {_FORMAT})")
        header = json.loads(meta)
        tensors = load_file(str(path))
        shapes = {k: tuple(v) for k, v in header["shapes"].items()}
        return cls(values={n: tensors[f"{n}::values"] for n in shapes},
                   indices={n: tensors.get(f"{n}::indices") for n in shapes}, shapes=shapes,
                   probes={n: (tensors[f"{n}::probe_index"], tensors[f"{n}::probe_value"]) for n in shapes},
                   sites=SiteSet.from_json(header["sites"]), base_model=header["base_model"],
                   coordinates=header["coordinates"])


def probes_of(base: Tensor, index: Tensor | None) -> tuple[Tensor, Tensor]:
    """(flat index, base value) of the first few trained entries of one parameter; `base` holds the base
    values of the trained entries in the order of `index`."""
    n = min(_N_PROBES, base.numel())
    where = torch.arange(n) if index is None else index[:n]
    return where.cpu().clone(), base[:n].detach().cpu().clone()


def _merge_param(deltas: list[Delta], name: str, numel: int) -> tuple[Tensor, Tensor | None]:
    parts = [(d.indices[name], d.values[name]) for d in deltas if name in d.values]
    if any(index is None for index, _ in parts):
        dense = torch.zeros(numel, dtype=parts[0][1].dtype)
        for index, values in parts:
            dense.index_add_(0, torch.arange(numel) if index is None else index, values)
        return dense, None
    index, inverse = torch.unique(torch.cat([i for i, _ in parts]), return_inverse=True)
    values = torch.zeros(index.numel(), dtype=parts[0][1].dtype)
    values.index_add_(0, inverse, torch.cat([v for _, v in parts]))
    return values, index


def merge(*deltas: Delta) -> Delta:
    """One delta equal to applying all of them (entries trained in several are summed)."""
    if not deltas:
        raise ValueError("merge needs at least one delta")
    first = deltas[0]
    for d in deltas[1:]:
        if (d.base_model, d.coordinates) != (first.base_model, first.coordinates):
            raise ValueError(f"cannot merge deltas of different bases: {first.base_model!r} ({first.coordinates}) "
                             f"and {d.base_model!r} ({d.coordinates})")
    shapes = {name: shape for d in deltas for name, shape in d.shapes.items()}
    values, indices, probes = {}, {}, {}
    for name, shape in shapes.items():
        values[name], indices[name] = _merge_param(list(deltas), name, int(torch.Size(shape).numel()))
        owners = [d.probes[name] for d in deltas if name in d.probes]
        index, order = torch.unique(torch.cat([i for i, _ in owners]), return_inverse=True)
        value = torch.empty(index.numel(), dtype=owners[0][1].dtype)
        value[order] = torch.cat([v for _, v in owners])
        probes[name] = (index, value)
    sites = SiteSet()
    for d in deltas:
        sites = sites | d.sites
    return Delta(values, indices, shapes, probes, sites, first.base_model, first.coordinates)
