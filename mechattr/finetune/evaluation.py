"""Evaluating a fine-tuned model: the task metric, accuracy, and collateral change on other inputs.

Every function takes any model `logits_of` understands (a bridge, or a Hugging Face / peft model in the
same coordinates), so the LoRA baseline is measured by the same code.
"""

from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechattr.finetune.data import logits_of
from mechattr.stats import kl_divergence
from mechattr.tasks import Task

__all__ = ["task_scores", "log_probs", "kl_from_base"]


def _batched_logits(model: Any, tokens: Int[Tensor, "n pos"], batch: int, last_only: bool) -> Tensor:
    outs = []
    with torch.no_grad():
        for i in range(0, tokens.shape[0], batch):
            logits = logits_of(model, tokens[i: i + batch]).float()
            outs.append(logits[:, -1] if last_only else logits)
    return torch.cat(outs)


def task_scores(model: Any, task: Task, batch: int = 32) -> dict[str, float]:
    """Mean task metric on the clean prompts and accuracy (answer logit above the wrong answer's)."""
    last = _batched_logits(model, task.clean, batch, last_only=True)  # (n, vocab)
    metric = task.metric(last, task.answer, task.wrong, last.log_softmax(-1))
    correct = last.gather(-1, task.answer[:, None]) > last.gather(-1, task.wrong[:, None])
    return {"metric": float(metric.mean()), "accuracy": float(correct.float().mean())}


def log_probs(model: Any, tokens: Int[Tensor, "n pos"], batch: int = 16) -> Float[Tensor, "n pos vocab"]:
    """Next-token log-probabilities at every position."""
    return _batched_logits(model, tokens, batch, last_only=False).log_softmax(-1)


def kl_from_base(model: Any, tokens: Int[Tensor, "n pos"], base: Float[Tensor, "n pos vocab"],
                 batch: int = 16) -> float:
    """Mean over positions of KL(base || model) in nats; `base` from `log_probs` on the base model."""
    logp = log_probs(model, tokens, batch)
    return float(kl_divergence(base, logp).mean())
