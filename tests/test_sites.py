import pytest

from mechattr.models import NativeConfig, native_model
from mechattr.sites import KINDS, Grid, Site, grid, validate


def test_sites_are_hashable_values():
    assert Site("z", 9, head=6) == Site("z", layer=9, head=6)
    assert len({Site("z", 9, head=6), Site("z", 9, head=6), Site("z", 9, head=5)}) == 2
    assert str(Site("z", 9, head=6)) == "z[L9 H6]"


def test_a_sites_repr_is_the_call_that_builds_it():
    sites = [Site("z", 9, head=6), Site("embed"), Site("resid_pre", 3, pos=10), Site("neuron", 12, neuron=7),
             Site("pattern", 0, pos=2, head=1)]
    assert repr(sites[0]) == "Site('z', layer=9, head=6)" and repr(sites[1]) == "Site('embed')"
    assert [eval(repr(s)) for s in sites] == sites


def test_index_follows_the_kind_table():
    assert Site("resid_pre", 3, pos=5).index == (5, slice(None))
    assert Site("z", 3, head=2).index == (slice(None), 2, slice(None))
    assert Site("z", 3, pos=4, head=2).index == (4, 2, slice(None))
    assert Site("pattern", 3, pos=4, head=2).index == (2, 4, slice(None))  # [head, query, key]
    assert Site("neuron", 1, neuron=7).index == (slice(None), 7)
    assert Site("k", 5, head=1).hook == "blocks.5.attn.hook_k"


def test_unknown_kinds_and_axes_are_rejected():
    with pytest.raises(ValueError, match="unknown site kind 'attn'; valid kinds: embed, resid_pre"):
        Site("attn", 0)
    with pytest.raises(ValueError, match="'mlp_out' has no head axis"):
        Site("mlp_out", 0, head=1)


def test_grids(tiny):
    g = grid(tiny, "resid_pre", 7)
    assert g.axes == ("layer", "pos") and g.shape == (2, 7) and len(g) == 14
    assert g.sites[8] == Site("resid_pre", 1, pos=1)  # C order
    z = grid(tiny, "z")
    assert z.axes == ("layer", "head") and z.shape == (2, 4)
    assert grid(tiny, "z", 7, per_position=True).shape == (2, 7, 4)
    assert grid(tiny, "neuron").shape == (2, 256)
    assert grid(tiny, "embed", 7).shape == (7,)
    with pytest.raises(ValueError, match="needs n_pos"):
        grid(tiny, "resid_pre")
    with pytest.raises(ValueError, match="layer 5 out of range"):
        grid(tiny, "z", layers=[5])
    with pytest.raises(ValueError, match=r"neuron\[L-1 N0\]: layer -1 out of range"):
        grid(tiny, "neuron", layers=[1, -1])
    assert Grid.of([Site("z", 0, head=0), Site("mlp_out", 1)]).kind == "mixed"
    assert set(KINDS) >= {"resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "z", "q", "k", "v",
                          "pattern", "neuron"}


def test_building_a_grid_runs_no_model_and_the_first_patch_probes_each_kind_once():
    """The kind probe (does a value written at the hook reach the logits?) belongs to a run, not to a grid:
    grids are values. It runs the model once per kind and model, and is remembered."""
    model = native_model(NativeConfig(seed=3))  # a model of its own: no probe has run on it
    forwards = []
    model.register_forward_pre_hook(lambda module, args: forwards.append(1))
    grids = [grid(model, "z"), grid(model, "resid_pre", 5), grid(model, "neuron"), grid(model, "pattern", 5)]
    assert forwards == [] and all(len(g) for g in grids)
    validate(grids[0].sites, model)
    assert len(forwards) == 1  # one probe of hook_z
    validate(grids[0].sites + grids[1].sites, model)
    assert len(forwards) == 2  # hook_resid_pre probed once; hook_z remembered
    with pytest.raises(ValueError, match=r"site resid_pre\[L0 P5\]: pos 5 out of range"):
        validate([Site("resid_pre", 0, pos=5)], model, n_pos=5)
