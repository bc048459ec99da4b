"""Evaluating a fine-tuned model: the task metric, accuracy, and collateral change on other inputs.

Every function takes any model (a bridge, or a Hugging Face / peft model in the same coordinates), so the
LoRA baseline is measured by the same code, and computes only what it reads: a task's metric reads each
example's last token, so only those positions are unembedded. Given the `Prefix` of the scored tokens and
`layer`, the lowest block the model changed (`prefix.first_block`), a model runs from that block on once
`Prefix.usable` has proved the resumed path on it; otherwise it runs in full."""

from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from mechattr.finetune.prefix import Positions, Prefix, full_logits
from mechattr.stats import kl_divergence
from mechattr.tasks import Task

__all__ = ["task_scores", "per_example", "log_probs", "kl_from_base", "logits"]


def logits(model: Any, tokens: Int[Tensor, "n pos"], positions: Positions = "last", batch: int = 32, *,
           last: Int[Tensor, " n"] | None = None, prefix: Prefix | None = None, layer: int | None = None
           ) -> Float[Tensor, "n *pos vocab"]:
    """Float32 logits at each row's `last` token (None: position -1) or at every position, `batch` rows at a
    time, without gradients; from block `layer` of `prefix` (the base model's run of these `tokens`) when
    the prefix proves usable on `model`."""
    if prefix is not None and not (prefix.tokens.shape == tokens.shape and torch.equal(prefix.tokens, tokens)):
        raise ValueError(f"the prefix holds another batch ({tuple(prefix.tokens.shape)} tokens) than the one "
                         f"scored ({tuple(tokens.shape)})")
    share = positions == "last"  # rows that begin alike run their common beginning once (`Prefix.logits`)
    resumed = prefix is not None and prefix.usable(model, layer, share)
    with torch.no_grad():
        if resumed:
            return prefix.logits(model, layer, torch.arange(tokens.shape[0]), positions, batch, share).float()
        out = []
        for start in range(0, tokens.shape[0], batch):
            rows = torch.arange(start, min(start + batch, tokens.shape[0]))
            ends = None if last is None else last[rows.to(last.device)]
            out.append(full_logits(model, tokens[rows.to(tokens.device)], ends, positions).float())
    return torch.cat(out)


def per_example(model: Any, task: Task, batch: int = 32, *, prefix: Prefix | None = None,
                layer: int | None = None) -> tuple[Float[Tensor, " n"], Bool[Tensor, " n"]]:
    """Per example: the task metric on the clean prompt, and whether it is right (answer logit above the
    wrong answer's). `prefix` and `layer` as in `logits`."""
    last = logits(model, task.clean, "last", batch, last=task.last, prefix=prefix, layer=layer)  # (n, vocab)
    answer, wrong = task.answer.to(last.device), task.wrong.to(last.device)
    metric = task.metric(last, answer, wrong, last.log_softmax(-1))
    correct = last.gather(-1, answer[:, None]) > last.gather(-1, wrong[:, None])
    return metric, correct[:, 0]


def task_scores(model: Any, task: Task, batch: int = 32, *, prefix: Prefix | None = None,
                layer: int | None = None) -> dict[str, float]:
    """Mean task metric on the clean prompts and accuracy (answer logit above the wrong answer's)."""
    metric, correct = per_example(model, task, batch, prefix=prefix, layer=layer)
    return {"metric": float(metric.mean()), "accuracy": float(correct.float().mean())}


def log_probs(model: Any, tokens: Int[Tensor, "n pos"], batch: int = 16, *, prefix: Prefix | None = None,
              layer: int | None = None) -> Float[Tensor, "n pos vocab"]:
    """Next-token log-probabilities at every position."""
    return logits(model, tokens, "all", batch, prefix=prefix, layer=layer).log_softmax(-1)


def kl_from_base(model: Any, tokens: Int[Tensor, "n pos"], base: Float[Tensor, "n pos vocab"], batch: int = 16,
                 *, prefix: Prefix | None = None, layer: int | None = None) -> float:
    """Mean over positions of KL(base || model) in nats; `base` from `log_probs` on the base model."""
    logp = log_probs(model, tokens, batch, prefix=prefix, layer=layer)
    return float(kl_divergence(base, logp).mean())
