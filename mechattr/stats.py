"""Statistics used across mechattr: summaries over trials or seeds, intervals, multiple comparisons, KL.

- `summarize`: mean, sample standard deviation and a Student-t interval of the mean.
- `mean_sd`: mean and sample standard deviation, 0 for a single value (a table cell of one seed).
- `clopper_pearson`: the exact binomial interval of a proportion.
- `benjamini_hochberg`: which hypotheses to reject at a false discovery rate.
- `kl_divergence`: KL(p || q) from log-probabilities, per row.
"""

import math
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import torch
from jaxtyping import Bool, Float
from scipy import stats
from torch import Tensor

__all__ = ["Summary", "summarize", "mean_sd", "clopper_pearson", "benjamini_hochberg", "kl_divergence"]


@dataclass(frozen=True)
class Summary:
    """Mean, sample standard deviation and a t-based confidence interval of values over trials."""

    mean: float
    sd: float  # with n - 1 in the denominator; NaN for one value
    ci_low: float  # NaN for fewer than two values
    ci_high: float
    n: int
    level: float = 0.95

    def __str__(self) -> str:
        return f"{self.mean:.3f} ± {self.sd:.3f} [{self.ci_low:.3f}, {self.ci_high:.3f}]"


def _finite(values: Iterable[float | int | None]) -> np.ndarray:
    """The values that are neither None nor NaN, as float64."""
    return np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=float)


def summarize(values: Iterable[float | int | None], level: float = 0.95) -> Summary:
    """mean ± t_{(1+level)/2, n-1} sd / sqrt(n) over the values that are not None or NaN."""
    x = _finite(values)
    n = len(x)
    if n == 0:
        return Summary(float("nan"), float("nan"), float("nan"), float("nan"), 0, level)
    mean = float(x.mean())
    if n == 1:
        return Summary(mean, float("nan"), float("nan"), float("nan"), 1, level)
    sd = float(x.std(ddof=1))
    half = float(stats.t.ppf((1 + level) / 2, n - 1)) * sd / np.sqrt(n)
    return Summary(mean, sd, mean - half, mean + half, n, level)


def mean_sd(values: Iterable[float | int | None]) -> tuple[float, float]:
    """(mean, sample sd) over the values that are not None or NaN; sd is 0 for one value (no spread
    seen) and both are NaN for none."""
    s = summarize(values)
    return s.mean, 0.0 if s.n == 1 else s.sd


def clopper_pearson(hits: int, trials: int, level: float = 0.95) -> tuple[float, float]:
    """The exact (Clopper-Pearson) interval of a binomial proportion hits / trials; (0, 1) for no trials."""
    if not 0 <= hits <= trials:
        raise ValueError(f"need 0 <= hits <= trials, got hits={hits}, trials={trials}")
    if trials == 0:
        return 0.0, 1.0
    alpha = 1 - level
    low = 0.0 if hits == 0 else float(stats.beta.ppf(alpha / 2, hits, trials - hits + 1))
    high = 1.0 if hits == trials else float(stats.beta.ppf(1 - alpha / 2, hits + 1, trials - hits))
    return low, high


def benjamini_hochberg(pvalues: Float[Tensor, "*cells"], alpha: float = 0.05) -> Bool[Tensor, "*cells"]:
    """Which hypotheses to reject at false discovery rate `alpha` (Benjamini & Hochberg 1995)."""
    p = pvalues.flatten().double()
    m = p.numel()
    order = p.argsort()
    passed = p[order] <= alpha * torch.arange(1, m + 1, dtype=torch.float64) / m
    reject = torch.zeros(m, dtype=torch.bool)
    if passed.any():
        k = int(passed.nonzero().max())  # largest rank whose p-value is under its line
        reject[order[: k + 1]] = True
    return reject.reshape(pvalues.shape)


def kl_divergence(log_p: Float[Tensor, "*rows vocab"], log_q: Float[Tensor, "*rows vocab"]) -> Float[Tensor, "*rows"]:
    """KL(p || q) = sum p (log p - log q) over the last axis, in nats, from log-probabilities."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)
