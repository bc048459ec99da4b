"""MIB faithfulness: curves and areas against hand-written ablations, the random floor, the intervals."""

import numpy as np
import pytest
import torch

import mechattr
from mechattr.circuits import edge_faithfulness
from mechattr.edges import attribute_edges
from mechattr.faithfulness import MIB_SHARES, areas, faithfulness
from mechattr.graph import all_edges, nodes
from mechattr.interventions import Noise
from tests.reference import logit_diff


def hand_metric(model, task, ablated):
    """Mean logit difference of the clean run with every site in `ablated` (a head's z or a layer's MLP
    output, at every position) set to its value in the corrupted run, by hand-written hooks."""
    names = {s.hook for s in ablated}
    with torch.no_grad():
        _, cache = model.run_with_cache(task.corrupt, names_filter=lambda name: name in names)

    def hook_for(name):
        def hook(act, hook):
            for s in ablated:
                if s.hook == name:
                    index = (slice(None), slice(None), s.head) if s.kind == "z" else (slice(None),)
                    act[index] = cache[name][index]
            return act
        return hook

    with torch.no_grad():
        with model.hooks(fwd_hooks=[(name, hook_for(name)) for name in names]):
            return float(logit_diff(model, task.clean, task.answer, task.wrong).mean())


@pytest.fixture(scope="module")
def heads_and_mlps(gqa, tiny_task):
    """The heads of the first two layers of the 3-layer model and every MLP (11 nodes), ranked by exact
    patching. The last layer's heads are recomputed and read the clean tokens' positions, so ablating
    every ranked node is not the corrupted run."""
    candidates = [s for s in nodes(gqa) if s.kind == "mlp_out" or (s.kind == "z" and s.layer < 2)]
    return candidates, mechattr.patch(gqa, tiny_task, candidates, Noise())


def test_curves_and_areas_equal_hand_written_ablations(gqa, tiny_task, heads_and_mlps):
    candidates, exact = heads_and_mlps
    result = faithfulness(gqa, tiny_task, exact, Noise(), random=3, bootstrap=200)
    full, empty = hand_metric(gqa, tiny_task, []), hand_metric(gqa, tiny_task, candidates)
    assert result.full_metric == pytest.approx(full, abs=1e-5)
    assert result.empty_metric == pytest.approx(empty, abs=1e-5)
    assert abs(empty - exact.corrupt_metric) > 1e-3  # the measured empty circuit, not the corrupted run
    contribution = -exact.effect.flatten()  # Noise acts on the clean run: a carrier's ablation costs metric
    for order, curve in ((contribution.argsort(descending=True, stable=True), result.cpr_curve),
                         (contribution.abs().argsort(descending=True, stable=True), result.cmd_curve)):
        expected = []
        for share in MIB_SHARES:
            kept = {candidates[int(i)] for i in order[:int(share * len(candidates))]}
            metric = hand_metric(gqa, tiny_task, [s for s in candidates if s not in kept])
            expected.append((metric - empty) / (full - empty))
        np.testing.assert_allclose(curve, expected, atol=1e-4)
    f_cpr, f_cmd = np.array(result.cpr_curve), np.array(result.cmd_curve)
    assert result.cpr == pytest.approx(np.trapezoid(f_cpr, MIB_SHARES), abs=1e-6)
    assert result.cmd == pytest.approx(np.trapezoid(np.abs(1 - f_cmd), MIB_SHARES), abs=1e-6)
    assert result.sizes == tuple(int(s * 11) for s in MIB_SHARES) and result.cpr_curve[-1] == pytest.approx(1.0)
    assert result.cpr_ci[0] <= result.cpr <= result.cpr_ci[1] and result.cmd_ci[0] <= result.cmd <= result.cmd_ci[1]


def test_the_random_floor_is_the_mean_of_seeded_random_rankings(gqa, tiny_task, heads_and_mlps):
    _, exact = heads_and_mlps
    one = faithfulness(gqa, tiny_task, exact, random=4, bootstrap=50, seed=1)
    again = faithfulness(gqa, tiny_task, exact, random=4, bootstrap=50, seed=1)
    assert one.random_curve == again.random_curve and one.cpr_ci == again.cpr_ci  # seeded
    assert one.random_cpr[1] > 0 and one.meta["random"] == 4
    mean_area, _ = areas(MIB_SHARES, np.array(one.random_curve))
    assert one.random_cpr[0] == pytest.approx(float(mean_area), abs=1e-6)  # the area is linear in f
    assert one.cpr > one.random_cpr[0]  # on this model the signed exact ranking beats chance


def test_an_edge_ranking_over_every_edge_matches_edge_faithfulness(gqa, tiny_task):
    """Ablating every edge is the corrupted run, so f equals the normalised edge faithfulness."""
    edges = all_edges(gqa)
    estimate = attribute_edges(gqa, tiny_task, edges, "atp", intervention=Noise())
    result = faithfulness(gqa, tiny_task, estimate, random=1, bootstrap=20)
    order = (-estimate.effect).argsort(descending=True, stable=True)
    circuits = [{edges[int(i)] for i in order[:k]} for k in result.sizes]
    # f = (m - corrupt) / (clean - corrupt), and on this random model the gap is about 3.5e-4 of a metric
    # near 0.5: the two paths' baselines (other batch shapes, so other float32 kernels) may differ by a few
    # ulps, which the division turns into 1e-4 of f. Allow 1e-6 of the metric's scale, through the gap.
    gap = abs(estimate.clean_metric - estimate.corrupt_metric)
    tolerance = 1e-6 * max(abs(estimate.clean_metric), abs(estimate.corrupt_metric), 1e-3) / gap
    np.testing.assert_allclose(result.cpr_curve, edge_faithfulness(gqa, tiny_task, circuits), rtol=tolerance,
                               atol=tolerance)
    assert result.meta["units"] == "edge" and "CPR" in result.to_markdown()


def test_bad_shares_and_mixed_rankings_are_refused(gqa, tiny_task, heads_and_mlps):
    _, exact = heads_and_mlps
    with pytest.raises(ValueError, match=r"shares must increase strictly within \(0, 1\], got \(0.5, 0.2\)"):
        faithfulness(gqa, tiny_task, exact, shares=(0.5, 0.2))
    with pytest.raises(ValueError, match="random >= 1 and bootstrap >= 1, got 0 and 1000"):
        faithfulness(gqa, tiny_task, exact, random=0)
