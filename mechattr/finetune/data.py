"""Training data and losses: a `Task` (answer token at each example's last position) or plain `Text` (LM loss).

Batches are a pure function of (seed, step), so a run resumed from a checkpoint sees the same batches
as an uninterrupted one without saving any random state.
"""

from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from mechattr.finetune.prefix import Prefix, full_logits
from mechattr.tasks import Task

__all__ = ["Text", "Data", "LOSSES", "logits_of", "batch_indices", "loss", "tokens_of"]

# The task losses, with a line each for the command line's help.
LOSSES = {"ce": "cross-entropy of the answer", "logit_diff": "minus the answer-minus-wrong logit difference"}


@dataclass(frozen=True, eq=False)
class Text:
    """Plain text cut into equal windows of tokens, trained with the next-token loss."""

    tokens: Int[Tensor, "n pos"]
    name: str = "text"

    @classmethod
    def from_strings(cls, model: Any, texts: Sequence[str], seq_len: int = 32, name: str = "text") -> "Text":
        """Tokenize each text (with BOS as the model adds it), concatenate, cut into `seq_len` windows."""
        if seq_len < 2:
            raise ValueError(f"seq_len must be >= 2 for a next-token loss, got {seq_len}")
        stream = torch.cat([model.to_tokens(t)[0] for t in texts])
        n = stream.numel() // seq_len
        if n == 0:
            raise ValueError(f"text {name!r}: {stream.numel()} tokens make no window of seq_len={seq_len}")
        return cls(stream[: n * seq_len].reshape(n, seq_len), name)

    @property
    def n_examples(self) -> int:
        return self.tokens.shape[0]


Data = Task | Text


def logits_of(model: Any, tokens: Int[Tensor, "n pos"]) -> Float[Tensor, "n pos vocab"]:
    """Logits from a TransformerBridge (a tensor) or a Hugging Face / peft model (an output object)."""
    out = model(tokens)
    return out if torch.is_tensor(out) else out.logits


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> Int[Tensor, " batch"]:
    """Examples of batch `step`: consecutive slices of one seeded permutation per epoch."""
    batch_size = min(batch_size, n)
    start = step * batch_size
    epochs = range(start // n, (start + batch_size - 1) // n + 1)
    order = torch.cat([torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + e))
                       for e in epochs])
    offset = start - epochs[0] * n
    return order[offset: offset + batch_size]


def tokens_of(data: Data) -> tuple[Int[Tensor, "n pos"], Int[Tensor, " n"] | None]:
    """The tokens a model reads in training on `data` (a task's clean prompts), and each row's last token."""
    return (data.tokens, None) if isinstance(data, Text) else (data.clean, data.last)


def loss(model: Any, data: Data, index: Int[Tensor, " batch"], kind: str = "ce", *, prefix: Prefix | None = None,
         layer: int | None = None) -> Float[Tensor, ""]:
    """Mean training loss of examples `index`: for a Task, `kind` "ce" (cross-entropy of the answer at
    each example's last token) or "logit_diff" (minus answer-minus-wrong logit); for Text, next-token loss.
    Only the positions the loss reads are unembedded; with `prefix` (the base model's run of the data's
    tokens, see `mechattr.finetune.prefix`) the model runs from block `layer` on."""
    if kind not in LOSSES:
        raise ValueError(f"unknown task loss {kind!r}; valid: {', '.join(LOSSES)}")
    tokens, ends = tokens_of(data)
    positions = "all" if isinstance(data, Text) else "last"
    if prefix is not None:
        logits = prefix.logits(model, layer, index, positions)
    else:
        logits = full_logits(model, tokens[index], None if ends is None else ends[index], positions)
    logits = logits.float()  # (B, P, vocab) for text, (B, vocab) for a task
    if isinstance(data, Text):
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[index][:, 1:].flatten())
    answer, wrong = data.answer[index], data.wrong[index]
    if kind == "ce":
        return F.cross_entropy(logits, answer)
    return -(logits.gather(-1, answer[:, None]) - logits.gather(-1, wrong[:, None])).mean()
