"""Tokenization: prompts into right-padded token tensors, single-token answers, named positions, and one
error that lists every bad example."""

from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence, TypeVar

import torch
from torch import Tensor

from mechattr.tasks.metrics import Metric, metric_by_name
from mechattr.tasks.task import Task, TaskError

__all__ = ["from_prompts", "check", "assemble", "single_token", "str_tokens", "largest_same_length", "token_index",
           "problems_error", "MAX_PROBLEMS"]

T = TypeVar("T")
MAX_PROBLEMS = 20  # bad examples one error lists; the rest are counted


def str_tokens(model: Any, ids: Tensor) -> list[str]:
    """Each id of a 1-d tensor decoded on its own."""
    return [model.tokenizer.decode([int(i)]) for i in ids]


def _indexed(model: Any, ids: Tensor) -> str:
    """`[0 '<s>', 1 ' When', ...]`: tokens with their indices, for errors about positions."""
    return "[" + ", ".join(f"{i} {t!r}" for i, t in enumerate(str_tokens(model, ids))) + "]"


def _one_token(model: Any, text: str, what: str) -> tuple[int | None, str | None]:
    ids = model.to_tokens(text, prepend_bos=False)[0]
    if ids.numel() == 1:
        return int(ids[0]), None
    return None, (f"the {what} {text!r} is {ids.numel()} tokens {str_tokens(model, ids)}; answers must be exactly "
                  "one token (most tokenizers want a leading space, e.g. ' Paris')")


def single_token(model: Any, text: str, what: str = "answer", index: int | None = None) -> int:
    """The id of `text`, which must be exactly one token (no BOS); the error names the example and tokens."""
    token, problem = _one_token(model, text, what)
    if problem is not None:
        raise TaskError(("" if index is None else f"example {index}: ") + problem)
    return token


def token_index(model: Any, text: str, end: int) -> int:
    """The index in `model.to_tokens(text)` of the token holding character `end - 1` of `text` (the last
    token of a word that ends there). Checked: `text[:end]` must tokenize as a prefix of `text`."""
    whole, prefix = model.to_tokens(text)[0], model.to_tokens(text[:end])[0]
    if prefix.numel() > whole.numel() or not torch.equal(whole[:prefix.numel()], prefix):
        raise TaskError(f"{text[:end]!r} does not tokenize as the start of {text!r}, so no token ends at "
                        f"character {end}:\n    prefix: {str_tokens(model, prefix)}\n"
                        f"    prompt: {str_tokens(model, whole)}")
    return prefix.numel() - 1


def largest_same_length(items: Iterable[T], length: Callable[[T], int]) -> list[T]:
    """The largest group of `items` sharing one `length` (ties: the group whose first item comes first)."""
    groups: dict[int, list[T]] = defaultdict(list)
    for item in items:
        groups[length(item)].append(item)
    if not groups:
        raise ValueError("no items to group by token length")
    return max(groups.values(), key=len)


def problems_error(what: str, problems: Sequence[str]) -> TaskError:
    """One TaskError listing up to MAX_PROBLEMS `problems` (each naming its example or line) of `what`."""
    if len(problems) == 1:
        return TaskError(problems[0])
    shown = "\n".join(f"  {p}" for p in problems[:MAX_PROBLEMS])
    more = f"\n  ... and {len(problems) - MAX_PROBLEMS} more" if len(problems) > MAX_PROBLEMS else ""
    return TaskError(f"{what} has {len(problems)} problems; fix each:\n{shown}{more}")


@dataclass(frozen=True)
class _Example:
    clean: Tensor  # (L,)
    corrupt: Tensor  # (L,)
    answer: int
    wrong: int
    positions: dict[str, int]  # non-negative token indices


def _example(model: Any, label: str, clean: str, corrupt: str, answer: str, wrong: str,
             positions: Mapping[str, Any] | None) -> tuple[_Example | None, list[str]]:
    """One example tokenized, or the problems with it (each starting with `label`)."""
    problems = []
    tc, tk = model.to_tokens(clean)[0], model.to_tokens(corrupt)[0]
    if tc.numel() == 0:
        problems.append(f"{label}: the clean prompt {clean!r} has no tokens")
    if tc.numel() != tk.numel():
        problems.append(
            f"{label}: clean prompt is {tc.numel()} tokens but corrupted prompt is {tk.numel()}; the two prompts "
            "of one example must have one length so they align position by position (examples may differ)."
            f"\n    clean:   {str_tokens(model, tc)}\n    corrupt: {str_tokens(model, tk)}")
    ids = []
    for text, what in ((answer, "answer"), (wrong, "wrong answer")):
        token, problem = _one_token(model, text, what)
        ids.append(token)
        if problem is not None:
            problems.append(f"{label}: {problem}")
    resolved: dict[str, int] = {}
    if positions is not None:
        if not isinstance(positions, Mapping) or not all(
                isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) for k, v in positions.items()):
            problems.append(f"{label}: positions must map names to token indices, e.g. "
                            f'{{"S2": 10, "END": -1}}; got {str(positions)[:120]}')
        else:
            n = tc.numel()
            for name, index in positions.items():
                if not -n <= index < n:
                    problems.append(f"{label}: position {name!r} = {index} is outside the prompt's {n} tokens "
                                    f"(valid {-n}..{n - 1}; negative counts from the end)\n    clean: "
                                    f"{_indexed(model, tc)}")
                else:
                    resolved[name] = index % n
    if problems:
        return None, problems
    return _Example(tc, tk, ids[0], ids[1], resolved), []


def _pad_id(model: Any) -> int:
    """The id padding is written with: never read (padding follows every real token), so any id does."""
    tokenizer = getattr(model, "tokenizer", None)
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            return value
    return 0


def _stack(rows: Sequence[Tensor], width: int, pad: int) -> Tensor:
    out = torch.full((len(rows), width), pad, dtype=rows[0].dtype, device=rows[0].device)
    for i, row in enumerate(rows):
        out[i, :row.numel()] = row
    return out


def _names(positions: Any) -> list[str]:
    return sorted(map(str, positions)) if isinstance(positions, Mapping) else []


def check(model: Any, rows: Sequence[Mapping[str, Any]], labels: Sequence[str]
          ) -> tuple[list[Any], list[tuple[int, str]]]:
    """Rows {"clean", "corrupt", "answer", "wrong", optional "positions"} tokenized, and every problem as
    (row index, text starting with the row's label: "example 3", "file.jsonl:4")."""
    examples, problems = [], []
    for i, (row, label) in enumerate(zip(rows, labels)):
        example, found = _example(model, label, row["clean"], row["corrupt"], row["answer"], row["wrong"],
                                  row.get("positions"))
        examples.append(example)
        problems += [(i, p) for p in found]
    first = rows[0].get("positions") if rows else None
    for i, row in enumerate(rows[1:], start=1):
        given = row.get("positions")
        mismatch = (given is None) != (first is None) or (
            isinstance(given, Mapping) and isinstance(first, Mapping) and set(given) != set(first))
        if mismatch:
            problems.append((i, f"{labels[i]}: names positions {_names(given)} but {labels[0]} names "
                                f"{_names(first)}; every example must name the same positions"))
    return examples, sorted(problems, key=lambda item: item[0])


def assemble(model: Any, examples: Sequence[Any], name: str, metric: Metric | str) -> Task:
    """The task of checked examples (`check`), right-padded to the longest."""
    lengths = torch.tensor([e.clean.numel() for e in examples])
    width, pad = int(lengths.max()), _pad_id(model)
    positions = {k: torch.tensor([e.positions[k] for e in examples]) for k in examples[0].positions}
    return Task(clean=_stack([e.clean for e in examples], width, pad),
                corrupt=_stack([e.corrupt for e in examples], width, pad),
                answer=torch.tensor([e.answer for e in examples]), wrong=torch.tensor([e.wrong for e in examples]),
                name=name, metric=metric_by_name(metric) if isinstance(metric, str) else metric,
                str_tokens=tuple(str_tokens(model, examples[0].clean)),
                lengths=lengths, named_positions=positions)


def from_prompts(model: Any, clean: Sequence[str], corrupt: Sequence[str], answer: Sequence[str],
                 wrong: Sequence[str], name: str = "task", metric: Metric | str = "logit_diff",
                 positions: Sequence[Mapping[str, int]] | None = None) -> Task:
    """Tokenize prompts with the model's tokenizer (BOS as the model adds it), check every example (one
    TaskError lists each bad one) and right-pad prompts of different lengths. `positions` names token
    indices per example (negative: from the end), e.g. `{"S2": 10, "END": -1}`; every example names the same."""
    counts = {len(clean), len(corrupt), len(answer), len(wrong), *([] if positions is None else [len(positions)])}
    if len(counts) != 1 or not clean:
        given = "" if positions is None else f" and positions ({len(positions)})"
        raise TaskError(f"task {name!r}: need the same non-zero number of clean ({len(clean)}), corrupt "
                        f"({len(corrupt)}), answer ({len(answer)}) and wrong ({len(wrong)}) entries{given}")
    rows = [{"clean": c, "corrupt": k, "answer": a, "wrong": w, "positions": positions and positions[i]}
            for i, (c, k, a, w) in enumerate(zip(clean, corrupt, answer, wrong))]
    examples, problems = check(model, rows, [f"example {i}" for i in range(len(rows))])
    if problems:
        raise problems_error(f"task {name!r}", [p for _, p in problems])
    return assemble(model, examples, name, metric)
