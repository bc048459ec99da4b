"""Exporting a fine-tuned model out of mechattr: a Hugging Face model folder, and the sparse delta
against the original checkpoint.

    model = mechattr.load_model(name, compatibility=False)       # the checkpoint's own weights
    result = train(model, masks(model, sites), task, config, sites=sites, base_model=name)
    export(model, "tuned", delta=result.delta)
    transformers.AutoModelForCausalLM.from_pretrained("tuned")    # the same logits, without mechattr

The folder holds what `save_pretrained` writes (config.json, generation_config.json, model.safetensors),
the tokenizer's files, `delta.safetensors` (the trained entries keyed by Hugging Face parameter names;
format in `mechattr.finetune.delta`) and `mechattr.json` (base model and checkpoint, coordinates, sites,
trained-entry count).

On families whose attention (or MLP) projection is fused in the checkpoint (GPT-2, GPT-NeoX, Bloom, Falcon,
Phi-3), the bridge reads split copies of it; export writes them back into the fused tensor, and the delta
addresses the fused tensor's entries (`mechattr.finetune.fused`).

Only checkpoint coordinates export: compatibility mode (`mechattr.load_model(name)`) folds LayerNorm
into the weights and centres the unembedding, so weights trained there are not the checkpoint's
parameters; in a tied model the centred unembedding is no longer the embedding, and a folder saved from
them loads into a model that silently computes other logits.
"""

import copy
import math
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechattr.finetune.delta import CHECKPOINT, COMPAT, DELTA_FILE, Delta, coordinates_of
from mechattr.finetune.fused import FUSIONS, Place, checkpoint_places, skeleton, variant
from mechattr.models import ModelNotAvailable, checkpoint_of, model_name
from mechattr.storage import write_json

__all__ = ["export", "checkpoint_delta", "INFO_FILE", "DELTA_FILE"]

INFO_FILE = "mechattr.json"  # what the folder was exported from
_FORMAT = "mechattr.export/1"
_PROBE_LEN = 8  # tokens of the prompt on which the exported model must reproduce the bridge's logits
_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-8}  # relative to the largest |logit|; others: 1e-2


_HOW = ("To fine-tune for export, train the bridge that keeps the checkpoint's weights: "
        "mechattr.load_model(name, compatibility=False) (command line: mechattr finetune ... --export DIR).")


def checkpoint_delta(delta: Delta, model: Any) -> Delta:
    """`delta`, trained on `model`, keyed by Hugging Face parameter names with flat indices into those
    tensors, so it applies to the plain `transformers` model of the original checkpoint (`Delta.apply`, or
    the few lines in `mechattr.finetune.delta`). Entries of a bridge's split copy of a fused projection
    become entries of the fused tensor."""
    _require_checkpoint(delta)
    return _relocated(delta, checkpoint_places(model), model)


def _require_checkpoint(delta: Delta) -> None:
    if delta.coordinates != CHECKPOINT:
        raise ValueError(f"delta for {delta.base_model!r} is in coordinates {delta.coordinates!r}, not the original "
                         f"checkpoint's: it applies to {delta.applies_to()}. {_HOW}")


def _relocated(delta: Delta, places: dict[str, Place], model: Any) -> Delta:
    """`delta` moved to the checkpoint's tensors; the parts of one fused tensor become one entry."""
    groups: dict[str, list[str]] = {}
    for name in delta.values:
        groups.setdefault(_place(places, name, delta, model).name, []).append(name)
    values, indices, shapes, probes = {}, {}, {}, {}
    for target, names in groups.items():
        shapes[target] = places[names[0]].shape
        values[target], indices[target], probes[target] = _gathered(delta, names, places, target)
    return Delta(values, indices, shapes, probes, delta.sites, delta.base_model, CHECKPOINT)


def _place(places: dict[str, Place], name: str, delta: Delta, model: Any) -> Place:
    if name in places:
        return places[name]
    if name not in dict(model.named_parameters()):
        raise ValueError(f"delta parameter {name!r} {delta.shapes[name]} is not a parameter of model {model_name(model)!r}")
    raise ValueError(f"delta parameter {name!r} {delta.shapes[name]} is a copy only the bridge reads (split from a "
                     f"fused projection when it booted), and how {_family(model)!r} fuses it back into the checkpoint "
                     f"is not known (mechattr.finetune.fused.FUSIONS knows {', '.join(FUSIONS)}), so the delta has "
                     "no place in the checkpoint")


def _gathered(delta: Delta, names: list[str], places: dict[str, Place],
              target: str) -> tuple[Tensor, Tensor | None, tuple[Tensor, Tensor]]:
    """Values, flat indices (None: every entry, in order) and probes of `names`' entries in the checkpoint's
    tensor `target`, sorted by index."""
    if len(names) == 1 and places[names[0]].index is None:  # the checkpoint's own tensor: nothing moves
        return delta.values[names[0]], delta.indices[names[0]], delta.probes[names[0]]
    index = torch.cat([_in_checkpoint(delta.indices[n], places[n], delta.shapes[n]) for n in names])
    if index.unique().numel() != index.numel():
        raise ValueError(f"delta parameters {names} overlap in the checkpoint's {target!r} (a fused projection "
                         "trained together with the bridge's split copies of it?): no single value per entry")
    order = index.argsort()
    values = torch.cat([delta.values[n].detach().cpu() for n in names])[order]
    probe_index = torch.cat([_in_checkpoint(delta.probes[n][0], places[n], delta.shapes[n]) for n in names])
    return values, index[order], (probe_index, torch.cat([delta.probes[n][1] for n in names]))


def _in_checkpoint(index: Tensor | None, place: Place, shape: tuple[int, ...]) -> Tensor:
    """Flat indices in the checkpoint's tensor of a parameter's entries `index` (None: all, in order)."""
    own = torch.arange(math.prod(shape)) if index is None else index.cpu()
    return own if place.index is None else place.index.flatten()[own]


def export(model: Any, directory: str | Path, delta: Delta | None = None, base_model: str | None = None,
           tokenizer: Any = None) -> Path:
    """Write `model` (a bridge without compatibility mode, or a peft model built on one, exported merged)
    as a Hugging Face model folder in `directory` (new, empty, or an earlier export, which is replaced);
    returns it. A peft model needs `tokenizer` for the tokenizer files.

    `delta` (the training run's, in checkpoint coordinates) is saved beside it keyed by Hugging Face
    names, and with `base_model` (default: the delta's) recorded in mechattr.json. Before writing, the
    Hugging Face model is checked to compute the model's last-position logits on a probe prompt.
    """
    if coordinates_of(model) == COMPAT:
        raise ValueError(f"cannot export model {model_name(model)!r}: it is a bridge in compatibility mode, whose weights "
                         "are processed (LayerNorm folded in, unembedding centred) and are not the checkpoint's, so "
                         f"a Hugging Face model saved from them computes other logits. {_HOW}")
    tokens = _probe(model)
    # First, under no_grad: this forward also replaces what the bridge keeps from the last training step
    # (GPT-2's attention keeps its pattern, with autograd history, which `deepcopy` refuses to copy).
    expected = _last_logits(model, tokens)
    places = checkpoint_places(model)
    if delta is not None:
        _require_checkpoint(delta)
    hf_delta = None if delta is None else _relocated(delta, places, model)
    plain = _plain(model, places)
    _check_ties(plain)
    _check_logits(model, plain, tokens, expected, [n for n, _ in model.named_parameters() if n not in places])
    if hf_delta is not None:
        _check_fits(hf_delta, plain)
    base = base_model or (delta.base_model if delta is not None else "") or model_name(model)
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    info = {"format": _FORMAT, "base_model": base, "base_checkpoint": _checkpoint(base), "coordinates": CHECKPOINT,
            "architecture": type(plain).__name__, "dtype": str(next(plain.parameters()).dtype).removeprefix("torch."),
            # Sites as rows [kind, layer, pos, head, neuron, score], as effects and deltas store them.
            "sites": hf_delta.sites.to_json() if hf_delta is not None else None,
            "n_trained": hf_delta.n_trained if hf_delta is not None else None,
            "delta": DELTA_FILE if hf_delta is not None else None}

    def write(folder: Path) -> None:
        plain.save_pretrained(folder)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        if hf_delta is not None:
            hf_delta.save(folder / DELTA_FILE)
        write_json(folder / INFO_FILE, info)

    return _write_folder(Path(directory), write)


def _checkpoint(base: str) -> str | None:
    try:
        return checkpoint_of(base)
    except (ModelNotAvailable, OSError):  # a base this machine cannot locate is still recorded by name
        return None


def _family(model: Any) -> str:
    config = getattr(getattr(model, "original_model", None), "config", None)
    return variant(config) if config is not None else type(model).__name__


def _plain(model: Any, places: dict[str, Place]) -> Any:
    """The Hugging Face model to save: the bridge's own with its wrappers and added tensors removed and
    its split copies written into the fused tensors, or a peft model's with its adapters merged in."""
    if hasattr(model, "merge_and_unload"):
        return copy.deepcopy(model).merge_and_unload()
    if not hasattr(model, "original_model"):
        raise TypeError(f"export takes a TransformerBridge or a peft model, got {type(model).__name__}")
    from mechattr.finetune.methods import plain_model

    plain = plain_model(model)
    architecture = skeleton(plain)
    own, held = set(architecture.state_dict()), plain.state_dict()
    missing = sorted(own - set(held))
    if missing:
        raise ValueError(f"cannot export model {model_name(model)!r}: the bridge's {type(plain).__name__} lacks "
                         f"{missing[:3]}")
    for name in sorted(set(held) - own):
        _drop_added(plain, architecture, name, held[name])
    _write_split_copies(model, plain, places)
    return plain


def _write_split_copies(model: Any, plain: Any, places: dict[str, Place]) -> None:
    """Write the bridge's split copies into `plain`'s fused tensors, which the Hugging Face forward reads
    (the bridge's fused originals are what it split at boot: nothing reads or trains them since)."""
    params = dict(plain.named_parameters())
    with torch.no_grad():
        for name, param in model.named_parameters():
            place = places.get(name)
            if place is not None and place.index is not None:
                flat = params[place.name].view(-1)
                flat.index_copy_(0, place.index.flatten().to(flat.device), param.detach().flatten())


def _drop_added(plain: Any, skeleton: Any, name: str, value: Tensor) -> None:
    """Remove tensor `name`, which the bridge added to the Hugging Face model (TransformerLens 4.3 gives
    an unembedding without bias a zero bias buffer); a nonzero one would change the logits."""
    owner, _, leaf = name.rpartition(".")
    module, original = plain.get_submodule(owner), skeleton.get_submodule(owner)
    if leaf not in module._buffers or bool(value.any()):
        raise ValueError(f"cannot export: the bridge computes with {name!r} (nonzero), which "
                         f"{type(plain).__name__} does not have")
    del module._buffers[leaf]
    if leaf in original._parameters:  # e.g. nn.Linear(bias=False) registers bias as None
        module.register_parameter(leaf, None)


def _check_ties(plain: Any) -> None:
    """A config that ties the unembedding to the embedding saves only one of them: they must be equal."""
    config = plain.config.get_text_config() if hasattr(plain.config, "get_text_config") else plain.config
    embed, unembed = plain.get_input_embeddings(), plain.get_output_embeddings()
    if not getattr(config, "tie_word_embeddings", False) or unembed is None or embed.weight is unembed.weight:
        return
    if not torch.equal(embed.weight, unembed.weight):
        gap = float((embed.weight - unembed.weight).detach().abs().max())
        raise ValueError(f"cannot export {type(plain).__name__}: its config ties the unembedding to the embedding "
                         f"(tie_word_embeddings=True), but they differ (max |difference| {gap:.3g}), so the saved "
                         "model would load only one of them. Train the tied matrix as one parameter, or set "
                         "tie_word_embeddings=False in the config before exporting. (A copy of a compatibility-"
                         f"mode bridge has a centred unembedding: it cannot be exported. {_HOW})")
    plain.tie_weights()


def _probe(model: Any) -> Int[Tensor, "1 pos"]:
    cfg = getattr(model, "cfg", None)
    vocab = cfg.d_vocab if cfg is not None else model.get_input_embeddings().weight.shape[0]
    tokens = torch.randint(vocab, (1, _PROBE_LEN), generator=torch.Generator().manual_seed(0))
    return tokens.to(next(model.parameters()).device)  # where the embedding is


def _last_logits(model: Any, tokens: Int[Tensor, "1 pos"]) -> Float[Tensor, "1 vocab"]:
    with torch.no_grad():
        out = model(tokens)
    return (out if torch.is_tensor(out) else out.logits)[:, -1].float().cpu()


def _check_logits(model: Any, plain: Any, tokens: Int[Tensor, "1 pos"], expected: Float[Tensor, "1 vocab"],
                  unplaced: list[str]) -> None:
    """The model to save computes `model`'s logits (`expected`). It would not if training changed copies
    only the bridge reads that have no place in the checkpoint (`unplaced`: a fusion not in `FUSIONS`)."""
    actual = _last_logits(plain, tokens)
    tolerance = _TOLERANCE.get(next(plain.parameters()).dtype, 1e-2) * max(1.0, float(expected.abs().max()))
    gap = float((expected - actual).abs().max())
    if not gap <= tolerance:  # a NaN gap is refused too
        why = (f"parameters only the bridge reads, whose fusion into the checkpoint is not known for "
               f"{_family(model)!r} (mechattr.finetune.fused.FUSIONS), and which training may have changed: "
               f"{unplaced[:4]}" if unplaced else
               "every parameter the bridge reads has a place in the checkpoint, so either a fusion in "
               "mechattr.finetune.fused is wrong or the bridge computes otherwise than its Hugging Face model")
        raise ValueError(f"cannot export model {model_name(model)!r}: the Hugging Face model computes other logits than "
                         f"the bridge (max |difference| {gap:.3g} > {tolerance:.3g}); {why}. Only training of "
                         "parameters the checkpoint stores, or of split copies with a known fusion, can be exported.")


def _check_fits(delta: Delta, plain: Any) -> None:
    params = dict(plain.named_parameters(remove_duplicate=False))
    for name, shape in delta.shapes.items():
        if name not in params or tuple(params[name].shape) != shape:
            found = tuple(params[name].shape) if name in params else "no such parameter"
            raise ValueError(f"the delta's parameter {name!r} {shape} does not fit {type(plain).__name__} ({found})")


def _write_folder(directory: Path, write: Any) -> Path:
    """Write into a temporary folder beside `directory`, then rename it: an interrupted export leaves no
    half folder. Only a new or empty directory, or an earlier export, may be replaced."""
    directory = directory.resolve()
    if directory.exists() and (not directory.is_dir() or (any(directory.iterdir()) and
                                                          not (directory / INFO_FILE).is_file())):
        raise FileExistsError(f"cannot export to {directory}: it exists and is not an empty directory or an earlier "
                              "export; choose a new directory")
    tmp = directory.with_name(f".{directory.name}.{os.getpid()}.tmp")
    old = directory.with_name(f".{directory.name}.{os.getpid()}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        write(tmp)
        if directory.exists():
            directory.rename(old)
        tmp.rename(directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return directory
