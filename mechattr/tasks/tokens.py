"""Tokenization: prompts into aligned token tensors, single-token answers, groups of one token length."""

from collections import defaultdict
from typing import Any, Callable, Iterable, Sequence, TypeVar

import torch
from torch import Tensor

from mechattr.tasks.metrics import Metric, metric_by_name
from mechattr.tasks.task import Task, TaskError

__all__ = ["from_prompts", "single_token", "str_tokens", "largest_same_length"]

T = TypeVar("T")


def str_tokens(model: Any, ids: Tensor) -> list[str]:
    """Each id of a 1-d tensor decoded on its own."""
    return [model.tokenizer.decode([int(i)]) for i in ids]


def single_token(model: Any, text: str, what: str = "answer", index: int | None = None) -> int:
    """The id of `text`, which must be exactly one token (no BOS); the error names the example and tokens."""
    ids = model.to_tokens(text, prepend_bos=False)[0]
    if ids.numel() != 1:
        where = "" if index is None else f"example {index}: "
        raise TaskError(f"{where}the {what} {text!r} is {ids.numel()} tokens {str_tokens(model, ids)}; "
                        "answers must be exactly one token (most tokenizers want a leading space, e.g. ' Paris')")
    return int(ids[0])


def largest_same_length(items: Iterable[T], length: Callable[[T], int]) -> list[T]:
    """The largest group of `items` sharing one `length` (ties: the group whose first item comes first)."""
    groups: dict[int, list[T]] = defaultdict(list)
    for item in items:
        groups[length(item)].append(item)
    if not groups:
        raise ValueError("no items to group by token length")
    return max(groups.values(), key=len)


def from_prompts(model: Any, clean: Sequence[str], corrupt: Sequence[str], answer: Sequence[str],
                 wrong: Sequence[str], name: str = "task", metric: Metric | str = "logit_diff") -> Task:
    """Tokenize prompts with the model's tokenizer (BOS as the model adds it) and validate them."""
    lengths = {len(clean), len(corrupt), len(answer), len(wrong)}
    if len(lengths) != 1 or not clean:
        raise TaskError(f"task {name!r}: need the same non-zero number of clean ({len(clean)}), corrupt "
                        f"({len(corrupt)}), answer ({len(answer)}) and wrong ({len(wrong)}) entries")
    rows_clean, rows_corrupt = [], []
    for i, (c, k) in enumerate(zip(clean, corrupt)):
        tc, tk = model.to_tokens(c)[0], model.to_tokens(k)[0]
        if tc.numel() != tk.numel():
            raise TaskError(
                f"example {i}: clean prompt is {tc.numel()} tokens but corrupted prompt is {tk.numel()}; "
                f"they must align position by position.\n  clean:   {str_tokens(model, tc)}\n"
                f"  corrupt: {str_tokens(model, tk)}")
        if rows_clean and tc.numel() != rows_clean[0].numel():
            raise TaskError(
                f"example {i}: prompt is {tc.numel()} tokens but example 0 is {rows_clean[0].numel()}; all "
                f"examples of a task must have one length so positions line up.\n  example 0: "
                f"{str_tokens(model, rows_clean[0])}\n  example {i}: {str_tokens(model, tc)}")
        rows_clean.append(tc)
        rows_corrupt.append(tk)
    answers = [single_token(model, a, "answer", i) for i, a in enumerate(answer)]
    wrongs = [single_token(model, w, "wrong answer", i) for i, w in enumerate(wrong)]
    clean_ids = torch.stack(rows_clean)
    return Task(clean=clean_ids, corrupt=torch.stack(rows_corrupt), answer=torch.tensor(answers),
                wrong=torch.tensor(wrongs), name=name,
                metric=metric_by_name(metric) if isinstance(metric, str) else metric,
                str_tokens=tuple(str_tokens(model, clean_ids[0])))
