"""Forward passes that start late: at a given block, and at a given position.

A patch at block l leaves blocks 0..l-1 unchanged, and (causal attention) a patch at position p leaves
every position before p unchanged at every layer. `Forward` exploits both on a `TransformerBridge`:
it records what the bridge passes each block (attention mask, rotary embeddings, position ids:
architecture-specific, so captured rather than rebuilt) and the keys and values of the unpatched run,
then calls `blocks[l:]` on positions p.. only, with the earlier positions' keys and values served from
a Hugging Face `DynamicCache`. TL 4.3's own `start_at_layer` still runs the skipped blocks.
Any other model with TransformerLens's hook interface (e.g. a legacy `HookedTransformer`) runs full
forwards.
"""

from contextlib import contextmanager, nullcontext
from typing import Any, Callable, Iterable

import torch
from jaxtyping import Float, Int
from torch import Tensor

__all__ = ["Forward", "attention_reads_cache"]

_CACHE_KWARGS = ("cache", "past_key_values")


def _is_bridge(model: Any) -> bool:
    from transformer_lens import TransformerBridge

    return isinstance(model, TransformerBridge)


def _first_row(value: Any, n: int) -> Any:
    """Per-row block inputs (all rows share them: prompts of one length, no padding) as one row."""
    if torch.is_tensor(value) and value.dim() >= 2 and value.shape[0] in (1, n):
        return value[:1]
    if isinstance(value, tuple):
        return tuple(_first_row(v, n) for v in value)
    return value


def _fit(value: Any, rows: int, start: int, name: str) -> Any:
    """A captured one-row block input expanded to `rows` rows and cut to positions `start`..."""
    if isinstance(value, tuple):
        return tuple(_fit(v, rows, start, name) for v in value)
    if not torch.is_tensor(value) or value.dim() < 2:
        return value
    if start:
        # Position axis: -2 for the [1, 1, query, key] mask (keys keep every position), 1 otherwise.
        value = value[..., start:, :] if name == "attention_mask" else value[:, start:]
    return value.expand(rows, *value.shape[1:])


@contextmanager
def attention_reads_cache(model: Any):
    """TL 4.3's attention looks for `past_key_values` but transformers 5 decoder layers pass the cache as
    `cache`; alias it for the duration so prefilled keys and values are used."""
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


class Forward:
    """Forward passes of one token batch [n, pos] with hooks, returning last-position logits."""

    def __init__(self, model: Any, tokens: Int[Tensor, "n pos"], resumable: bool = True):
        self.model = model
        self.tokens = tokens
        self.resumable = resumable and _is_bridge(model)
        self.block_kwargs: list[dict[str, Any]] = []
        self.keys_values: list[tuple[Tensor, Tensor]] = []  # per layer [n, kv_heads, pos, d_head]

    @property
    def reuses_prefix(self) -> bool:
        """Whether runs can start at a later position (needs an explicit mask and the captured cache)."""
        return bool(self.keys_values) and torch.is_tensor(self.block_kwargs[0].get("attention_mask"))

    def cache(self, names: Iterable[str] = ()) -> tuple[Float[Tensor, "n vocab"], dict[str, Tensor]]:
        """The unpatched run: last-position logits and the activations at hook `names`. On a bridge the
        same pass records each block's inputs and the keys and values that later runs resume from."""
        names = set(names)
        store: dict[str, Tensor] = {}
        n = self.tokens.shape[0]
        captured: dict[int, dict[str, Any]] = {}
        caches: list[Any] = []

        def saver(name):
            # Keyed by the name asked for: the bridge reports aliases (hook_resid_pre fires as hook_in).
            def save(act, hook):
                store[name] = act.detach().clone()
            return save

        def grab(layer):
            def hook(module, args, kwargs):
                captured[layer] = {k: _first_row(v, n) for k, v in kwargs.items() if k not in _CACHE_KWARGS}
                caches.extend(kwargs.get(k) for k in _CACHE_KWARGS if kwargs.get(k) is not None)
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
            raise ValueError(f"the model has no hook point(s) {sorted(missing)}; check the site kinds")
        if self.resumable:
            self._keep(captured, caches[0] if caches else None)
        # clone: a float32 slice would be a view that keeps every position's logits alive.
        return logits[:, -1].float().clone(), store

    def _keep(self, captured: dict[int, dict[str, Any]], cache: Any) -> None:
        n_layers, (n, n_pos) = len(self.model.blocks), self.tokens.shape
        self.block_kwargs = [captured[i] for i in range(n_layers)]
        if cache is not None and len(getattr(cache, "layers", ())) == n_layers:
            pairs = [(layer.keys, layer.values) for layer in cache.layers]
            if all(k is not None and k.shape[0] == n and k.shape[-2] == n_pos for k, _ in pairs):
                self.keys_values = pairs
        for kwargs in self.block_kwargs:
            if "use_cache" in kwargs:
                kwargs["use_cache"] = bool(self.keys_values)

    def run(self, copies: int, hooks: list[tuple[str, Callable]], start_layer: int | None = None,
            resid: Float[Tensor, "n pos d_model"] | None = None, start_pos: int = 0) -> Float[Tensor, "rows vocab"]:
        """`copies` stacked copies of the batch under `hooks`. From block `start_layer` on, given `resid`
        (the unpatched input of that block), when the model allows it; from position `start_pos` on when
        `reuses_prefix` (hooks then see activations of positions start_pos.. only)."""
        if self.resumable and not self.block_kwargs:
            self.cache()
        with torch.no_grad(), self.model.hooks(fwd_hooks=hooks):
            if not self.resumable or start_layer is None or resid is None:
                return self.model(self.tokens.repeat(copies, 1))[:, -1].float()
            start_pos = start_pos if self.reuses_prefix else 0
            x = resid[:, start_pos:].repeat(copies, 1, 1)  # (rows, P - start, d_model), fresh: hooks may edit
            rows = x.shape[0]
            cache = self._prefix_cache(copies, start_layer, start_pos) if self.keys_values else None
            with attention_reads_cache(self.model):
                for layer in range(start_layer, len(self.model.blocks)):
                    kwargs = {k: _fit(v, rows, start_pos, k) for k, v in self.block_kwargs[layer].items()}
                    if cache is not None:
                        kwargs["cache"] = cache
                    out = self.model.blocks[layer](x, **kwargs)
                    x = out[0] if isinstance(out, tuple) else out
            return self.model.unembed(self.model.ln_final(x[:, -1:]))[:, 0].float()

    def _prefix_cache(self, copies: int, start_layer: int, start_pos: int) -> Any:
        """A cache holding the unpatched run's keys and values of positions < start_pos, per copy."""
        from transformers import DynamicCache

        cache = DynamicCache()
        for layer, (keys, values) in enumerate(self.keys_values):
            # Layers before start_layer never run; an empty prefix keeps the layer indices aligned.
            end = start_pos if layer >= start_layer else 0
            cache.update(keys[:, :, :end].repeat(copies, 1, 1, 1), values[:, :, :end].repeat(copies, 1, 1, 1), layer)
        return cache
