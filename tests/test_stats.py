"""mechattr.stats against textbook references: scipy's own routines and hand-computed values."""

import math
import statistics

import numpy as np
import pytest
import torch
from scipy import stats as scipy_stats

from mechattr import stats
from mechattr.stats import benjamini_hochberg, clopper_pearson, kl_divergence, mean_sd, summarize


def test_summarize_matches_the_t_interval_by_hand():
    values = [2.0, 4.0, 4.0, 5.0, 7.0]
    s = summarize(values)
    mean, sd = 4.4, statistics.stdev(values)  # sd = sqrt(13.2 / 4)
    half = scipy_stats.t.ppf(0.975, df=4) * sd / math.sqrt(5)  # t_{0.975, 4} = 2.7764...
    assert s.n == 5 and s.mean == pytest.approx(mean) and s.sd == pytest.approx(math.sqrt(3.3))
    assert (s.ci_low, s.ci_high) == pytest.approx((mean - half, mean + half))
    low, high = scipy_stats.t.interval(0.9, 4, loc=mean, scale=sd / math.sqrt(5))
    assert (summarize(values, level=0.9).ci_low, summarize(values, level=0.9).ci_high) == pytest.approx((low, high))


def test_summarize_drops_missing_values_and_has_no_interval_for_one():
    assert summarize([1.0, float("nan"), None, 3.0]).mean == 2.0
    one = summarize([0.5])
    assert one.mean == 0.5 and one.n == 1 and math.isnan(one.sd) and math.isnan(one.ci_low)
    assert summarize([]).n == 0 and math.isnan(summarize([]).mean)


def test_mean_sd_is_the_sample_sd_and_zero_for_one_value():
    assert mean_sd([1.0, 2.0, 6.0]) == pytest.approx((3.0, statistics.stdev([1.0, 2.0, 6.0])))
    assert mean_sd([7, None]) == (7.0, 0.0)
    assert all(math.isnan(x) for x in mean_sd([None, float("nan")]))


@pytest.mark.parametrize("hits, trials", [(0, 10), (3, 10), (10, 10), (1, 40), (17, 25)])
def test_clopper_pearson_matches_scipys_exact_binomial_interval(hits, trials):
    want = scipy_stats.binomtest(hits, trials).proportion_ci(confidence_level=0.95, method="exact")
    assert clopper_pearson(hits, trials, 0.95) == pytest.approx((want.low, want.high), abs=1e-12)


def test_clopper_pearson_edge_cases_by_hand():
    # No hit in n trials: the upper limit solves (1 - p)^n = alpha / 2.
    assert clopper_pearson(0, 10, 0.95) == pytest.approx((0.0, 1 - 0.025 ** (1 / 10)))
    assert clopper_pearson(10, 10, 0.95) == pytest.approx((0.025 ** (1 / 10), 1.0))
    assert clopper_pearson(0, 0, 0.95) == (0.0, 1.0)
    with pytest.raises(ValueError, match="hits=5, trials=3"):
        clopper_pearson(5, 3, 0.95)


def test_benjamini_hochberg_matches_scipys_adjusted_p_values():
    p = torch.tensor([0.001, 0.008, 0.039, 0.041, 0.042, 0.06, 0.074, 0.205, 0.212, 0.216])
    for alpha in (0.01, 0.05, 0.1):
        want = scipy_stats.false_discovery_control(p.numpy(), method="bh") <= alpha
        assert benjamini_hochberg(p, alpha).tolist() == want.tolist()
    # By hand at 0.05: the lines k/10 * 0.05 are 0.005, 0.01, ...; only ranks 1 and 2 fall under theirs.
    assert benjamini_hochberg(p, 0.05).nonzero().flatten().tolist() == [0, 1]
    grid = p.reshape(2, 5)
    assert benjamini_hochberg(grid, 0.05).shape == (2, 5)


def test_kl_divergence_matches_scipy_entropy():
    p = torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]], dtype=torch.float64)
    q = torch.tensor([[0.4, 0.4, 0.2], [1 / 3, 1 / 3, 1 / 3]], dtype=torch.float64)
    want = [scipy_stats.entropy(p[i].numpy(), q[i].numpy()) for i in range(2)]  # KL(p || q) in nats
    np.testing.assert_allclose(kl_divergence(p.log(), q.log()).numpy(), want, rtol=1e-12)
    assert float(kl_divergence(p.log(), p.log()).abs().max()) == 0.0


@pytest.mark.parametrize("hits, trials, low, high", [  # Newcombe (1998), Stat. Med. 17:857, Table I, method 3
    (81, 263, 0.2553, 0.3662), (15, 148, 0.0624, 0.1605), (0, 20, 0.0, 0.1611), (1, 29, 0.0061, 0.1718)])
def test_wilson_matches_the_textbook_table(hits, trials, low, high):
    assert stats.wilson(hits, trials) == pytest.approx((low, high), abs=5e-5)


def test_wilson_refuses_impossible_counts():
    with pytest.raises(ValueError, match="hits=5, trials=4"):
        stats.wilson(5, 4)


def test_bootstrap_accuracy_stays_in_the_unit_interval_and_covers_the_mean():
    rng = np.random.default_rng(0)
    always = stats.bootstrap_accuracy(np.ones((5, 200)))
    assert (always.low, always.estimate, always.high) == (1.0, 1.0, 1.0)
    correct = rng.random((5, 200)) < 0.7
    interval = stats.bootstrap_accuracy(correct)
    assert 0 <= interval.low < correct.mean() < interval.high <= 1
    # Close to the binomial standard error when seeds agree (all rows equal: only examples vary).
    same = np.repeat(correct[:1], 5, axis=0)
    width = stats.bootstrap_accuracy(same).half_width
    assert width == pytest.approx(1.96 * np.sqrt(same.mean() * (1 - same.mean()) / 200), rel=0.15)


def test_bootstrap_paired_pairs_by_seed_and_example():
    rng = np.random.default_rng(1)
    b = rng.random((5, 3, 200)) < 0.6
    assert stats.bootstrap_paired(b[:, 0], b[:, :1]).estimate == 0.0
    diff = stats.bootstrap_paired(b[:, 0], b[:, :1])
    assert diff.low == diff.high == 0.0  # identical runs: no spread, whatever is resampled
    better = b[:, 0] | (rng.random((5, 200)) < 0.3)
    interval = stats.bootstrap_paired(better, b)
    assert interval.estimate == pytest.approx(better.mean() - b.mean())
    with pytest.raises(ValueError, match="same seeds and examples"):
        stats.bootstrap_paired(better, b[:4])
