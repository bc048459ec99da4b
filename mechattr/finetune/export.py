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

Only checkpoint coordinates export: compatibility mode (`mechattr.load_model(name)`) folds LayerNorm
into the weights and centres the unembedding, so weights trained there are not the checkpoint's
parameters; in a tied model the centred unembedding is no longer the embedding, and a folder saved from
them loads into a model that silently computes other logits.
"""

import copy
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechattr.finetune.delta import CHECKPOINT, COMPAT, Delta, coordinates_of, hf_name
from mechattr.storage import write_json

__all__ = ["export", "checkpoint_delta", "INFO_FILE", "DELTA_FILE"]

INFO_FILE = "mechattr.json"  # what the folder was exported from
DELTA_FILE = "delta.safetensors"  # the trained entries against the original checkpoint
_FORMAT = "mechattr.export/1"
_PROBE_LEN = 8  # tokens of the prompt on which the exported model must reproduce the bridge's logits
_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-8}  # relative to the largest |logit|; others: 1e-2


_HOW = ("To fine-tune for export, train the bridge that keeps the checkpoint's weights: "
        "mechattr.load_model(name, compatibility=False) (command line: mechattr finetune ... --export DIR).")


def checkpoint_delta(delta: Delta) -> Delta:
    """`delta` keyed by Hugging Face parameter names, so it applies to the plain `transformers` model of
    the original checkpoint (`Delta.apply`, or the few lines in `mechattr.finetune.delta`)."""
    if delta.coordinates != CHECKPOINT:
        raise ValueError(f"delta for {delta.base_model!r} is in coordinates {delta.coordinates!r}, not the original "
                         f"checkpoint's: it applies to {delta.applies_to()}. {_HOW}")
    rename = {name: hf_name(name) for name in delta.values}
    return Delta({rename[n]: v for n, v in delta.values.items()}, {rename[n]: i for n, i in delta.indices.items()},
                 {rename[n]: s for n, s in delta.shapes.items()}, {rename[n]: p for n, p in delta.probes.items()},
                 delta.sites, delta.base_model, CHECKPOINT)


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
        raise ValueError(f"cannot export model {_name(model)!r}: it is a bridge in compatibility mode, whose weights "
                         "are processed (LayerNorm folded in, unembedding centred) and are not the checkpoint's, so "
                         f"a Hugging Face model saved from them computes other logits. {_HOW}")
    tokens = _probe(model)
    # First, under no_grad: this forward also replaces what the bridge keeps from the last training step
    # (GPT-2's attention keeps its pattern, with autograd history, which `deepcopy` refuses to copy).
    expected = _last_logits(model, tokens)
    plain = _plain(model)
    _check_ties(plain)
    _check_logits(model, plain, tokens, expected)
    hf_delta = None if delta is None else checkpoint_delta(delta)
    if hf_delta is not None:
        _check_fits(hf_delta, plain)
    base = base_model or (delta.base_model if delta is not None else "") or _name(model)
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


def _name(model: Any) -> str:
    cfg = getattr(model, "cfg", None) or getattr(model, "config", None)
    return str(getattr(cfg, "model_name", None) or getattr(cfg, "_name_or_path", None) or type(model).__name__)


def _checkpoint(base: str) -> str | None:
    from mechattr.models import ModelNotAvailable, checkpoint_of

    try:
        return checkpoint_of(base)
    except (ModelNotAvailable, OSError):  # a base this machine cannot locate is still recorded by name
        return None


def _plain(model: Any) -> Any:
    """The Hugging Face model to save: the bridge's own with its wrappers and added tensors removed, or
    a peft model's with its adapters merged in."""
    if hasattr(model, "merge_and_unload"):
        return copy.deepcopy(model).merge_and_unload()
    if not hasattr(model, "original_model"):
        raise TypeError(f"export takes a TransformerBridge or a peft model, got {type(model).__name__}")
    from mechattr.finetune.methods import plain_model

    plain = plain_model(model)
    with torch.device("meta"):  # the architecture's own tensors, without allocating them
        skeleton = type(plain)(copy.deepcopy(plain.config))
    own, held = set(skeleton.state_dict()), plain.state_dict()
    missing = sorted(own - set(held))
    if missing:
        raise ValueError(f"cannot export model {_name(model)!r}: the bridge's {type(plain).__name__} lacks "
                         f"{missing[:3]}")
    for name in sorted(set(held) - own):
        _drop_added(plain, skeleton, name, held[name])
    return plain


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


def _check_logits(model: Any, plain: Any, tokens: Int[Tensor, "1 pos"], expected: Float[Tensor, "1 vocab"]) -> None:
    """The model to save computes `model`'s logits (`expected`); it would not if training changed
    parameters only the bridge reads (split copies of a fused projection: GPT-2, GPT-NeoX, Phi-3, Bloom,
    Falcon)."""
    actual = _last_logits(plain, tokens)
    tolerance = _TOLERANCE.get(next(plain.parameters()).dtype, 1e-2) * max(1.0, float(expected.abs().max()))
    gap = float((expected - actual).abs().max())
    if gap > tolerance:
        own = {hf_name(n) for n, _ in plain.named_parameters(remove_duplicate=False)}
        bridge_only = [n for n, _ in model.named_parameters() if hf_name(n) not in own]
        raise ValueError(f"cannot export model {_name(model)!r}: the Hugging Face model computes other logits than "
                         f"the bridge (max |difference| {gap:.3g} > {tolerance:.3g}). Parameters only the bridge "
                         f"reads, which training may have changed: {bridge_only[:4] or 'none'}; only training of "
                         "parameters the checkpoint stores can be exported.")


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
