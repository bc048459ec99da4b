"""Evaluating a fine-tuned model: the task metric, accuracy, and collateral change on other inputs.

Every function takes any model `logits_of` understands (a bridge, or a Hugging Face / peft model in the
same coordinates), so the LoRA baseline is measured by the same code.
"""

from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from mechattr.finetune.data import logits_of
from mechattr.forward import at_last
from mechattr.stats import kl_divergence
from mechattr.tasks import Task

__all__ = ["task_scores", "per_example", "log_probs", "kl_from_base"]


def _batched_logits(model: Any, tokens: Int[Tensor, "n pos"], batch: int, last_only: bool,
                    last: Int[Tensor, " n"] | None = None) -> Tensor:
    """Logits at every position, or with `last_only` at each row's `last` token (None: position -1)."""
    outs = []
    with torch.no_grad():
        for i in range(0, tokens.shape[0], batch):
            logits = logits_of(model, tokens[i: i + batch]).float()
            outs.append(at_last(logits, None if last is None else last[i: i + batch]) if last_only else logits)
    return torch.cat(outs)


def per_example(model: Any, task: Task, batch: int = 32) -> tuple[Float[Tensor, " n"], Bool[Tensor, " n"]]:
    """Per example: the task metric on the clean prompt, and whether it is right (answer logit above the
    wrong answer's)."""
    last = _batched_logits(model, task.clean, batch, last_only=True, last=task.last)  # (n, vocab)
    metric = task.metric(last, task.answer, task.wrong, last.log_softmax(-1))
    correct = last.gather(-1, task.answer[:, None]) > last.gather(-1, task.wrong[:, None])
    return metric, correct[:, 0]


def task_scores(model: Any, task: Task, batch: int = 32) -> dict[str, float]:
    """Mean task metric on the clean prompts and accuracy (answer logit above the wrong answer's)."""
    metric, correct = per_example(model, task, batch)
    return {"metric": float(metric.mean()), "accuracy": float(correct.float().mean())}


def log_probs(model: Any, tokens: Int[Tensor, "n pos"], batch: int = 16) -> Float[Tensor, "n pos vocab"]:
    """Next-token log-probabilities at every position."""
    return _batched_logits(model, tokens, batch, last_only=False).log_softmax(-1)


def kl_from_base(model: Any, tokens: Int[Tensor, "n pos"], base: Float[Tensor, "n pos vocab"],
                 batch: int = 16) -> float:
    """Mean over positions of KL(base || model) in nats; `base` from `log_probs` on the base model."""
    logp = log_probs(model, tokens, batch)
    return float(kl_divergence(base, logp).mean())
