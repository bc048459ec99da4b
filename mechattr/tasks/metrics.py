"""Task metrics: per-example numbers read from last-position logits.

Every metric has one signature: `metric(logits, answer, wrong, reference) -> per-example values`, where
`reference` holds the clean run's last-position log-probabilities (used by KL, ignored by the others).
"""

from dataclasses import dataclass
from typing import ClassVar

import torch
from jaxtyping import Float, Int
from torch import Tensor

__all__ = ["Metric", "LogitDiff", "AnswerProb", "KLToClean", "metric_by_name"]


class Metric:
    name: ClassVar[str] = "metric"

    def __call__(self, logits: Float[Tensor, "n vocab"], answer: Int[Tensor, " n"], wrong: Int[Tensor, " n"],
                 reference: Float[Tensor, "n vocab"]) -> Float[Tensor, " n"]:
        raise NotImplementedError


@dataclass(frozen=True)
class LogitDiff(Metric):
    """logit(answer) - logit(wrong)."""

    name: ClassVar[str] = "logit_diff"

    def __call__(self, logits, answer, wrong, reference):
        return logits.gather(-1, answer[:, None])[:, 0] - logits.gather(-1, wrong[:, None])[:, 0]


@dataclass(frozen=True)
class AnswerProb(Metric):
    """p(answer) under the softmax over the whole vocabulary."""

    name: ClassVar[str] = "answer_prob"

    def __call__(self, logits, answer, wrong, reference):
        return logits.float().softmax(-1).gather(-1, answer[:, None])[:, 0]


@dataclass(frozen=True)
class KLToClean(Metric):
    """KL(clean || run) of the next-token distribution, in nats: 0 on the clean run."""

    name: ClassVar[str] = "kl"

    def __call__(self, logits, answer, wrong, reference):
        logp = logits.float().log_softmax(-1)
        return (reference.exp() * (reference - logp)).sum(-1)


_METRICS = {m.name: m for m in (LogitDiff, AnswerProb, KLToClean)}


def metric_by_name(name: str) -> Metric:
    if name not in _METRICS:
        raise ValueError(f"unknown metric {name!r}; valid: {', '.join(_METRICS)}")
    return _METRICS[name]()
