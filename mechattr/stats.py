"""Statistics used across mechattr: summaries over trials or seeds, intervals, multiple comparisons, KL.

- `summarize`: mean, sample standard deviation and a Student-t interval of the mean.
- `mean_sd`: mean and sample standard deviation, 0 for a single value (a table cell of one seed).
- `clopper_pearson`: the exact binomial interval of a proportion.
- `wilson`: the Wilson score interval of a proportion (Newcombe 1998, method 3).
- `bootstrap_accuracy`, `bootstrap_paired`: percentile intervals of an accuracy and of a paired
  difference of accuracies, resampling examples and seeds together (two-level bootstrap).
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

__all__ = ["Summary", "summarize", "mean_sd", "clopper_pearson", "wilson", "Interval", "bootstrap_accuracy",
           "bootstrap_paired", "benjamini_hochberg", "kl_divergence"]


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


def wilson(hits: int, trials: int, level: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion hits / trials (inside [0, 1] by construction);
    (0, 1) for no trials."""
    if not 0 <= hits <= trials:
        raise ValueError(f"need 0 <= hits <= trials, got hits={hits}, trials={trials}")
    if trials == 0:
        return 0.0, 1.0
    z = float(stats.norm.ppf((1 + level) / 2))
    p = hits / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / (1 + z * z / trials)
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class Interval:
    """An estimate and its percentile-bootstrap interval."""

    estimate: float
    low: float
    high: float
    level: float = 0.95

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def __str__(self) -> str:
        return f"{self.estimate:+.3f} [{self.low:+.3f}, {self.high:+.3f}]"


def _two_level(values: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """Bootstrap means of `values` [..., seeds, examples]: each replicate redraws the seeds and, shared by
    every seed, the examples (an example is one item seen by every seed)."""
    rng = np.random.default_rng(seed)
    *lead, n_seeds, n_examples = values.shape
    table = values.reshape(-1, n_seeds, n_examples).mean(0)  # the mean is linear: average the leading axes once
    seeds, examples = np.empty((n_boot, n_seeds)), np.empty((n_boot, n_examples))
    for b in range(n_boot):  # the draws in the order of a replicate-by-replicate loop (seeded results unchanged)
        seeds[b] = np.bincount(rng.integers(0, n_seeds, n_seeds), minlength=n_seeds)
        examples[b] = np.bincount(rng.integers(0, n_examples, n_examples), minlength=n_examples)
    # A replicate's mean weighs each (seed, example) cell by how often both were drawn.
    return np.einsum("bs,se,be->b", seeds, table, examples) / (n_seeds * n_examples)


def bootstrap_accuracy(correct: Bool[Tensor, "seeds examples"] | np.ndarray, level: float = 0.95,
                       n_boot: int = 2000, seed: int = 0) -> Interval:
    """Mean accuracy over seeds and examples with a two-level percentile-bootstrap interval (in [0, 1]:
    every replicate is an accuracy)."""
    x = np.asarray(correct, dtype=float)
    if x.ndim != 2 or 0 in x.shape:
        raise ValueError(f"need correctness of shape [seeds, examples], got {x.shape}")
    boots = _two_level(x, n_boot, seed)
    alpha = (1 - level) / 2
    return Interval(float(x.mean()), float(np.quantile(boots, alpha)), float(np.quantile(boots, 1 - alpha)), level)


def bootstrap_paired(a: Bool[Tensor, "seeds examples"] | np.ndarray,
                     b: Bool[Tensor, "seeds draws examples"] | np.ndarray, level: float = 0.95,
                     n_boot: int = 2000, seed: int = 0) -> Interval:
    """Accuracy of `a` minus accuracy of `b`, paired by seed and example (`b` may hold several draws per
    seed, averaged), with a two-level percentile-bootstrap interval over seeds and examples."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if b.ndim == 2:
        b = b[:, None]
    if a.ndim != 2 or b.ndim != 3 or a.shape[0] != b.shape[0] or a.shape[1] != b.shape[2]:
        raise ValueError(f"need a [seeds, examples] and b [seeds, draws, examples] with the same seeds and "
                         f"examples, got {a.shape} and {b.shape}")
    diff = a - b.mean(1)  # [seeds, examples]
    boots = _two_level(diff, n_boot, seed)
    alpha = (1 - level) / 2
    return Interval(float(diff.mean()), float(np.quantile(boots, alpha)), float(np.quantile(boots, 1 - alpha)), level)


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
