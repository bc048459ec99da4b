"""Forward passes that start late: at a given block, and at a given position.

A patch at block l leaves blocks 0..l-1 unchanged, and (causal attention) a patch at position p leaves
every position before p unchanged at every layer. `Forward` exploits both on a `TransformerBridge`:
it records what the bridge passes each block (attention mask, rotary embeddings, position ids, ALiBi
biases: architecture-specific, so captured rather than rebuilt) and the keys and values of the unpatched
run, then calls `blocks[l:]` on positions p.. only, with the earlier positions' keys and values served
from a Hugging Face `DynamicCache`, and unembeds the last position only. TL 4.3's own `start_at_layer`
still runs the skipped blocks.

Prompts of different lengths are right-padded (see `mechattr.tasks.task`): every row is read out at its
own last token (`last`), and a patch at a named position writes each row at its own index; both are
plain indexing, so the resumed path needs nothing else.

This resumed path proves itself once per model before it is used: it must reproduce the model's own
unpatched last-position logits from the first and a middle block, from position 0 and from later
positions. A model where it does not gets exact full forwards and one warning saying what differed.
Any other model with TransformerLens's hook interface (e.g. a legacy `HookedTransformer`) runs full
forwards.
"""

import warnings
import weakref
from contextlib import contextmanager, nullcontext
from typing import Any, Callable, Iterable

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechattr.models import is_bridge, model_name
from mechattr.sites import hook_name

__all__ = ["Forward", "attention_reads_cache", "at_last", "last_logits", "final_logits", "fast_path_verdict",
           "FastPathWarning", "TOLERANCE", "logit_miss"]

# Names decoder layers give their key/value cache: transformers 5 `cache`, older code `past_key_values`,
# GPT-NeoX, Bloom and Falcon `layer_past`.
_CACHE_KWARGS = ("cache", "past_key_values", "layer_past")
# Largest |resumed - full| logit error, relative to the largest |logit| (at least 1), per weight dtype:
# half-precision kernels round differently for different batch shapes (a few units of their last place).
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-5, torch.bfloat16: 4 * 2**-8, torch.float16: 4 * 2**-11}
_PROBE_ROWS = 2  # token rows the fast path is proved on (run as 2 copies, so block inputs are expanded)

# Per model: None when the resumed path reproduced the model's own logits, else what differed.
_VERDICTS: "weakref.WeakKeyDictionary[Any, str | None]" = weakref.WeakKeyDictionary()


class FastPathWarning(UserWarning):
    """The resumed forward does not reproduce a model's own logits, so it runs full forwards."""


def _first_row(value: Any, n: int, name: str, heads: int) -> Any:
    """Per-row block inputs (all rows share them: no attention mask is passed, and right padding changes
    no real position) as one row."""
    if name == "alibi" and torch.is_tensor(value) and value.shape[0] == n * heads:
        return value.reshape(n, heads, *value.shape[1:])[:1]  # Bloom: [n * heads, 1, key] -> [1, heads, 1, key]
    if torch.is_tensor(value) and value.dim() >= 2 and value.shape[0] in (1, n):
        return value[:1]
    if isinstance(value, tuple):
        return tuple(_first_row(v, n, name, heads) for v in value)
    return value


def _fit(value: Any, rows: int, start: int, name: str, end: int | None = None) -> Any:
    """A captured one-row block input expanded to `rows` rows and cut to positions `start`..`end` (None:
    the last); keys are positions ..`end`, the earlier ones served from the cache."""
    if isinstance(value, tuple):
        return tuple(_fit(v, rows, start, name, end) for v in value)
    if not torch.is_tensor(value) or value.dim() < 2:
        return value
    if name == "alibi":
        # A bias per key position: keys keep every position up to `end` (the prefix comes from the cache).
        value = value[..., :end]
        return value.expand(rows, *value.shape[1:]).reshape(-1, *value.shape[2:])
    if start or end is not None:
        # Position axis: -2 for the [1, 1, query, key] mask (its key axis cut at `end`), 1 otherwise.
        value = value[..., start:end, :end] if name == "attention_mask" else value[:, start:end]
    return value.expand(rows, *value.shape[1:])


@contextmanager
def attention_reads_cache(model: Any):
    """TL 4.3's attention looks for `past_key_values` (or `layer_past`) but transformers 5 decoder layers
    pass the cache as `cache`; alias it for the duration so prefilled keys and values are used."""
    def alias(module, args, kwargs):
        if kwargs.get("cache") is not None and kwargs.get("past_key_values") is None:
            kwargs = {**kwargs, "past_key_values": kwargs["cache"]}
        return args, kwargs

    handles = [block.attn.register_forward_pre_hook(alias, with_kwargs=True) for block in model.blocks]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def fast_path_verdict(model: Any) -> str | None:
    """What the resumed path got wrong on `model` (None: proved exact, or not checked yet)."""
    return _VERDICTS.get(model)


class Forward:
    """Forward passes of one token batch [n, pos] with hooks, returning each row's last-position logits.
    `last` [n] is each row's last token index (None: position -1)."""

    def __init__(self, model: Any, tokens: Int[Tensor, "n pos"], resumable: bool = True, *,
                 last: Int[Tensor, " n"] | None = None):
        self.model = model
        self.tokens = tokens
        self.last = last
        self.resumable = resumable and is_bridge(model) and _VERDICTS.get(model) is None
        self.block_kwargs: list[dict[str, Any]] = []
        self.keys_values: list[tuple[Tensor, Tensor]] = []  # per layer [n, kv_heads, pos, d_head]
        self._cache_name = "cache"  # the keyword the blocks take their cache by

    @property
    def reuses_prefix(self) -> bool:
        """Whether runs can start at a later position (needs an explicit mask and the captured cache)."""
        return bool(self.keys_values) and torch.is_tensor(self.block_kwargs[0].get("attention_mask"))

    def cache(self, names: Iterable[str] = (), prove: bool = True
              ) -> tuple[Float[Tensor, "n vocab"], dict[str, Tensor]]:
        """The unpatched run: last-position logits and the activations at hook `names`. On a bridge the
        same pass records each block's inputs and the keys and values that later runs resume from; the
        first time a model is seen, the resumed path is proved against it (see `_prove`). `prove=False`
        skips that proof: for a caller that compares every resumed run it uses with the full forward."""
        if prove and self.resumable and self.model not in _VERDICTS:
            last = None if self.last is None else self.last[:_PROBE_ROWS]
            verdict = _prove(self.model, self.tokens[:_PROBE_ROWS], last)
            _VERDICTS[self.model] = verdict
            if verdict is not None:
                warnings.warn(f"model {model_name(self.model)}: the resumed forward {verdict}; mechattr "
                              "runs exact full forwards for this model instead", FastPathWarning, stacklevel=2)
            self.resumable = verdict is None
        return self._record(set(names))

    def _record(self, names: set[str]) -> tuple[Tensor, dict[str, Tensor]]:
        store: dict[str, Tensor] = {}
        n = self.tokens.shape[0]
        heads = self.model.cfg.n_heads
        captured: dict[int, dict[str, Any]] = {}
        caches: list[str] = []  # the keyword each block took its cache by
        # One plain cache for every block: the model's own may keep only a sliding window of keys.
        full = _new_cache() if self.resumable else None

        def saver(name):
            # Keyed by the name asked for: the bridge reports aliases (hook_resid_pre fires as hook_in).
            def save(act, hook):
                store[name] = act.detach().clone()
            return save

        def grab(layer):
            def hook(module, args, kwargs):
                captured[layer] = {k: _first_row(v, n, k, heads) for k, v in kwargs.items() if k not in _CACHE_KWARGS}
                given = [k for k in _CACHE_KWARGS if kwargs.get(k) is not None]
                caches.extend(given)
                return args, {**kwargs, **{k: full for k in given}}
            return hook

        blocks = list(self.model.blocks) if self.resumable else []
        handles = [block.register_forward_pre_hook(grab(i), with_kwargs=True) for i, block in enumerate(blocks)]
        try:
            with torch.no_grad(), self.model.hooks(fwd_hooks=[(name, saver(name)) for name in sorted(names)]), \
                    (attention_reads_cache(self.model) if self.resumable else nullcontext()):
                logits = self.model(self.tokens)
        finally:
            for h in handles:
                h.remove()
        missing = names - set(store)
        if missing:
            raise ValueError(f"model {model_name(self.model)} has no hook point(s) {sorted(missing)}; "
                             "check the site kinds")
        if self.resumable:
            self._keep(captured, (caches[0], full) if caches else None)
        # clone: a float32 slice would be a view that keeps every position's logits alive.
        return at_last(logits, self.last).float().clone(), store

    def _keep(self, captured: dict[int, dict[str, Any]], named_cache: tuple[str, Any] | None) -> None:
        n_layers, (n, n_pos) = len(self.model.blocks), self.tokens.shape
        self.block_kwargs = [captured[i] for i in range(n_layers)]
        self.keys_values = []
        if named_cache is not None:
            self._cache_name, cache = named_cache
            if len(getattr(cache, "layers", ())) == n_layers:
                pairs = [(layer.keys, layer.values) for layer in cache.layers]
                if all(k is not None and k.shape[0] == n and k.shape[-2] == n_pos for k, _ in pairs):
                    self.keys_values = pairs
        for kwargs in self.block_kwargs:
            if "use_cache" in kwargs:
                kwargs["use_cache"] = bool(self.keys_values)

    def patched(self, copies: int, hooks: list[tuple[str, Callable]], start_layer: int | None = None,
                resid: Float[Tensor, "n pos d_model"] | None = None, start_pos: int = 0) -> Float[Tensor, "rows vocab"]:
        """`copies` stacked copies of the batch under `hooks`. From block `start_layer` on, given `resid`
        (the unpatched input of that block), when the model allows it; from position `start_pos` on when
        `reuses_prefix` (hooks then see activations of positions start_pos.. only)."""
        resumed = self.resumable and start_layer is not None and resid is not None
        if resumed and not self.block_kwargs:
            raise ValueError("Forward.patched from a block needs the block inputs of the unpatched run: "
                             "call cache() first")
        with torch.no_grad(), self.model.hooks(fwd_hooks=hooks):
            if not resumed:
                return at_last(self.model(self.tokens.repeat(copies, 1)), self._last(copies)).float()
            return self._resumed(copies, start_layer, resid, start_pos if self.reuses_prefix else 0)

    def _last(self, copies: int, start: int = 0) -> Tensor | None:
        """Each row's last token index in `copies` stacked copies holding positions start.."""
        return None if self.last is None else self.last.repeat(copies) - start

    def resume(self, resid: Float[Tensor, "rows pos_from d_model"], start_layer: int,
               keys_values: list[tuple[Tensor, Tensor]] | None = None) -> Float[Tensor, "rows pos_from d_model"]:
        """The residual stream after the last block, from `resid` entering block `start_layer`: any rows of
        this batch's length, with the block inputs `cache()` recorded. With `keys_values` (per layer, each
        row's keys and values of the positions before `resid`'s, as `prefix_keys_values` gives them),
        `resid` holds the later positions only. Gradients flow (training resumes here); the blocks' own
        hooks fire."""
        if not self.block_kwargs:
            raise ValueError("Forward.resume needs the block inputs of a recorded forward: call cache() first")
        start_pos = 0 if keys_values is None else keys_values[-1][0].shape[-2]
        if start_pos + resid.shape[1] != self.tokens.shape[1]:
            raise ValueError(f"Forward.resume: the residual has {resid.shape[1]} positions after {start_pos} "
                             f"cached ones, the recorded batch {self.tokens.shape[1]}")
        if keys_values is None:
            cache = self._prefix_cache(resid.shape[0], start_layer, 0, per_row=True) if self.keys_values else None
            return self._blocks(resid, start_layer, 0, cache)
        if not self.reuses_prefix:
            raise ValueError("Forward.resume from a later position needs a model whose runs reuse a prefix "
                             "(reuses_prefix)")
        cache = _new_cache()
        for layer, (keys, values) in enumerate(keys_values):
            cache.update(keys, values, layer)
        return self._blocks(resid, start_layer, start_pos, cache)

    def prefix_keys_values(self, resid: Float[Tensor, "rows pos_to d_model"], start_layer: int
                           ) -> list[tuple[Tensor, Tensor]]:
        """Per layer, the keys and values [rows, kv_heads, pos_to, d_head] of the positions `resid` holds (this
        batch's first ones, entering block `start_layer`; layers below it: 0 positions), which `resume`
        continues from."""
        if not self.reuses_prefix:
            raise ValueError("Forward.prefix_keys_values needs a model whose runs reuse a prefix (reuses_prefix)")
        cache = self._prefix_cache(resid.shape[0], start_layer, 0, per_row=True)
        self._blocks(resid, start_layer, 0, cache, end_pos=resid.shape[1])
        return [(layer.keys, layer.values) for layer in cache.layers]

    def _resumed(self, copies: int, start_layer: int, resid: Tensor, start_pos: int) -> Tensor:
        x = resid[:, start_pos:].repeat(copies, 1, 1)  # (rows, P - start, d_model), fresh: hooks may edit
        cache = self._prefix_cache(copies, start_layer, start_pos) if self.keys_values else None
        x = self._blocks(x, start_layer, start_pos, cache)
        return last_logits(self.model, x, self._last(copies, start_pos)).float()

    def _blocks(self, x: Tensor, start_layer: int, start_pos: int, cache: Any, end_pos: int | None = None) -> Tensor:
        """Blocks `start_layer`.. on x [rows, end_pos - start_pos, d_model] (end_pos None: P), the recorded
        block inputs fitted to them."""
        rows = x.shape[0]
        with attention_reads_cache(self.model):
            for layer in range(start_layer, len(self.model.blocks)):
                kwargs = {k: _fit(v, rows, start_pos, k, end_pos) for k, v in self.block_kwargs[layer].items()}
                if cache is not None:
                    kwargs[self._cache_name] = cache
                out = self.model.blocks[layer](x, **kwargs)
                x = out[0] if isinstance(out, tuple) else out
        return x

    def _prefix_cache(self, copies: int, start_layer: int, start_pos: int, per_row: bool = False) -> Any:
        """A cache holding the unpatched run's keys and values of positions < start_pos, per copy (with
        `per_row`, an empty prefix for `copies` rows of any examples)."""
        cache = _new_cache()
        for layer, (keys, values) in enumerate(self.keys_values):
            # Layers before start_layer never run; an empty prefix keeps the layer indices aligned.
            end = start_pos if layer >= start_layer else 0
            if per_row:
                keys, values = (t[:1, :, :0].expand(copies, -1, -1, -1) for t in (keys, values))
            else:
                keys, values = (t[:, :, :end].repeat(copies, 1, 1, 1) for t in (keys, values))
            cache.update(keys, values, layer)
        return cache


def at_last(x: Float[Tensor, "rows pos *rest"], last: Int[Tensor, " rows"] | None) -> Float[Tensor, "rows *rest"]:
    """Each row of `x` at its own last position `last` (None: position -1)."""
    if last is None:
        return x[:, -1]
    return x[torch.arange(x.shape[0], device=x.device), last.to(x.device)]


def last_logits(model: Any, resid: Float[Tensor, "rows pos d_model"],
                last: Int[Tensor, " rows"] | None = None) -> Float[Tensor, "rows vocab"]:
    """The model's logits at each row's last position (`last`; None: -1) from the residual stream after
    its last block."""
    # Slicing, not indexing, when every row ends at -1: the same kernels as an unpadded batch.
    picked = resid[:, -1:] if last is None else at_last(resid, last)[:, None]
    return final_logits(model, picked)[:, 0]  # (rows, vocab)


def final_logits(model: Any, resid: Float[Tensor, "rows pos d_model"]) -> Float[Tensor, "rows pos vocab"]:
    """The model's logits at every position of `resid`, the residual stream after its last block."""
    logits = model.unembed(model.ln_final(resid))
    # What the bridge applies after the unembedding (Gemma 2's final soft-capping, for one).
    transform = getattr(getattr(model, "adapter", None), "apply_output_logits_transform", None)
    return transform(logits) if callable(transform) else logits


def logit_miss(model: Any, got: Float[Tensor, "..."], expected: Float[Tensor, "..."]) -> str | None:
    """None when a shortcut's logits `got` match the full forward's `expected` on `model`, else "by <error>
    (tolerance <t>)". Accepted: |got - expected| within `TOLERANCE` of the weight dtype, relative to the
    largest |expected| logit (at least 1)."""
    tolerance = max(1.0, float(expected.abs().max())) * TOLERANCE.get(next(model.parameters()).dtype, 1e-5)
    error = float((got.float() - expected.float()).abs().max())
    return None if error <= tolerance else f"by {error:.3g} (tolerance {tolerance:.2g})"


def _new_cache() -> Any:
    from transformers import DynamicCache

    return DynamicCache()


def _prove(model: Any, tokens: Int[Tensor, "n pos"], last: Int[Tensor, " n"] | None = None) -> str | None:
    """None if resumed runs of `tokens` (2 stacked copies) reproduce the model's own last-position logits
    (at `last`, see `Forward`) from the first and a middle block, each from position 0 and, where the
    prefix is reused, from the middle and the last position; else a description of the first that does not."""
    n_layers = len(model.blocks)
    n_pos = tokens.shape[1] if last is None else int(last.min()) + 1  # every row's tokens
    layers = sorted({0, n_layers // 2})
    probe = Forward(model, tokens, last=last)
    try:
        expected, resid = probe._record({hook_name("resid_pre", layer) for layer in layers})
        starts = sorted({0, n_pos // 2, n_pos - 1}) if probe.reuses_prefix else [0]
        expected = expected.repeat(2, 1)  # (2 * n, vocab)
        for layer in layers:
            for start in starts:
                with torch.no_grad():
                    got = probe._resumed(2, layer, resid[hook_name("resid_pre", layer)], start)
                miss = logit_miss(model, got, expected)
                if miss is not None:
                    return (f"from block {layer}, position {start}, misses the full forward's last-position "
                            f"logits {miss}")
    except Exception as error:  # noqa: BLE001  (any failure of the shortcut means: use the exact path)
        return f"fails to run: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    return None
