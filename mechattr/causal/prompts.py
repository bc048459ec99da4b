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

__all__ = ["describe", "context", "question", "INSTRUCTION", "fit_rows", "largest", "RowBudgetError"]

INSTRUCTION = ("List the direct causal relations among these variables, one per line, "
               "written as: cause -> effect\nAnswer:\n")


class RowBudgetError(ValueError):
    """Not even a prompt without data rows fits the token budget; the message gives both counts."""


def _table(data: pd.DataFrame, n_rows: int) -> str:
    # Values are written as they are; CSV quoting only matters for names, which may not contain commas.
    header = ",".join(data.columns)
    rows = [",".join(str(x) for x in row) for row in data.iloc[:n_rows].itertuples(index=False)]
    return "\n".join([header, *rows]) + "\n"


def describe(names: list[str], data: pd.DataFrame | None, n_rows: int) -> str:
    """The variables `names` and, unless `data` is None, its first `n_rows` rows as CSV."""
    text = f"The following variables are measured: {', '.join(names)}.\n"
    if data is None:
        return text
    n_rows = min(n_rows, len(data))
    return text + f"Here are {n_rows} observations of them, one row per sample (CSV):\n" + _table(data, n_rows)


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
