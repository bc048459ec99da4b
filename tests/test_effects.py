import numpy as np
import pytest
import torch
from scipy import stats

from mechattr.effects import Effects, load_effects, save_effects
from mechattr.stats import benjamini_hochberg
from mechattr.sites import Grid, Site


def make_effects(per_example, clean, corrupt, kind="resid_pre"):
    layers, pos = per_example.shape[:2]
    sites = tuple(Site(kind, l, pos=p) for l in range(layers) for p in range(pos))
    grid = Grid(kind, ("layer", "pos"), (layers, pos), sites)
    return Effects(values=per_example.mean(-1), per_example=per_example, clean=clean, corrupt=corrupt, grid=grid,
                   str_tokens=tuple(f"t{p}" for p in range(pos)))


@pytest.fixture
def effects():
    g = torch.Generator().manual_seed(0)
    n = 40
    clean = 3 + 0.1 * torch.randn(n, generator=g)
    corrupt = -1 + 0.1 * torch.randn(n, generator=g)
    per_example = corrupt.expand(2, 3, n).clone() + 0.05 * torch.randn(2, 3, n, generator=g)
    per_example[1, 2] = clean + 0.01  # one cell restores the clean behaviour
    per_example[0, 1] += 1.0  # one cell moves a quarter of the gap
    return make_effects(per_example, clean, corrupt)


def test_benjamini_hochberg_on_a_known_vector():
    # Hand-computed: sorted p = .001 .008 .039 .041 .042 .06 .074 .205; thresholds .05*k/8 =
    # .00625 .0125 .01875 .025 .03125 .0375 .04375 .05; the largest k with p_(k) <= threshold is 2.
    p = torch.tensor([0.041, 0.001, 0.074, 0.008, 0.205, 0.039, 0.042, 0.06])
    reject = benjamini_hochberg(p, alpha=0.05)
    assert reject.tolist() == [False, True, False, True, False, False, False, False]
    # Step-up: a later p under its line rescues earlier ones above theirs.
    assert benjamini_hochberg(torch.tensor([0.02, 0.03]), 0.05).tolist() == [True, True]
    assert not benjamini_hochberg(torch.tensor([0.5, 0.9]), 0.05).any()


def test_normalized_effect_and_stderr(effects):
    gap = effects.clean.mean() - effects.corrupt.mean()
    torch.testing.assert_close(effects.normalized, (effects.values - effects.corrupt.mean()) / gap)
    assert effects.normalized[1, 2] == pytest.approx(1.0, abs=0.01)
    assert effects.normalized[0, 1] == pytest.approx(1.0 / float(gap), abs=0.01)
    x = effects.per_example[0, 0].double().numpy()
    assert float(effects.stderr[0, 0]) == pytest.approx(x.std(ddof=1) / np.sqrt(len(x)), rel=1e-5)


def test_bootstrap_ci_covers_the_mean_and_narrows_with_confidence(effects):
    lo, hi = effects.ci(level=0.95)
    assert (lo <= effects.values).all() and (effects.values <= hi).all()
    lo50, hi50 = effects.ci(level=0.5)
    assert ((hi50 - lo50) < (hi - lo)).all()
    # Close to the normal-theory interval for 40 examples.
    torch.testing.assert_close(hi - lo, 2 * 1.96 * effects.stderr, rtol=0.2, atol=0)
    # Seeded: the same interval twice.
    torch.testing.assert_close(effects.ci()[0], lo)


def test_pvalues_are_paired_t_tests_and_significance_is_corrected(effects):
    diff = (effects.per_example[0, 1] - effects.corrupt).double().numpy()
    assert float(effects.pvalues[0, 1]) == pytest.approx(stats.ttest_1samp(diff, 0).pvalue, rel=1e-4, abs=1e-30)
    significant = effects.significant()
    assert significant[1, 2] and significant[0, 1]
    assert significant.sum() <= 3


def test_top_orders_by_absolute_effect(effects):
    (first, v1), (second, v2) = effects.top(2)
    assert first == Site("resid_pre", 1, pos=2) and second == Site("resid_pre", 0, pos=1)
    assert v1 > v2 > 0
    with pytest.raises(ValueError, match="valid: effect, normalized, values"):
        effects.top(2, by="size")


def test_dataframe_has_one_row_per_site(effects):
    df = effects.to_dataframe()
    assert len(df) == 6 and list(df["layer"]) == [0, 0, 0, 1, 1, 1] and list(df["pos"]) == [0, 1, 2] * 2
    assert df.loc[5, "normalized"] == pytest.approx(float(effects.normalized[1, 2]))
    assert (df["ci_low"] <= df["value"]).all()


def test_save_load_round_trip(tmp_path, effects):
    other = make_effects(effects.per_example[:1] * 2, effects.clean, effects.corrupt, kind="mlp_out")
    save_effects(tmp_path, [effects, other], model="m", task="t")
    loaded = load_effects(tmp_path)
    assert set(loaded) == {"resid_pre", "mlp_out"}
    for original in (effects, other):
        back = loaded[original.kind]
        torch.testing.assert_close(back.per_example, original.per_example)
        torch.testing.assert_close(back.values, original.values)
        assert back.grid == original.grid and back.str_tokens == original.str_tokens
        assert back.meta["model"] == "m"
    assert not list(tmp_path.glob(".*tmp"))  # no temporary files left
    with pytest.raises(KeyError, match="pass kind= one of them"):
        Effects.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="effects.json is missing"):
        Effects.load(tmp_path / "nowhere")


def test_shape_mismatch_is_rejected(effects):
    transposed = effects.per_example.transpose(0, 1)
    with pytest.raises(ValueError, match=r"values have shape \(3, 2\) but the grid is \(2, 3\)"):
        Effects(values=transposed.mean(-1), per_example=transposed, clean=effects.clean,
                corrupt=effects.corrupt, grid=effects.grid)
