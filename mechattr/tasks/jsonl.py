"""Tasks from JSONL files: one `{"clean": str, "corrupt": str, "answer": str, "wrong": str}` object per line."""

import json
from pathlib import Path
from typing import Any

from mechattr.tasks.metrics import Metric
from mechattr.tasks.task import Task, TaskError
from mechattr.tasks.tokens import from_prompts

__all__ = ["from_jsonl", "KEYS"]

KEYS = ("clean", "corrupt", "answer", "wrong")  # the string fields of every line


def _row(path: Path, line_no: int, line: str) -> dict[str, str]:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as error:
        raise TaskError(f"{path}:{line_no}: not valid JSON ({error.msg})") from None
    except (RecursionError, ValueError) as error:  # nesting or integer size past Python's limits
        raise TaskError(f"{path}:{line_no}: not usable JSON ({error.__class__.__name__})") from None
    if not isinstance(row, dict) or any(not isinstance(row.get(k), str) for k in KEYS):
        raise TaskError(f"{path}:{line_no}: each line must be an object with string fields "
                        f"{', '.join(KEYS)}; got {line.strip()[:120]}")
    try:
        for k in KEYS:
            row[k].encode("utf-8")
    except UnicodeEncodeError:
        raise TaskError(f"{path}:{line_no}: a string holds an unpaired surrogate escape") from None
    return row


def from_jsonl(model: Any, path: str | Path, name: str | None = None, metric: Metric | str = "logit_diff") -> Task:
    """A task from a JSONL file, one `{"clean", "corrupt", "answer", "wrong"}` object per line."""
    path = Path(path)
    if not path.is_file():
        raise TaskError(f"task file {str(path)!r} does not exist")
    columns: dict[str, list[str]] = {k: [] for k in KEYS}
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise TaskError(f"task file {path} is not UTF-8 text ({error.reason} at byte {error.start})") from None
    # Split on "\n" only: str.splitlines would also break at U+2028 etc. inside JSON strings.
    for line_no, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        row = _row(path, line_no, line)
        for k in KEYS:
            columns[k].append(row[k])
    if not columns["clean"]:
        raise TaskError(f"task file {path} holds no examples")
    return from_prompts(model, name=name or path.stem, metric=metric, **columns)
