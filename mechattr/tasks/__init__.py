"""Tasks: clean and corrupted prompts, the answer and wrong-answer tokens, and a metric.

Build one from text with `from_prompts`, from a JSONL file with `from_jsonl` (lines
`{"clean": str, "corrupt": str, "answer": str, "wrong": str}`), or use the built-ins `ioi` and `facts`.
"""

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import torch
from jaxtyping import Int
from torch import Tensor

from mechattr.tasks.metrics import AnswerProb, KLToClean, LogitDiff, Metric, metric_by_name

__all__ = ["Task", "TaskError", "from_prompts", "from_jsonl", "ioi", "facts", "by_name",
           "Metric", "LogitDiff", "AnswerProb", "KLToClean", "metric_by_name"]


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


def _str_tokens(model: Any, ids: Tensor) -> list[str]:
    return [model.tokenizer.decode([int(i)]) for i in ids]


def _single_token(model: Any, text: str, index: int, what: str) -> int:
    ids = model.to_tokens(text, prepend_bos=False)[0]
    if ids.numel() != 1:
        raise TaskError(f"example {index}: the {what} {text!r} is {ids.numel()} tokens "
                        f"{_str_tokens(model, ids)}; answers must be exactly one token "
                        "(most tokenizers want a leading space, e.g. ' Paris')")
    return int(ids[0])


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
                f"they must align position by position.\n  clean:   {_str_tokens(model, tc)}\n"
                f"  corrupt: {_str_tokens(model, tk)}")
        if rows_clean and tc.numel() != rows_clean[0].numel():
            raise TaskError(
                f"example {i}: prompt is {tc.numel()} tokens but example 0 is {rows_clean[0].numel()}; all "
                f"examples of a task must have one length so positions line up.\n  example 0: "
                f"{_str_tokens(model, rows_clean[0])}\n  example {i}: {_str_tokens(model, tc)}")
        rows_clean.append(tc)
        rows_corrupt.append(tk)
    answers = [_single_token(model, a, i, "answer") for i, a in enumerate(answer)]
    wrongs = [_single_token(model, w, i, "wrong answer") for i, w in enumerate(wrong)]
    clean_ids = torch.stack(rows_clean)
    return Task(clean=clean_ids, corrupt=torch.stack(rows_corrupt), answer=torch.tensor(answers),
                wrong=torch.tensor(wrongs), name=name,
                metric=metric_by_name(metric) if isinstance(metric, str) else metric,
                str_tokens=tuple(_str_tokens(model, clean_ids[0])))


def from_jsonl(model: Any, path: str | Path, name: str | None = None, metric: Metric | str = "logit_diff") -> Task:
    """A task from a JSONL file, one `{"clean", "corrupt", "answer", "wrong"}` object per line."""
    path = Path(path)
    if not path.is_file():
        raise TaskError(f"task file {str(path)!r} does not exist")
    keys = ("clean", "corrupt", "answer", "wrong")
    columns: dict[str, list[str]] = {k: [] for k in keys}
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise TaskError(f"task file {path} is not UTF-8 text ({error.reason} at byte {error.start})") from None
    # Split on "\n" only: str.splitlines would also break at U+2028 etc. inside JSON strings.
    for line_no, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise TaskError(f"{path}:{line_no}: not valid JSON ({error.msg})") from None
        except (RecursionError, ValueError) as error:  # nesting or integer size past Python's limits
            raise TaskError(f"{path}:{line_no}: not usable JSON ({error.__class__.__name__})") from None
        if not isinstance(row, dict) or any(not isinstance(row.get(k), str) for k in keys):
            raise TaskError(f"{path}:{line_no}: each line must be an object with string fields "
                            f"{', '.join(keys)}; got {line.strip()[:120]}")
        try:
            for k in keys:
                row[k].encode("utf-8")
        except UnicodeEncodeError:
            raise TaskError(f"{path}:{line_no}: a string holds an unpaired surrogate escape") from None
        for k in keys:
            columns[k].append(row[k])
    if not columns["clean"]:
        raise TaskError(f"task file {path} holds no examples")
    return from_prompts(model, name=name or path.stem, metric=metric, **columns)


from mechattr.tasks.builtin import facts, ioi  # noqa: E402  (builtin uses from_prompts above)


def by_name(model: Any, name: str, n: int = 8, seed: int = 0) -> Task:
    """"ioi", "facts", or a path to a JSONL task file."""
    if name == "ioi":
        return ioi(model, n=n, seed=seed)
    if name == "facts":
        return facts(model, n=n, seed=seed)
    if name.endswith(".jsonl") or Path(name).exists():
        return from_jsonl(model, name)
    raise TaskError(f"unknown task {name!r}; valid: ioi, facts, or a path to a .jsonl file")
