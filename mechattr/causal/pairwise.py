"""Pairwise causal discovery against knowledge: the data say B -> A where the names say A -> B.

Each trial picks a true edge A -> B and overwrites A := c * B + chi-square(df) noise (B as numbers:
categorical states coded 0, 1, ...). The linear non-Gaussian model then has B -> A, against what the
names suggest. Three methods name the direction:

- ICA-LiNGAM (the `lingam` package) on all rows;
- the model, told the LiNGAM procedure in the prompt;
- the model, asked directly.

A scored model picks the direction whose "Does X cause Y?" gets the higher Yes/No log-odds; a text model's
answer is parsed by `parse_edges` and is right only if it claims B -> A and not A -> B.
"""

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import pandas as pd

from mechattr.causal.problems import Problem
from mechattr.causal.prompts import describe, largest, question
from mechattr.causal.scoring import parse_edges, score_questions
from mechattr.causal.table import TEXT_MAX_TOKENS, chars_per_token, is_scored
from mechattr.moved import moved_names
from mechattr.stats import Summary, summarize

__all__ = ["PairwiseResult", "pairwise_discovery", "overwrite_cause", "lingam_direction", "PAIRWISE_METHODS"]

PAIRWISE_METHODS = ("ICA-LiNGAM", "model told LiNGAM", "model asked directly")
__getattr__ = moved_names(__name__, {"METHODS": f"{__name__}.PAIRWISE_METHODS"})

_PROCEDURE = ("To decide the direction, follow the LiNGAM procedure: regress {y} on {x} and check whether the "
              "residuals are independent of {x}; then regress {x} on {y} and check whether those residuals "
              "are independent of {y}. The variable whose regression leaves residuals independent of it is "
              "the cause.\n")
_TEXT_QUESTION = "Which of the two variables causes the other? Answer with one line: cause -> effect\nAnswer:\n"


def overwrite_cause(data: pd.DataFrame, a: str, b: str, coefficient: float | int, df: float | int,
                    rng: np.random.Generator) -> pd.DataFrame:
    """Columns [b, a] with a replaced by coefficient * b + chi-square(df) noise, so the data say b -> a."""
    x = data[b].to_numpy(dtype=float)
    return pd.DataFrame({b: x, a: coefficient * x + rng.chisquare(df, size=len(x))})


def lingam_direction(frame: pd.DataFrame, seed: int = 0) -> tuple[str, str]:
    """(cause, effect) of a two-column frame by ICA-LiNGAM's causal order."""
    import lingam  # imports scikit-learn: seconds, so only when used

    order = lingam.ICALiNGAM(random_state=seed).fit(frame.to_numpy()).causal_order_
    return frame.columns[order[0]], frame.columns[order[1]]


@dataclass(frozen=True, eq=False)
class PairwiseResult:
    """One row per trial: the edge overwritten and whether each method found the data's direction."""

    trials: pd.DataFrame  # columns: trial, cause (data), effect (data), and one bool column per PAIRWISE_METHODS
    meta: dict[str, Any] = field(default_factory=dict)

    def accuracy(self, method: str) -> Summary:
        if method not in PAIRWISE_METHODS:
            raise KeyError(f"unknown method {method!r}; valid: {list(PAIRWISE_METHODS)}")
        return summarize(self.trials[method].astype(float))

    def to_dataframe(self) -> pd.DataFrame:
        return pd.DataFrame([{"method": m, **vars(self.accuracy(m))} for m in PAIRWISE_METHODS])

    def to_markdown(self) -> str:
        lines = [f"Pairwise discovery on {self.meta.get('problem')} (c = {self.meta.get('coefficient')}, "
                 f"df = {self.meta.get('df')}, {len(self.trials)} trials)", "",
                 "| method | accuracy | sd | 95% CI |", "|---|---|---|---|"]
        for m in PAIRWISE_METHODS:
            x = self.accuracy(m)
            lines.append(f"| {m} | {x.mean:.3f} | {x.sd:.3f} | [{x.ci_low:.3f}, {x.ci_high:.3f}] |")
        return "\n".join(lines) + "\n"


def _model_right(model: Any, shown: pd.DataFrame, names: tuple[str, str], hint: str, budget: int,
                 count: Callable[[str], int], batch_size: int) -> bool:
    """Whether the model says names[0] -> names[1] (the data's direction) for the frame `shown`."""
    cause, effect = names
    scored = is_scored(model)
    asked = [question(cause, effect), question(effect, cause)]
    longest = max(("".join(q) for q in asked), key=len) if scored else _TEXT_QUESTION
    n = largest(len(shown), lambda k: count(describe(list(shown.columns), shown, k) + hint + longest) <= budget)
    prompt = describe(list(shown.columns), shown, n) + hint
    if scored:
        forward, backward = score_questions(model, prompt, asked, batch_size).tolist()
        return forward > backward
    claims = parse_edges(model(prompt + _TEXT_QUESTION), {c: c for c in shown.columns})
    return (cause, effect) in claims and (effect, cause) not in claims


def pairwise_discovery(model_or_predict: Any, problem: Problem, coefficient: float | int = 1.0,
                       df: float | int = 3.0, trials: int = 10, seed: int = 0, max_tokens: int | None = 512,
                       count_tokens: Callable[[str], int] | None = None, batch_size: int = 16) -> PairwiseResult:
    """`trials` overwritten edges of `problem`; each method's accuracy at finding the data's direction.

    Prompts show the two variables under their readable names in a random column order, with as many
    rows (two decimals) as fit `max_tokens` (None: the model's context, or 4096 for a text model).
    """
    scored = is_scored(model_or_predict)
    budget = max_tokens or (model_or_predict.cfg.n_ctx if scored else TEXT_MAX_TOKENS)
    count = (lambda t: model_or_predict.to_tokens(t).shape[1]) if scored else (count_tokens or chars_per_token)
    numeric, edges, start, rows = problem.numeric(), list(problem.edges), time.perf_counter(), []
    for trial in range(trials):
        rng = np.random.default_rng((seed, trial))
        a, b = edges[rng.integers(len(edges))]
        frame = overwrite_cause(numeric.iloc[rng.permutation(len(numeric))], a, b, coefficient, df, rng)
        found = lingam_direction(frame, seed) == (b, a)
        named = frame.rename(columns=problem.names).round(2)
        shown = named[list(rng.permutation(named.columns))]
        direction = (problem.names[b], problem.names[a])
        x, y = shown.columns
        told = _model_right(model_or_predict, shown, direction, _PROCEDURE.format(x=x, y=y), budget, count,
                            batch_size)
        direct = _model_right(model_or_predict, shown, direction, "", budget, count, batch_size)
        rows.append({"trial": trial, "cause": b, "effect": a, PAIRWISE_METHODS[0]: found, PAIRWISE_METHODS[1]: told,
                     PAIRWISE_METHODS[2]: direct})
    meta = {"problem": problem.name, "coefficient": coefficient, "df": df, "seed": seed, "max_tokens": budget,
            "seconds": time.perf_counter() - start}
    return PairwiseResult(pd.DataFrame(rows), meta)
