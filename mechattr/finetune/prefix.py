"""Frozen prefixes: what the blocks below a run's lowest trained block compute, computed once.

A fine-tuning run whose trained entries all sit in blocks >= l (`first_block`) leaves the residual
stream entering block l as the base model computes it, on every input. A `Prefix` keeps the base
model's residual entering every block for the rows of one token batch (a task's prompts, or text),
each row computed once, when first asked for; training and scoring then run blocks l.. only and
unembed only the positions they read. The runs of a comparison share one `Prefix` per batch.

Rows that begin alike (a templated task's prompts share their first tokens in a few patterns) share
those positions too: asked to (`share=True`, as scoring does), and where it saves at least a fifth of
the positions run, a last-position read runs each distinct beginning once per call and every row's
remaining positions against its keys and values.

Never silently wrong: `Prefix.check(model, layer)` runs the model at hand in full on the batch's first
rows and compares its logits with the resumed path's (shared beginnings included). A caller uses the
prefix only when they agree (`forward.logit_miss`), and otherwise runs full forwards and warns
(`FastPathWarning`, naming the model and the miss); where only the shared beginnings miss, rows run
whole from the block instead, with a warning.
"""

import warnings
import weakref
from typing import Any, Literal

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from mechattr.forward import FastPathWarning, Forward, at_last, final_logits, last_logits, logit_miss
from mechattr.models import is_bridge, model_name
from mechattr.sites import hook_name

__all__ = ["Prefix", "first_block", "full_logits", "Positions"]

Positions = Literal["last", "all"]  # which positions' logits a reader needs
_CHECK_ROWS = 2  # rows the resumed path is checked on, per use
_SHARE_AT_MOST = 0.8  # shared beginnings are used where they leave at most this fraction of positions to run


def first_block(model: Any, masks: dict[str, Bool[Tensor, "..."]]) -> int | None:
    """The lowest block that changing the masked entries can change: the lowest block owning one
    (n_layers when only the final norm or the unembedding does). None when the embedding is masked, or
    any other parameter outside the blocks, or the model is not a `TransformerBridge`."""
    if not is_bridge(model):
        return None
    block_of = {id(p): i for i, block in enumerate(model.blocks) for p in block.parameters()}
    after = {id(p) for module in (model.ln_final, model.unembed) for p in module.parameters()}
    before = {id(p) for p in model.embed.parameters()}
    params = dict(model.named_parameters())
    lowest = len(model.blocks)
    for name, mask in masks.items():
        if not mask.any():
            continue
        key = id(params[name])
        if key in block_of:
            lowest = min(lowest, block_of[key])
        elif key in before or key not in after:  # a tied unembedding is the embedding
            return None
    return lowest


def full_logits(model: Any, tokens: Int[Tensor, "n pos"], last: Int[Tensor, " n"] | None,
                positions: Positions) -> Float[Tensor, "n *pos vocab"]:
    """Logits of a full forward (a bridge, a Hugging Face or peft model) at each row's last token (`last`;
    None: -1) or at every position; only the positions read are unembedded. Differentiable."""
    if is_bridge(model) and positions == "last":
        return last_logits(model, _final_resid(model, tokens), last)
    if positions == "all" or not _keeps_logits(model):
        # Any other model (a process's share of a distributed batch, a plain copy of a TL-native model) is
        # called with tokens alone.
        out = model(tokens)
        out = out if torch.is_tensor(out) else out.logits
        return out if positions == "all" else at_last(out, last)
    ends = torch.full((tokens.shape[0],), tokens.shape[1] - 1) if last is None else last.cpu()
    keep = ends.unique()  # sorted
    out = model(tokens, logits_to_keep=keep.to(tokens.device)).logits  # (n, len(keep), vocab)
    return out[torch.arange(tokens.shape[0]), torch.searchsorted(keep, ends).to(out.device)]


def _keeps_logits(model: Any) -> bool:
    """Whether `model` is a Hugging Face model (perhaps inside peft), whose forward takes `logits_to_keep`."""
    from transformers import PreTrainedModel

    inner = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    return isinstance(inner, PreTrainedModel)


def _final_resid(model: Any, tokens: Tensor) -> Tensor:
    """The residual after a bridge's last block (with its graph when gradients are on), the unembedding
    skipped."""
    final, seen = hook_name("resid_post", len(model.blocks) - 1), {}

    def keep(act, hook):
        seen["resid"] = act
        raise _Stop

    with model.hooks(fwd_hooks=[(final, keep)]):
        try:
            model(tokens)
        except _Stop:
            pass
    return seen["resid"]


class _Stop(Exception):
    """Raised at the last hook a forward needs: nothing after it is computed."""


def _record(model: Any, tokens: Tensor, names: list[str]) -> list[Tensor]:
    """Activations at hook `names` of a bridge's forward of `tokens`, which stops once it has them all."""
    acts: dict[str, Tensor] = {}

    def saver(name):
        def save(act, hook):
            acts[name] = act.detach().clone()
            if len(acts) == len(names):
                raise _Stop
        return save

    with torch.no_grad(), model.hooks(fwd_hooks=[(name, saver(name)) for name in names]):
        try:
            model(tokens)
        except _Stop:
            pass
    return [acts[name] for name in names]


class Prefix:
    """The residual entering every block (and after the last) for each row of `tokens` [n, pos], and
    forwards resumed from it. `last` [n]: each row's last token (None: position -1).

    A row is computed by the model that first asks for it, up to the block asked for (`batch` rows at a
    time), and deepened when a later call asks for a later block: a caller that asks for block `layer`
    vouches that its model's blocks below `layer` are the base model's (`first_block`), so every stored
    value is the base model's. `fill(base)` computes every row to the end at once."""

    def __init__(self, tokens: Int[Tensor, "n pos"], last: Int[Tensor, " n"] | None = None, batch: int = 32):
        self.tokens, self.last, self.batch = tokens, last, batch
        self._resid: Tensor | None = None  # (layer, n, pos, d_model), allocated on first use
        self._depth = torch.full((tokens.shape[0],), -1)  # per row: the deepest block input stored
        self._forwards: "weakref.WeakKeyDictionary[Any, Forward]" = weakref.WeakKeyDictionary()
        self._shared: int | None = None  # positions shared by rows that begin alike (0: none worth it)
        self._unshared: "weakref.WeakSet[Any]" = weakref.WeakSet()  # models the shared path missed on
        self._warned: set[str] = set()
        self._verdicts: "weakref.WeakKeyDictionary[Any, dict[tuple, str | None]]" = weakref.WeakKeyDictionary()

    @property
    def n_examples(self) -> int:
        return self.tokens.shape[0]

    def fill(self, model: Any) -> "Prefix":
        """Every row's residual at every block, computed by `model` (the base model)."""
        self.resid(model, len(model.blocks), torch.arange(self.n_examples))
        return self

    def resid(self, model: Any, layer: int, index: Int[Tensor, " rows"]) -> Float[Tensor, "rows pos d_model"]:
        """The residual entering block `layer` (n_layers: after the last block) at rows `index`; rows not yet
        computed that deep are run through `model`'s blocks below `layer`."""
        if not is_bridge(model):
            raise ValueError(f"a Prefix resumes a TransformerBridge's blocks; {model_name(model)} is not one")
        index = torch.as_tensor(index, dtype=torch.long).cpu()
        todo = index[self._depth[index] < layer].unique()
        n_layers = len(model.blocks)
        names = [hook_name("resid_pre", i) for i in range(n_layers)] + [hook_name("resid_post", n_layers - 1)]
        for start in range(0, len(todo), self.batch):
            rows = todo[start:start + self.batch]
            acts = _record(model, self.tokens[rows.to(self.tokens.device)], names[:layer + 1])
            if self._resid is None:
                self._resid = acts[0].new_empty(len(names), self.n_examples, *acts[0].shape[1:])
            for i in range(layer + 1):
                fresh = rows[self._depth[rows] < i]  # stored values stay as they are: reruns are bit-identical
                self._resid[i, fresh.to(self._resid.device)] = acts[i][self._depth[rows] < i]
            self._depth[rows] = layer
        return self._resid[layer, index.to(self._resid.device)]

    def _forward(self, model: Any) -> Forward:
        """`model`'s block inputs for this batch's length, recorded once per model on its first rows."""
        if model not in self._forwards:
            rows = slice(0, _CHECK_ROWS)
            forward = Forward(model, self.tokens[rows], last=None if self.last is None else self.last[rows])
            # No proof of its own: `check` compares the one resumed path used here with the full forward.
            forward.cache(prove=False)
            self._forwards[model] = forward
        return self._forwards[model]

    @property
    def shared_positions(self) -> int:
        """How many first positions rows that begin alike share (0: sharing would save under a fifth of the
        positions run): the count that runs the fewest positions, each distinct beginning once."""
        if self._shared is None:
            n, length = self.tokens.shape
            # Each row's last token runs (and no rows share nothing).
            most = 0 if n == 0 else length - 1 if self.last is None else int(self.last.min())
            cost, self._shared = n * length, 0
            group = torch.zeros(n, dtype=torch.long)  # each row's beginning so far, as a number
            for shared in range(1, most + 1):
                # A beginning one token longer is a (beginning, next token) pair: one pass over the rows each.
                pairs = torch.stack([group, self.tokens[:, shared - 1].cpu()], 1)
                _, group = torch.unique(pairs, dim=0, return_inverse=True)
                beginnings = int(group.max()) + 1
                if beginnings == n:
                    break  # every row alone: longer beginnings only cost more
                if beginnings * shared + n * (length - shared) < cost:
                    cost, self._shared = beginnings * shared + n * (length - shared), shared
            if cost > _SHARE_AT_MOST * n * length:
                self._shared = 0
        return self._shared

    def logits(self, model: Any, layer: int, index: Int[Tensor, " rows"], positions: Positions = "last",
               batch: int | None = None, share: bool = False) -> Float[Tensor, "rows *pos vocab"]:
        """`model`'s logits at rows `index`, run from the base residual entering block `layer` (at each row's
        last token, or at every position), `batch` rows per forward (None: all). Differentiable in `model`'s
        parameters. `share`: last positions run the rows' common beginnings once (`shared_positions`)."""
        index = torch.as_tensor(index, dtype=torch.long).cpu()
        forward = self._forward(model)
        last = None if self.last is None else self.last[index.to(self.last.device)].cpu()
        batch = batch or max(1, len(index))
        if positions == "last" and share and layer < len(model.blocks) and self._shares(model, forward):
            return self._shared_logits(model, forward, layer, index, last, batch)
        out = []
        for start in range(0, len(index), batch):
            resid = self.resid(model, layer, index[start:start + batch])
            x = forward.resume(resid, layer) if layer < len(model.blocks) else resid.clone()
            out.append(final_logits(model, x) if positions == "all" else
                       last_logits(model, x, None if last is None else last[start:start + batch]))
        return torch.cat(out)

    def _shares(self, model: Any, forward: Forward) -> bool:
        """Whether `model`'s reads asking to share beginnings do (where it is worth it and has not missed)."""
        return self.shared_positions > 0 and forward.reuses_prefix and model not in self._unshared

    def _shared_logits(self, model: Any, forward: Forward, layer: int, index: Tensor, last: Tensor | None,
                       batch: int) -> Tensor:
        """Last-position logits with each distinct beginning of the rows run once (see `logits`). Rows run
        grouped by beginning, so only the keys and values of the beginnings a batch of rows needs are held."""
        shared = self.shared_positions
        _, group = torch.unique(self.tokens[index.to(self.tokens.device), :shared].cpu(), dim=0, return_inverse=True)
        order = torch.argsort(group, stable=True)
        held, keys_values, out = torch.empty(0, dtype=torch.long), None, []
        for start in range(0, len(order), batch):
            rows = order[start:start + batch]  # positions in `index`
            needed = group[rows].unique()
            new = needed[~torch.isin(needed, held)]
            # Each new beginning is run from its first row (every row of it holds the base model's residual of
            # the same tokens); `held` stays sorted, as the rows are.
            if len(new):
                firsts = rows[(group[rows][:, None] == new[None]).int().argmax(0)]
                fresh = forward.prefix_keys_values(self.resid(model, layer, index[firsts])[:, :shared], layer)
                keep = torch.isin(held, needed)
                on = fresh[0][0].device
                keys_values = fresh if keys_values is None else [
                    (torch.cat([k[keep.to(on)], k2]), torch.cat([v[keep.to(on)], v2]))
                    for (k, v), (k2, v2) in zip(keys_values, fresh)]
                held = torch.cat([held[keep], new])
            at = torch.searchsorted(held, group[rows]).to(keys_values[0][0].device)
            x = forward.resume(self.resid(model, layer, index[rows])[:, shared:], layer,
                               [(k[at], v[at]) for k, v in keys_values])
            out.append(last_logits(model, x, None if last is None else last[rows] - shared))
        return torch.cat(out)[torch.argsort(order).to(out[0].device)]

    def check(self, model: Any, layer: int, share: bool = False) -> str | None:
        """None when the resumed path reproduces `model`'s own last-position logits on the first rows, run in
        full; else what differed. A model whose blocks below `layer` differ from the base model's misses.
        With `share`, the path that shares beginnings (where `logits` would): where only it misses, the model
        stops sharing them here (with a warning) and the check stands on the rows run whole."""
        rows = torch.arange(min(_CHECK_ROWS, self.n_examples))
        with torch.no_grad():
            last = None if self.last is None else self.last[rows.to(self.last.device)]
            expected = full_logits(model, self.tokens[rows.to(self.tokens.device)], last, "last").float()
            try:  # only the shortcut: a model whose own forward fails says so itself
                if not self._forward(model).resumable:
                    return "cannot resume its blocks (the resumed forward failed its proof on this model)"
                if share and layer < len(model.blocks) and self._shares(model, self._forward(model)):
                    problem = self._miss(model, layer, rows, expected, True)
                    if problem is None:
                        return None
                    self._unshared.add(model)
                    warnings.warn(f"model {model_name(model)}: {problem}; mechattr runs each row whole from the "
                                  "block instead", FastPathWarning, stacklevel=4)
                return self._miss(model, layer, rows, expected, False)
            except Exception as error:  # noqa: BLE001  (any failure of the shortcut means: use the exact path)
                return f"from block {layer}, the resumed forward fails to run: {type(error).__name__}: {error}"

    def _miss(self, model: Any, layer: int, rows: Tensor, expected: Tensor, share: bool) -> str | None:
        """What the resumed logits of `rows` miss `expected` by, or None; a failure to run raises, except on
        the shared path (whose failure is a miss)."""
        what = f"the rows' shared first {self.shared_positions} positions" if share else "the base model's residual"
        try:
            got = self.logits(model, layer, rows, share=share).float()
        except Exception as error:  # noqa: BLE001  (a shared path that cannot run: rows run whole)
            if not share:
                raise
            return f"from block {layer}, {what} fail to run: {type(error).__name__}: {error}"
        miss = logit_miss(model, got, expected)
        if miss is None:
            return None
        return f"from block {layer}, {what} misses the model's own last-position logits {miss}"

    def usable(self, model: Any, layer: int | None, share: bool = False) -> bool:
        """Whether `model` may run from block `layer` on this prefix (`check`, with `share` as the reads will
        use it); warns once per miss."""
        if layer is None:
            return False
        # A proof holds while the parameters it relies on, those outside blocks >= layer, are unchanged:
        # their in-place version counters key the verdict, so runs that differ only in later blocks
        # (the trials of one comparison) are proved once.
        params = list(model.parameters())
        inside = {id(p) for block in model.blocks[layer:] for p in block.parameters()}
        key = (layer, share, tuple(p._version for p in params if id(p) not in inside))
        verdicts = self._verdicts.setdefault(model, {})
        if key not in verdicts:
            verdicts[key] = self.check(model, layer, share)
        problem = verdicts[key]
        if problem is not None and problem not in self._warned:
            self._warned.add(problem)
            warnings.warn(f"model {model_name(model)}: {problem}; mechattr runs full forwards for it instead",
                          FastPathWarning, stacklevel=3)
        return problem is None

