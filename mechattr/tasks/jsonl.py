"""Tasks from JSONL files: one `{"clean": str, "corrupt": str, "answer": str, "wrong": str}` object per line,
optionally with `"positions": {name: token index}`. Prompts of different lines may differ in length (see
docs/tasks.md). Every bad line is reported at once (up to `tokens.MAX_PROBLEMS`), each with its line number."""

import json
from pathlib import Path
from typing import Any

from mechattr.tasks.metrics import Metric
from mechattr.tasks.task import Task, TaskError
from mechattr.tasks.tokens import assemble, check, problems_error

__all__ = ["from_jsonl", "KEYS", "OPTIONAL_KEYS"]

KEYS = ("clean", "corrupt", "answer", "wrong")  # the string fields of every line
OPTIONAL_KEYS = ("positions",)  # {name: token index, negative from the end}


def _row(where: str, line: str) -> tuple[dict[str, Any] | None, str | None]:
    """The line's object, or what is wrong with it (starting with `where`, "file:line")."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as error:
        return None, f"{where}: not valid JSON ({error.msg})"
    except (RecursionError, ValueError) as error:  # nesting or integer size past Python's limits
        return None, f"{where}: not usable JSON ({error.__class__.__name__})"
    if not isinstance(row, dict) or any(not isinstance(row.get(k), str) for k in KEYS):
        missing = [k for k in KEYS if not isinstance(row, dict) or k not in row]
        wrong_type = [k for k in KEYS if isinstance(row, dict) and k in row and not isinstance(row[k], str)]
        detail = "".join([f"; missing: {', '.join(missing)}" if missing else "",
                          f"; not strings: {', '.join(wrong_type)}" if wrong_type else ""])
        return None, (f"{where}: each line must be an object with string fields {', '.join(KEYS)} (optional: "
                      f"{', '.join(OPTIONAL_KEYS)}){detail}; got {line.strip()[:120]}")
    try:
        for k in KEYS:
            row[k].encode("utf-8")
    except UnicodeEncodeError:
        return None, f"{where}: a string holds an unpaired surrogate escape"
    return row, None


def from_jsonl(model: Any, path: str | Path, name: str | None = None, metric: Metric | str = "logit_diff") -> Task:
    """A task from a JSONL file, one `{"clean", "corrupt", "answer", "wrong"[, "positions"]}` object per line.
    A file with problems raises one TaskError naming every bad line (up to MAX_PROBLEMS)."""
    path = Path(path)
    if not path.is_file():
        raise TaskError(f"task file {str(path)!r} does not exist")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise TaskError(f"task file {path} is not UTF-8 text ({error.reason} at byte {error.start})") from None
    rows, line_nos, problems = [], [], []
    # Split on "\n" only: str.splitlines would also break at U+2028 etc. inside JSON strings.
    for line_no, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        row, problem = _row(f"{path}:{line_no}", line)
        if problem is not None:
            problems.append((line_no, problem))
        else:
            rows.append(row)
            line_nos.append(line_no)
    if not rows and not problems:
        raise TaskError(f"task file {path} holds no examples")
    # The lines that parsed are checked too, so one round of fixes covers the whole file.
    examples, found = check(model, rows, [f"{path}:{n}" for n in line_nos])
    problems += [(line_nos[i], p) for i, p in found]
    if problems:
        raise problems_error(f"task file {path}", [p for _, p in sorted(problems, key=lambda item: item[0])])
    return assemble(model, examples, name or path.stem, metric)
