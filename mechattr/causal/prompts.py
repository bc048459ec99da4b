"""Prompt text for the causal-discovery settings, and the row budget that fits it into a token budget.

A context lists the variables and, unless the setting omits data, a CSV table of observations:

    The following variables are measured: smoking, lung cancer, ...
    Here are 12 observations of them, one row per sample (CSV):
    smoking,lung cancer,...
    yes,no,...

A scored model is then asked one `question` per ordered pair; a text model gets the `INSTRUCTION`.
"""

from typing import Callable

import pandas as pd

from mechattr.causal.settings import Condition

__all__ = ["describe", "csv_rows", "context", "question", "INSTRUCTION", "fit_rows", "largest", "RowBudgetError"]

INSTRUCTION = ("List the direct causal relations among these variables, one per line, "
               "written as: cause -> effect\nAnswer:\n")


class RowBudgetError(ValueError):
    """Not even a prompt without data rows fits the token budget; the message gives both counts."""


def csv_rows(data: pd.DataFrame, n_rows: int) -> list[str]:
    """The first `n_rows` rows of `data` as CSV lines (no header, no line breaks)."""
    # Values are written as they are; CSV quoting only matters for names, which may not contain commas.
    return [",".join(str(x) for x in row) for row in data.iloc[:n_rows].itertuples(index=False)]


def describe(names: list[str], data: pd.DataFrame | list[str] | None, n_rows: int) -> str:
    """The variables `names` and, unless `data` is None, its first `n_rows` rows as CSV under a header
    of its columns. `data` may also be those rows already written by `csv_rows` (the header is then
    `names`): prompts that differ only in their names write the rows once."""
    text = f"The following variables are measured: {', '.join(names)}.\n"
    if data is None:
        return text
    header, rows = (names, data) if isinstance(data, list) else (list(data.columns), csv_rows(data, n_rows))
    rows = rows[:n_rows]
    return (text + f"Here are {len(rows)} observations of them, one row per sample (CSV):\n"
            + "\n".join([",".join(header), *rows]) + "\n")


def context(condition: Condition, n_rows: int) -> str:
    """The setting's context with the first `n_rows` data rows (ignored when the setting omits data)."""
    return describe(condition.shown, condition.data, n_rows)


def question(cause: str, effect: str) -> tuple[str, str]:
    """The Yes/No question whose next-token log-odds score the ordered pair (cause, effect), as a stem
    shared by all questions about `cause` and an ending; the prompt is their concatenation."""
    return f"Question: Does {cause} cause", f" {effect}? Answer:"


def fit_rows(conditions: list[Condition], count_tokens: Callable[[str], int], budget: int,
             suffix: Callable[[Condition], str]) -> int:
    """The most data rows such that every condition's context plus `suffix(condition)` (its longest
    question, or the instruction) takes at most `budget` tokens; shared by all conditions of a trial so
    that settings differ only in what their do-operator changes."""
    def fits(condition: Condition, n: int) -> bool:
        return count_tokens(context(condition, n) + suffix(condition)) <= budget

    for c in conditions:
        if not fits(c, 0):
            need = count_tokens(context(c, 0) + suffix(c))
            raise RowBudgetError(f"setting {c.key}: the prompt without data takes {need} tokens but the "
                                 f"budget is {budget}; raise max_tokens")
    with_data = [c for c in conditions if c.data is not None]
    if not with_data:
        return 0
    return largest(min(len(c.data) for c in with_data), lambda n: all(fits(c, n) for c in with_data))


def largest(n_max: int, fits: Callable[[int], bool]) -> int:
    """The largest n in [0, n_max] with fits(n), for `fits` true up to some n and false after (fits(0)
    is assumed); a binary search, so long prompts are tokenized about log2(n_max) times."""
    low, high = 0, n_max
    while low < high:
        mid = (low + high + 1) // 2
        if fits(mid):
            low = mid
        else:
            high = mid - 1
    return low
