"""Verification: exact patching of an estimate's top sites and a stratified sample of the rest."""

import dataclasses
import math

import numpy as np
import pytest
import torch
from scipy import stats

import mechattr
from mechattr.attribution import attribute
from mechattr.effects import load_effects, save_effects
from mechattr.graph import nodes
from mechattr.interventions import Resample, Steer
from mechattr.sites import Site, grid
from mechattr.verification import Stratum, Verification, count_interval, stratified_count, verify


@pytest.fixture(scope="module")
def z_sites(gqa, tiny_task):
    return grid(gqa, "z", tiny_task.n_pos, per_position=True)  # 3 x 7 x 4 = 84 sites


@pytest.fixture(scope="module")
def exact_grid(gqa, tiny_task, z_sites):
    return mechattr.patch(gqa, tiny_task, z_sites, progress=False)


def important_mask(exact, threshold):
    return exact.effect.flatten().abs() > threshold * abs(exact.clean_metric - exact.corrupt_metric)


def test_verify_counts_what_the_estimate_missed(gqa, tiny_task, z_sites, exact_grid):
    estimate = attribute(gqa, tiny_task, z_sites, "atp")
    checked = verify(gqa, tiny_task, estimate, top=10, sample=74, threshold=0.05)  # the whole rest
    assert isinstance(checked, Verification) and checked.n_top == 10 and checked.n_rest == 74
    order = estimate.effect.flatten().abs().argsort(descending=True, stable=True)
    assert list(checked.checked[:10]) == [estimate.sites[int(i)] for i in order[:10]]
    important = important_mask(exact_grid, 0.05)
    assert checked.important_top == int(important[order[:10]].sum())
    assert checked.missed == int(important[order[10:]].sum()) == checked.missed_ci[0] == checked.missed_ci[1]
    rho = stats.spearmanr(checked.estimated_effect, checked.exact.effect)[0]
    assert checked.spearman == pytest.approx(rho) and rho > 0.5


def test_stratified_sample_weights_each_stratum_by_its_size(gqa, tiny_task, z_sites, exact_grid):
    estimate = attribute(gqa, tiny_task, z_sites, "atp")
    checked = verify(gqa, tiny_task, estimate, top=5, sample=20, seed=1, threshold=0.05)
    assert len(checked.checked) == 25 and len(set(checked.checked)) == 25
    # 79 sites below the top in strata of geometrically growing size, 20 draws shared equally.
    assert [(s.start, s.stop) for s in checked.strata] == [(0, 3), (3, 9), (9, 26), (26, 79)]
    assert [s.checked for s in checked.strata] == [3, 6, 6, 5]
    # Recount from the full exact grid, independently of the patched sample.
    order = estimate.effect.flatten().abs().argsort(descending=True, stable=True)
    important = important_mask(exact_grid, 0.05)[order]  # by estimated rank
    assert [estimate.sites[int(order[r])] for r in checked.ranks] == list(checked.checked)
    expected, truth = 0.0, 0
    for s in checked.strata:
        drawn = [r for r in checked.ranks[5:] if s.start <= r - 5 < s.stop]
        assert len(drawn) == s.checked and s.important == int(important[drawn].sum())
        expected += s.size * s.important / s.checked
        truth += int(important[5 + s.start: 5 + s.stop].sum())
    assert checked.missed == pytest.approx(expected)
    low, high = checked.missed_ci
    assert low <= truth <= high <= 79
    np.testing.assert_allclose(checked.exact.effect, exact_grid.effect.flatten()[order[list(checked.ranks)]],
                               atol=1e-5)


def test_a_badly_underestimated_site_is_named_and_counted(gqa, tiny_task, z_sites, exact_grid):
    # An "estimate" equal to exact patching, except that the strongest site is put just below the top 5
    # (rank 5 counting from 0: the first stratum of the rest, which is checked completely).
    effect = exact_grid.effect.flatten()
    order = effect.abs().argsort(descending=True, stable=True)
    strongest, between = int(order[0]), float(effect[order[5:7]].abs().mean())  # between the 6th and 7th
    values = exact_grid.values.flatten().clone()
    values[strongest] = exact_grid.base.mean() + between * torch.sign(effect[strongest])
    per_example = exact_grid.per_example.reshape(len(values), -1).clone()
    per_example[strongest] = values[strongest]
    estimate = dataclasses.replace(exact_grid, values=values.reshape(exact_grid.values.shape),
                                   per_example=per_example.reshape(exact_grid.per_example.shape), method="atp*")
    checked = verify(gqa, tiny_task, estimate, top=5, sample=20, threshold=0.05)
    site = exact_grid.sites[strongest]
    assert site not in checked.checked[:5] and checked.ranks[checked.checked.index(site)] == 5
    worst = checked.disagreements(3)[0]
    assert worst[0] == site and worst[1] == pytest.approx(between, rel=1e-4)
    assert worst[2] == pytest.approx(float(effect[strongest]), rel=1e-4)
    assert site in [m[0] for m in checked.misses()] and checked.missed_ci[0] >= 1
    text = checked.summary()
    assert text.startswith("missed important sites: ") and f"of the {checked.n_rest} ranked below the top 5" in text
    assert f"{site} exact {float(effect[strongest]):.3g}, estimate {between:.3g} (rank 6)" in text


def test_without_a_sample_the_rest_is_unknown(gqa, tiny_task, z_sites):
    estimate = attribute(gqa, tiny_task, z_sites, "atp")
    checked = verify(gqa, tiny_task, estimate, top=4, sample=0)
    assert math.isnan(checked.missed) and checked.missed_ci == (0.0, 80.0)
    assert "0 to 80 of the 80 ranked below the top 4" in checked.summary() and "estimate unknown" in checked.summary()


def test_an_edge_estimate_is_checked_by_exact_edge_patching(gqa, tiny_task):
    from mechattr.edges import attribute_edges, patch_edges
    from mechattr.graph import all_edges

    edges = all_edges(gqa)[::7]  # 24 edges of every receiver kind
    estimate = attribute_edges(gqa, tiny_task, edges)
    checked = verify(gqa, tiny_task, estimate, top=3, sample=6, threshold=0.05)
    assert len(checked.checked) == 9 and checked.exact.edges == checked.checked
    order = estimate.effect.abs().argsort(descending=True, stable=True)
    assert list(checked.checked[:3]) == [edges[int(i)] for i in order[:3]]
    exact = patch_edges(gqa, tiny_task, list(checked.checked))
    torch.testing.assert_close(checked.exact.per_example, exact.per_example)
    assert exact.effect.abs().max() > 1e-3
    worst = checked.disagreements(1)[0]
    assert f"largest |exact - atp|: {worst[0]} exact" in checked.summary()


def brute_interval(hits, checked, size, level):
    """The same interval from the hypergeometric probabilities written out with binomial coefficients."""
    def p(k, count):
        return math.comb(count, k) * math.comb(size - count, checked - k) / math.comb(size, checked)

    tail = (1 - level) / 2
    allowed = [m for m in range(hits, hits + size - checked + 1)
               if sum(p(k, m) for k in range(hits, checked + 1)) >= tail
               and sum(p(k, m) for k in range(hits + 1)) >= tail]
    return min(allowed), max(allowed)


@pytest.mark.parametrize("hits,checked,size", [(0, 5, 40), (2, 5, 40), (5, 5, 40), (1, 10, 12), (3, 3, 3), (0, 0, 9)])
def test_count_interval_is_the_exact_hypergeometric_one(hits, checked, size):
    assert count_interval(hits, checked, size, 0.95) == brute_interval(hits, checked, size, 0.95)


def test_stratified_interval_covers_at_its_level():
    sizes, counts, draws = [3, 6, 17, 53], [1, 3, 2, 4], [3, 6, 6, 5]
    rng = np.random.default_rng(0)
    covered, estimates = 0, []
    for _ in range(400):
        strata = []
        for size, count, n in zip(sizes, counts, draws):
            population = np.zeros(size, dtype=bool)
            population[:count] = True
            strata.append(Stratum(0, size, n, int(rng.choice(population, n, replace=False).sum())))
        estimate, (low, high) = stratified_count(strata, 0.95)
        covered += low <= sum(counts) <= high
        estimates.append(estimate)
    assert covered / 400 >= 0.95
    assert np.mean(estimates) == pytest.approx(sum(counts), rel=0.1)  # unbiased: the weights are N_h / n_h


def test_an_estimate_with_embed_sites_is_checked_exactly_with_the_other_sites_resumed(gqa, tiny_task):
    """The embedding sits before every block, so its cells run full forwards; the other checked sites
    still resume mid-model. Both must equal the full-forward reference."""
    candidates = nodes(gqa)  # the embedding, every head, every MLP
    estimate = attribute(gqa, tiny_task, candidates, "atp", intervention=mechattr.interventions.Noise())
    checked = verify(gqa, tiny_task, estimate, top=4, sample=len(candidates) - 4)
    assert Site("embed") in checked.checked and any(s.kind == "z" for s in checked.checked)
    reference = mechattr.patch(gqa, tiny_task, list(checked.checked), mechattr.interventions.Noise(), resume=False)
    torch.testing.assert_close(checked.exact.per_example, reference.per_example, atol=1e-5, rtol=0)


def test_verify_patches_with_the_estimates_own_intervention_arguments_included(gqa, tiny_task, z_sites, tmp_path):
    """A Resample(seed=3) estimate is checked under Resample(seed=3), not the default seed, also after a
    save and load; a Steer estimate loaded from disk (its vector is not saved) needs intervention=."""
    resample = Resample(seed=3)
    estimate = attribute(gqa, tiny_task, z_sites, "atp", intervention=resample)
    loaded = load_effects(save_effects(tmp_path / "est", [estimate]))[estimate.kind]
    assert estimate.applied == loaded.applied == resample
    checked = verify(gqa, tiny_task, loaded, top=3, sample=0)
    own = mechattr.patch(gqa, tiny_task, list(checked.checked), resample)
    default = mechattr.patch(gqa, tiny_task, list(checked.checked), Resample())
    torch.testing.assert_close(checked.exact.per_example, own.per_example, atol=1e-6, rtol=0)
    assert not torch.allclose(own.per_example, default.per_example, atol=1e-3)  # the seed matters here
    steer = Steer(torch.ones(gqa.cfg.d_model), scale=0.5)
    sites = grid(gqa, "resid_pre", tiny_task.n_pos)
    steered = load_effects(save_effects(tmp_path / "steer", [attribute(gqa, tiny_task, sites, intervention=steer)]))
    assert steered["resid_pre"].applied is None
    with pytest.raises(ValueError, match=r"intervention 'steer' is not known with its arguments.*intervention="):
        verify(gqa, tiny_task, steered["resid_pre"], top=2, sample=0)
    assert verify(gqa, tiny_task, steered["resid_pre"], top=2, sample=0, intervention=steer).n_top == 2
