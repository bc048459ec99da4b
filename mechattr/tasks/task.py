"""The task type: aligned clean and corrupted prompts, the answer and wrong-answer tokens, and a metric.

Examples may have different token lengths. Their tokens are right-padded to one width and `lengths`
says where each ends: with causal attention a real token never sees the padding after it, and its
position index is the same as in the unpadded prompt, so every real position computes exactly what the
prompt alone would, without an attention mask. Each example is read out at its own last token.
Positions that mean the same thing in every example ("S2", "END") are `named_positions`: one token
index per example.
"""

from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Sequence

import torch
from jaxtyping import Int
from torch import Tensor

from mechattr.tasks.metrics import LogitDiff, Metric, metric_by_name

__all__ = ["Task", "TaskError"]


class TaskError(ValueError):
    """A task's prompts or answers do not fit the model's tokenizer; the message names the example."""


@dataclass(frozen=True, eq=False)
class Task:
    """n examples of aligned clean/corrupted prompts, right-padded to `n_pos` tokens. Example i's clean
    and corrupted prompts both have `lengths[i]` real tokens."""

    clean: Int[Tensor, "n pos"]
    corrupt: Int[Tensor, "n pos"]
    answer: Int[Tensor, " n"]
    wrong: Int[Tensor, " n"]
    metric: Metric = field(default_factory=LogitDiff)
    name: str = "task"
    str_tokens: tuple[str, ...] = ()  # the first clean prompt's tokens, for plot labels
    lengths: Int[Tensor, " n"] | None = None  # real tokens per example; None: every example fills n_pos
    # name -> each example's token index (negative: from the example's end). On a task of mixed lengths
    # without names, every position counted from the end is named: "-1" is each example's last token.
    named_positions: dict[str, Int[Tensor, " n"]] = field(default_factory=dict)

    def __post_init__(self):
        n, n_pos = self.clean.shape
        if self.corrupt.shape != self.clean.shape:
            raise TaskError(f"task {self.name!r}: clean tokens have shape {tuple(self.clean.shape)} but "
                            f"corrupted tokens {tuple(self.corrupt.shape)}; they must match")
        for what, ids in (("answer", self.answer), ("wrong", self.wrong)):
            if ids.shape != (n,):
                raise TaskError(f"task {self.name!r}: {what} ids have shape {tuple(ids.shape)}, expected ({n},)")
        if self.lengths is not None and self.lengths.shape != (n,):
            raise TaskError(f"task {self.name!r}: lengths have shape {tuple(self.lengths.shape)}, expected ({n},)")
        if self.clean.device.type == "meta":  # shapes only (a task moved to the meta device): no values to check
            return
        lengths, named = self.lengths, dict(self.named_positions)
        if lengths is not None:
            lengths = lengths.to(self.clean.device, torch.long)
            if not bool(((lengths >= 1) & (lengths <= n_pos)).all()):
                raise TaskError(f"task {self.name!r}: lengths must be token counts between 1 and {n_pos}, "
                                f"got {lengths.tolist()}")
            if bool((lengths == n_pos).all()):
                lengths = None  # one length: the same computation as a task built without lengths
            elif not named:
                named = {f"-{k}": lengths - k for k in range(int(lengths.min()), 0, -1)}
        object.__setattr__(self, "lengths", lengths)
        object.__setattr__(self, "named_positions", self._resolve(named))

    def _resolve(self, named: dict[str, Tensor]) -> dict[str, Tensor]:
        """Named positions as non-negative indices, checked, ordered by their mean index."""
        lengths = self.token_counts
        out = {}
        for name, index in named.items():
            index = torch.as_tensor(index, dtype=torch.long, device=self.clean.device)
            if index.shape != (self.n_examples,):
                raise TaskError(f"task {self.name!r}: position {name!r} has shape {tuple(index.shape)}, expected "
                                f"({self.n_examples},): one token index per example")
            index = torch.where(index < 0, index + lengths, index)
            bad = ((index < 0) | (index >= lengths)).nonzero().flatten().tolist()
            if bad:
                i, size = bad[0], int(lengths[bad[0]])
                raise TaskError(f"task {self.name!r}: position {name!r} of example {i} is outside its {size} tokens "
                                f"(valid -{size}..{size - 1})")
            out[name] = index
        order = sorted(out, key=lambda name: float(out[name].float().mean()))  # stable: ties keep their order
        return {name: out[name] for name in order}

    @property
    def n_examples(self) -> int:
        return self.clean.shape[0]

    @property
    def n_pos(self) -> int:
        """Tokens per row: the longest example's length."""
        return self.clean.shape[1]

    @property
    def ragged(self) -> bool:
        """Whether some example is shorter than `n_pos` (its row ends in padding)."""
        return self.lengths is not None

    @property
    def token_counts(self) -> Int[Tensor, " n"]:
        """Real tokens per example (`lengths`, or n_pos for every example of a task of one length)."""
        if self.lengths is not None:
            return self.lengths
        return torch.full((self.n_examples,), self.n_pos, dtype=torch.long, device=self.clean.device)

    @property
    def last(self) -> Int[Tensor, " n"] | None:
        """Each example's last token index; None when every example fills all `n_pos` (read position -1)."""
        return None if self.lengths is None else self.lengths - 1

    @property
    def positions(self) -> tuple[int | str, ...]:
        """The positions a grid with a position axis runs over: every index 0..n_pos-1 on a task of one
        length, the `named_positions` on a task of mixed lengths."""
        return tuple(self.named_positions) if self.ragged else tuple(range(self.n_pos))

    def index_of(self, pos: int | str) -> Int[Tensor, " n"]:
        """Each example's token index of `pos`: a name of `named_positions`, or an index (the same in all)."""
        if isinstance(pos, str):
            return self._named(pos, f"task {self.name!r}")
        return torch.full((self.n_examples,), pos, dtype=torch.long, device=self.clean.device)

    def index_at(self, site: Any) -> Int[Tensor, " n"] | None:
        """Each example's token index of a site (anything with a `pos`) at a named position; None for a
        site at a token index or over every position, which every example indexes alike."""
        pos = getattr(site, "pos", None)
        return self._named(pos, f"site {site}: task {self.name!r}") if isinstance(pos, str) else None

    def _named(self, pos: str, who: str) -> Int[Tensor, " n"]:
        if pos not in self.named_positions:
            raise TaskError(f"{who} has no position named {pos!r}; valid: "
                            f"{', '.join(self.named_positions) or 'none (the task names no positions)'}")
        return self.named_positions[pos]

    def check_positions(self, sites: Iterable[Any]) -> None:
        """Raise a TaskError naming the first site (anything with a `pos`) whose position is not a real
        token of every example: an unknown name, or an index past the shortest example's end."""
        for site in sites:
            pos = getattr(site, "pos", None)
            if isinstance(pos, str):
                self.index_at(site)
            elif pos is not None and self.ragged and not 0 <= pos < int(self.lengths.min()):
                i, shortest = int(self.lengths.argmin()), int(self.lengths.min())
                raise TaskError(f"site {site}: pos {pos} is past the end of example {i}, which has {shortest} "
                                f"tokens; on task {self.name!r}, whose examples differ in length, patch named "
                                f"positions instead: {', '.join(self.named_positions)}")

    def tokens(self, run: str) -> Int[Tensor, "n pos"]:
        if run not in ("clean", "corrupt"):
            raise ValueError(f"run must be 'clean' or 'corrupt', got {run!r}")
        return self.clean if run == "clean" else self.corrupt

    def subset(self, index: Sequence[int] | slice) -> "Task":
        """The examples at `index`, same metric and labels, padding cut to their longest example."""
        idx = torch.arange(self.n_examples)[index] if isinstance(index, slice) else torch.as_tensor(index)
        idx = idx.to(self.clean.device)
        lengths = None if self.lengths is None else self.lengths[idx]
        width = self.n_pos if lengths is None or not len(idx) else int(lengths.max())
        cut = (lambda t: t[idx]) if width == self.n_pos else (lambda t: t[idx, :width])  # noqa: E731
        return replace(self, clean=cut(self.clean), corrupt=cut(self.corrupt), answer=self.answer[idx],
                       wrong=self.wrong[idx], lengths=lengths,
                       named_positions={k: v[idx] for k, v in self.named_positions.items()})

    def with_metric(self, metric: Metric | str) -> "Task":
        return replace(self, metric=metric_by_name(metric) if isinstance(metric, str) else metric)

    def to(self, device: Any) -> "Task":
        """The same task with every tensor on `device` (a torch.device or a string such as "cuda")."""
        return replace(self, clean=self.clean.to(device), corrupt=self.corrupt.to(device),
                       answer=self.answer.to(device), wrong=self.wrong.to(device),
                       lengths=None if self.lengths is None else self.lengths.to(device),
                       named_positions={k: v.to(device) for k, v in self.named_positions.items()})
