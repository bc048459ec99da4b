"""Verification: exact patching of an estimate's top sites and a sample of the rest."""

import pytest
from scipy import stats

import mechattr
from mechattr.attribution import attribute
from mechattr.sites import grid
from mechattr.verification import Verification, verify


def test_verify_counts_what_the_estimate_missed(gqa, tiny_task):
    sites = grid(gqa, "z", tiny_task.n_pos, per_position=True)  # 3 x 7 x 4 = 84 sites
    estimate = attribute(gqa, tiny_task, sites, "atp")
    checked = verify(gqa, tiny_task, estimate, top=10, sample=74, threshold=0.05)  # the whole rest
    assert isinstance(checked, Verification) and checked.n_top == 10 and checked.n_rest == 74
    order = estimate.effect.flatten().abs().argsort(descending=True)
    assert list(checked.checked[:10]) == [estimate.sites[int(i)] for i in order[:10]]
    exact = mechattr.patch(gqa, tiny_task, sites)
    important = exact.effect.flatten().abs() > 0.05 * abs(exact.clean_metric - exact.corrupt_metric)
    assert checked.important_top == int(important[order[:10]].sum())
    assert checked.missed == int(important[order[10:]].sum()) == checked.missed_ci[0] == checked.missed_ci[1]
    rho = stats.spearmanr(checked.estimated_effect, checked.exact.effect)[0]
    assert checked.spearman == pytest.approx(rho) and rho > 0.5


def test_verify_extrapolates_from_a_sample(gqa, tiny_task):
    estimate = attribute(gqa, tiny_task, grid(gqa, "z", tiny_task.n_pos, per_position=True), "atp")
    checked = verify(gqa, tiny_task, estimate, top=5, sample=20, seed=1, threshold=0.05)
    assert len(checked.checked) == 25 and len(set(checked.checked)) == 25
    low, high = checked.missed_ci
    assert low <= checked.missed <= high <= checked.n_rest
    assert checked.missed == pytest.approx(checked.important_sample / 20 * 79)
