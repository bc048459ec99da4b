"""The task type: aligned clean and corrupted prompts, the answer and wrong-answer tokens, and a metric."""

from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import torch
from jaxtyping import Int
from torch import Tensor

from mechattr.tasks.metrics import LogitDiff, Metric, metric_by_name

__all__ = ["Task", "TaskError"]


class TaskError(ValueError):
    """A task's prompts or answers do not fit the model's tokenizer; the message names the example."""


@dataclass(frozen=True, eq=False)
class Task:
    """n examples of aligned clean/corrupted prompts, all `n_pos` tokens long."""

    clean: Int[Tensor, "n pos"]
    corrupt: Int[Tensor, "n pos"]
    answer: Int[Tensor, " n"]
    wrong: Int[Tensor, " n"]
    metric: Metric = field(default_factory=LogitDiff)
    name: str = "task"
    str_tokens: tuple[str, ...] = ()  # the first clean prompt's tokens, for plot labels

    def __post_init__(self):
        n, n_pos = self.clean.shape
        if self.corrupt.shape != self.clean.shape:
            raise TaskError(f"task {self.name!r}: clean tokens have shape {tuple(self.clean.shape)} but "
                            f"corrupted tokens {tuple(self.corrupt.shape)}; they must match")
        for what, ids in (("answer", self.answer), ("wrong", self.wrong)):
            if ids.shape != (n,):
                raise TaskError(f"task {self.name!r}: {what} ids have shape {tuple(ids.shape)}, expected ({n},)")

    @property
    def n_examples(self) -> int:
        return self.clean.shape[0]

    @property
    def n_pos(self) -> int:
        return self.clean.shape[1]

    def tokens(self, run: str) -> Int[Tensor, "n pos"]:
        if run not in ("clean", "corrupt"):
            raise ValueError(f"run must be 'clean' or 'corrupt', got {run!r}")
        return self.clean if run == "clean" else self.corrupt

    def subset(self, index: Sequence[int] | slice) -> "Task":
        """The examples at `index`, same metric and labels."""
        idx = torch.arange(self.n_examples)[index] if isinstance(index, slice) else torch.as_tensor(index)
        return replace(self, clean=self.clean[idx], corrupt=self.corrupt[idx], answer=self.answer[idx],
                       wrong=self.wrong[idx])

    def with_metric(self, metric: Metric | str) -> "Task":
        return replace(self, metric=metric_by_name(metric) if isinstance(metric, str) else metric)

    def to(self, device: Any) -> "Task":
        """The same task with every tensor on `device` (a torch.device or a string such as "cuda")."""
        return replace(self, clean=self.clean.to(device), corrupt=self.corrupt.to(device),
                       answer=self.answer.to(device), wrong=self.wrong.to(device))
