import pytest
import torch

from mechattr.effects import Effects
from mechattr.selection import SiteSet, select
from mechattr.sites import Grid, Site

A, B, C, D = Site("z", 0, head=0), Site("z", 0, head=1), Site("z", 1, head=0), Site("z", 1, head=1)


def hand_effects(rows: dict[Site, list[float]]) -> Effects:
    """Effects over the given sites with per-example patched metrics `rows` and a corrupted run at 0,
    so each site's effect is the mean of its row."""
    sites = list(rows)
    per_example = torch.tensor([rows[s] for s in sites])
    n = per_example.shape[1]
    return Effects(values=per_example.mean(-1), per_example=per_example, clean=torch.ones(n),
                   corrupt=torch.zeros(n), grid=Grid.of(sites))


# Effects 2.0, -1.0 and 0.1 (tight, significant) and 0.5 (noisy: p ~ 0.7).
EFFECTS = hand_effects({
    A: [2.0, 2.1, 1.9, 2.0, 2.05, 1.95],
    B: [-1.0, -1.1, -0.9, -1.0, -1.05, -0.95],
    C: [3.5, -2.5, 3.5, -2.5, 3.5, -2.5],
    D: [0.1, 0.11, 0.09, 0.1, 0.105, 0.095],
})


def test_effects_are_as_built():
    assert torch.allclose(EFFECTS.effect, torch.tensor([2.0, -1.0, 0.5, 0.1]), atol=1e-6)
    assert EFFECTS.significant().tolist() == [True, True, False, True]


def test_top_k_ranks_every_cell_by_magnitude_unless_asked_to_filter():
    top = select(EFFECTS, top_k=3)
    assert top.sites == (A, B, C)
    assert top.scores == pytest.approx((2.0, -1.0, 0.5), abs=1e-6)
    assert top.rule == "the top 3 by |effect| (every cell eligible)" and top.dropped == ()
    significant = select(EFFECTS, top_k=3, significant_only=True)
    assert significant.sites == (A, B, D)
    assert len(select(EFFECTS, top_k=10, significant_only=True)) == 3  # only three cells are eligible


def test_the_filter_names_the_larger_sites_it_dropped():
    # C (0.5, not significant) is larger than D (0.1), the smallest site kept.
    chosen = select(EFFECTS, top_k=3, significant_only=True)
    assert [site for site, _ in chosen.dropped] == [C] and chosen.dropped[0][1] == pytest.approx(0.5, abs=1e-6)
    assert select(EFFECTS, top_k=2, significant_only=True).dropped == ()  # C is smaller than A and B
    text = chosen.describe()
    assert text.splitlines() == [
        "3 sites, the top 3 by |effect| among the cells significant at Benjamini-Hochberg FDR 0.05:",
        f"  {A}  +2", f"  {B}  -1", f"  {D}  +0.1",
        f"not significant, so left out although larger: 1 site: {C} +0.5"]
    # Nothing eligible: the sites the rule would have taken without the filter are named.
    noisy = hand_effects({A: [3.5, -2.5, 3.5, -2.5], B: [0.1, -0.1, 0.1, -0.1]})
    none = select(noisy, top_k=1, significant_only=True)
    assert none.sites == () and [site for site, _ in none.dropped] == [A]


def test_the_command_line_and_fine_tuning_take_the_library_default():
    import inspect

    from mechattr.cli import _parser
    from mechattr.finetune import TopSites

    default = inspect.signature(select).parameters["significant_only"].default
    assert default is False
    args = _parser().parse_args(["finetune", "--sites-from", "x", "--top-k", "2", "--out", "y"])
    assert args.significant_only is default
    assert TopSites(EFFECTS).significant_only is default


def test_threshold_is_on_absolute_effect():
    assert select(EFFECTS, threshold=0.75, significant_only=True).sites == (A, B)
    assert select(EFFECTS, threshold=0.3).sites == (A, B, C)
    assert select(EFFECTS, threshold=5.0).sites == ()


def test_mass_is_the_smallest_prefix_reaching_the_share():
    # Eligible |effects| 2.0, 1.0, 0.1 sum to 3.1.
    assert select(EFFECTS, mass=0.6, significant_only=True).sites == (A,)  # 2.0 >= 1.86
    assert select(EFFECTS, mass=0.7, significant_only=True).sites == (A, B)  # 2.0 < 2.17 <= 3.0
    assert select(EFFECTS, mass=1.0, significant_only=True).sites == (A, B, D)
    # Without the filter the total is 3.6: 3.0 < 0.9 * 3.6 = 3.24 <= 3.5
    assert select(EFFECTS, mass=0.9).sites == (A, B, C)


def test_several_effects_keep_the_largest_magnitude_and_correct_jointly():
    other = hand_effects({A: [-5.0, -5.1, -4.9, -5.0], C: [0.3, 0.31, 0.29, 0.3]})
    both = select([EFFECTS, other], top_k=4, significant_only=True)
    assert both.sites == (A, B, C, D)
    assert both.score(A) == pytest.approx(-5.0, abs=1e-5)
    assert both.score(C) == pytest.approx(0.3, abs=1e-5)  # significant in the second grid


def test_exactly_one_rule_is_required():
    with pytest.raises(ValueError, match="exactly one of top_k, threshold, mass"):
        select(EFFECTS)
    with pytest.raises(ValueError, match="exactly one"):
        select(EFFECTS, top_k=1, mass=0.5)
    with pytest.raises(ValueError, match="mass"):
        select(EFFECTS, mass=1.5)


def test_site_set_is_a_value():
    top = select(EFFECTS, top_k=2)
    assert A in top and C not in top and len(top) == 2
    assert hash(top) == hash(select(EFFECTS, top_k=2))
    assert top == SiteSet(top.sites, top.scores)  # the rule is not part of the value
    merged = top | SiteSet((C, A), (0.7, 9.0))
    assert merged.sites == (A, B, C) and merged.score(A) == 9.0
    assert SiteSet.from_json(merged.to_json()) == merged
    plain = SiteSet.of([D, C, D])
    assert plain.sites == (D, C) and plain.score(D) is None
    with pytest.raises(KeyError, match="not in this SiteSet"):
        top.score(D)
