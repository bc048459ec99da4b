"""Task metrics: per-example numbers read from last-position logits.

Every metric has one signature: `metric(logits, answer, wrong, reference) -> per-example values`, where
`reference` holds the clean run's last-position log-probabilities (used by KL, ignored by the others,
which accept None).
Each concrete `__call__` carries the annotations itself so that the runtime shape checker sees them.
"""

from dataclasses import dataclass
from typing import ClassVar

from jaxtyping import Float, Int
from torch import Tensor

from mechattr.stats import kl_divergence

__all__ = ["Metric", "LogitDiff", "AnswerProb", "KLToClean", "METRICS", "metric_by_name"]


Logits = Float[Tensor, "n vocab"]  # last-position logits (or log-probabilities for `reference`)
Ids = Int[Tensor, " n"]
PerExample = Float[Tensor, " n"]


class Metric:
    name: ClassVar[str] = "metric"

    def __call__(self, logits: Logits, answer: Ids, wrong: Ids, reference: Logits | None) -> PerExample:
        raise NotImplementedError


@dataclass(frozen=True)
class LogitDiff(Metric):
    """logit(answer) - logit(wrong)."""

    name: ClassVar[str] = "logit_diff"

    def __call__(self, logits: Logits, answer: Ids, wrong: Ids, reference: Logits | None) -> PerExample:
        return logits.gather(-1, answer[:, None])[:, 0] - logits.gather(-1, wrong[:, None])[:, 0]


@dataclass(frozen=True)
class AnswerProb(Metric):
    """p(answer) under the softmax over the whole vocabulary."""

    name: ClassVar[str] = "answer_prob"

    def __call__(self, logits: Logits, answer: Ids, wrong: Ids, reference: Logits | None) -> PerExample:
        return logits.float().softmax(-1).gather(-1, answer[:, None])[:, 0]


@dataclass(frozen=True)
class KLToClean(Metric):
    """KL(clean || run) of the next-token distribution, in nats: 0 on the clean run."""

    name: ClassVar[str] = "kl"

    def __call__(self, logits: Logits, answer: Ids, wrong: Ids, reference: Logits | None) -> PerExample:
        if reference is None:
            raise ValueError("the kl metric needs the clean run's log-probabilities as `reference`, got None")
        return kl_divergence(reference, logits.float().log_softmax(-1))


METRICS: dict[str, type[Metric]] = {m.name: m for m in (LogitDiff, AnswerProb, KLToClean)}


def metric_by_name(name: str) -> Metric:
    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r}; valid: {', '.join(METRICS)}")
    return METRICS[name]()
