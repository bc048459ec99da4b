"""The causal attribution table: every setting's scores over trials, and the four attribution scores.

With TDR(S) the true discovery rate in setting S (see `settings`), per trial:

- CAK = TDR(S1) - TDR(S3): conditional attribution of knowledge (data present, names removed)
- CAD = TDR(S1) - TDR(S2): conditional attribution of data (names present, data removed)
- MAK = TDR(S2) - TDR(S6): marginal attribution of knowledge (no data; real vs made-up names)
- MAD = TDR(S3) - TDR(S6): marginal attribution of data (made-up names; data vs none)

A trial redraws the column order, the data rows shown and the made-up names; scores are summarised as
mean, sample sd and a 95% t interval over trials.
"""

import itertools
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import pandas as pd
import torch

from mechattr.causal import metrics
from mechattr.causal.problems import Problem
from mechattr.causal.prompts import INSTRUCTION, context, fit_rows, question
from mechattr.causal.scoring import parse_edges, predicted_graph, score_questions
from mechattr.causal.settings import SETTINGS, Condition, conditions
from mechattr.stats import Summary, summarize

__all__ = ["ATTRIBUTIONS", "AttributionTable", "attribution_table", "is_scored", "chars_per_token"]

ATTRIBUTIONS = {"CAK": ("S1", "S3"), "CAD": ("S1", "S2"), "MAK": ("S2", "S6"), "MAD": ("S3", "S6")}
METRICS = ("TDR", "FDR", "F1", "SHD", "AUROC")
TEXT_MAX_TOKENS = 4096  # prompt budget for a text model when none is given


def is_scored(model_or_predict: Any) -> bool:
    """True for a model scored by Yes/No log-odds (it has `to_tokens`), False for `predict(prompt) -> str`."""
    return hasattr(model_or_predict, "to_tokens")


def chars_per_token(text: str) -> int:
    """A tokenizer-free token count for text models: one token per four characters."""
    return len(text) // 4 + 1


@dataclass(frozen=True, eq=False)
class AttributionTable:
    """Per-trial scores of every setting, and the attribution scores built from them."""

    problem: str
    trials: pd.DataFrame  # one row per (trial, setting): TDR, FDR, F1, SHD, n_pred, AUROC (NaN for text)
    pairs: pd.DataFrame | None  # scored models: one row per (trial, setting, cause, effect): score, true
    meta: dict[str, Any] = field(default_factory=dict)

    def summary(self, setting: str, metric: str = "TDR") -> Summary:
        if setting not in SETTINGS or metric not in METRICS:
            raise KeyError(f"setting {setting!r} / metric {metric!r}; valid: {list(SETTINGS)} / {list(METRICS)}")
        return summarize(self.trials.loc[self.trials.setting == setting, metric])

    def attribution(self, name: str, metric: str = "TDR") -> Summary:
        """An attribution score (CAK, CAD, MAK, MAD) as the paired per-trial difference of `metric`."""
        if name not in ATTRIBUTIONS:
            raise KeyError(f"unknown attribution {name!r}; valid: {list(ATTRIBUTIONS)}")
        first, second = ATTRIBUTIONS[name]
        wide = self.trials.pivot(index="trial", columns="setting", values=metric)
        return summarize(wide[first] - wide[second])

    def to_dataframe(self) -> pd.DataFrame:
        """Tidy summary: one row per (setting or attribution, metric) with mean, sd, ci_low, ci_high, n."""
        rows = [{"row": key, "label": s.label, "metric": m, **vars(self.summary(key, m))}
                for key, s in SETTINGS.items() for m in METRICS]
        rows += [{"row": name, "label": f"TDR({a}) - TDR({b})", "metric": "TDR", **vars(self.attribution(name))}
                 for name, (a, b) in ATTRIBUTIONS.items()]
        return pd.DataFrame(rows)

    def to_markdown(self) -> str:
        shown = METRICS if self.pairs is not None else METRICS[:-1]  # text models have no pair scores
        rows = self.meta.get("rows_per_trial", [])
        lines = [f"Causal attribution on {self.problem} ({self.meta.get('trials')} trials, "
                 f"{min(rows, default=0)}-{max(rows, default=0)} data rows in prompts of at most "
                 f"{self.meta.get('max_tokens')} tokens; mean ± sd over trials)",
                 "", "| setting | " + " | ".join(shown) + " |", "|---" * (len(shown) + 1) + "|"]
        for key, s in SETTINGS.items():
            cells = [f"{x.mean:.3f} ± {x.sd:.3f}" for x in (self.summary(key, m) for m in shown)]
            lines.append(f"| {key} {s.label} | " + " | ".join(cells) + " |")
        lines += ["", "| score | definition | mean | sd | 95% CI |", "|---|---|---|---|---|"]
        for name, (a, b) in ATTRIBUTIONS.items():
            x = self.attribution(name)
            lines.append(f"| {name} | TDR({a}) - TDR({b}) | {x.mean:.3f} | {x.sd:.3f} | "
                         f"[{x.ci_low:.3f}, {x.ci_high:.3f}] |")
        return "\n".join(lines) + "\n"


def _pairs(problem: Problem) -> list[tuple[str, str]]:
    return list(itertools.permutations(problem.variables, 2))


def _scored_trial(model: Any, problem: Problem, conds: dict[str, Condition], budget: int,
                  batch_size: int) -> tuple[int, dict[str, torch.Tensor]]:
    """Rows used and each prompted setting's pair scores (in `_pairs` order)."""
    pairs = _pairs(problem)
    count = lambda text: model.to_tokens(text).shape[1]  # noqa: E731
    # The two longest names make the longest question (to within a token).
    longest = {k: "".join(question(*sorted(c.shown, key=len)[-2:])) for k, c in conds.items()}
    prompted = [c for c in conds.values() if c.setting.prompt_of is None]
    n_rows = fit_rows(prompted, count, budget, suffix=lambda c: longest[c.key])
    scores = {c.key: score_questions(model, context(c, n_rows),
                                     [question(c.labels[a], c.labels[b]) for a, b in pairs], batch_size)
              for c in prompted}
    return n_rows, scores


def _text_trial(predict: Callable[[str], str], conds: dict[str, Condition], budget: int,
                count: Callable[[str], int]) -> tuple[int, dict[str, list[tuple[str, str]]]]:
    """Rows used and each prompted setting's parsed edges."""
    prompted = [c for c in conds.values() if c.setting.prompt_of is None]
    n_rows = fit_rows(prompted, count, budget, suffix=lambda c: INSTRUCTION)
    return n_rows, {c.key: parse_edges(predict(context(c, n_rows) + INSTRUCTION), c.labels) for c in prompted}


def _trial_rows(problem: Problem, trial: int, conds: dict[str, Condition], answers: dict,
                scored: bool, threshold: float | None) -> tuple[list[dict], list[dict]]:
    pairs = _pairs(problem)
    rows, pair_rows = [], []
    for key, c in conds.items():
        answer = answers[c.setting.prompt_of or key]
        truth = set(c.truth.edges)
        if scored:
            labels = torch.tensor([p in truth for p in pairs])
            k = None if threshold is not None else c.truth.number_of_edges()
            predicted = predicted_graph(pairs, answer, k=k, threshold=threshold)
            extra = {"AUROC": metrics.auroc(answer, labels)}
            pair_rows += [{"trial": trial, "setting": key, "cause": a, "effect": b, "score": float(s),
                           "true": (a, b) in truth} for (a, b), s in zip(pairs, answer)]
        else:
            predicted, extra = answer, {"AUROC": float("nan")}
        rows.append({"trial": trial, "setting": key, **metrics.graph_metrics(predicted, c.truth), **extra})
    return rows, pair_rows


def attribution_table(model_or_predict: Any, problem: Problem, trials: int = 3, seed: int = 0,
                      max_tokens: int | None = 512, threshold: float | None = None,
                      count_tokens: Callable[[str], int] | None = None, batch_size: int = 64) -> AttributionTable:
    """Run the six settings `trials` times and summarise them.

    `model_or_predict` is a TransformerBridge (each ordered pair scored by Yes/No log-odds; the predicted
    graph is the top-|E| pairs, or the pairs above `threshold`) or a `predict(prompt) -> str` callable
    (edges parsed from its answer). `max_tokens` bounds every prompt (None: the model's context length,
    or 4096 for a text model); data rows are cut to fit. `count_tokens` counts a text model's tokens
    (default: `chars_per_token`).
    """
    scored = is_scored(model_or_predict)
    budget = max_tokens or (model_or_predict.cfg.n_ctx if scored else TEXT_MAX_TOKENS)
    start = time.perf_counter()
    rows, pair_rows, used = [], [], []
    for trial in range(trials):
        conds = conditions(problem, seed=(seed, trial))
        if scored:
            n_rows, answers = _scored_trial(model_or_predict, problem, conds, budget, batch_size)
        else:
            n_rows, answers = _text_trial(model_or_predict, conds, budget, count_tokens or chars_per_token)
        used.append(n_rows)
        r, p = _trial_rows(problem, trial, conds, answers, scored, threshold)
        rows += r
        pair_rows += p
    meta = {"trials": trials, "seed": seed, "max_tokens": budget, "rows": min(used),
            "rows_per_trial": used, "selection": "top-|E|" if threshold is None else f"score > {threshold}",
            "scored": scored, "seconds": time.perf_counter() - start}
    return AttributionTable(problem.name, pd.DataFrame(rows), pd.DataFrame(pair_rows) if scored else None, meta)
