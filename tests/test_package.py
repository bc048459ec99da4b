"""The package's front door: a small `__all__`, lazy subpackages, and the old names pointing to their modules."""

import importlib

import pytest

import mechattr
from mechattr import effects, interventions, models


def test_the_front_door_is_small_and_every_name_resolves():
    assert len(mechattr.__all__) <= 17  # 16 names and __version__
    for name in mechattr.__all__:
        assert getattr(mechattr, name) is not None, name
    assert mechattr.plots.heatmap and mechattr.finetune.train  # subpackages load on first use
    assert mechattr.interventions is interventions


@pytest.mark.parametrize("name, module", [("Noise", interventions), ("Mean", interventions),
                                          ("NativeConfig", models), ("load_effects", effects)])
def test_a_moved_name_warns_and_is_the_object_in_its_module(name, module):
    with pytest.warns(DeprecationWarning, match=rf"mechattr\.{name} moved to {module.__name__}\.{name}"):
        assert getattr(mechattr, name) is getattr(module, name)


@pytest.mark.parametrize("module, old, new", [("mechattr.causal", "select", "mechattr.causal.scoring.predicted_graph"),
                                              ("mechattr.finetune.methods", "METHODS",
                                               "mechattr.finetune.methods.FINETUNE_METHODS"),
                                              ("mechattr.causal.pairwise", "METHODS",
                                               "mechattr.causal.pairwise.PAIRWISE_METHODS")])
def test_a_renamed_registry_or_function_warns_and_is_the_new_one(module, old, new):
    where, _, name = new.rpartition(".")
    with pytest.warns(DeprecationWarning, match=rf"{module}\.{old} moved to {new}"):
        assert getattr(importlib.import_module(module), old) is getattr(importlib.import_module(where), name)
    with pytest.raises(AttributeError, match=f"module '{module}' has no attribute 'METHOD'"):
        getattr(importlib.import_module(module), "METHOD")


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="module 'mechattr' has no attribute 'Nosie'"):
        mechattr.Nosie  # noqa: B018
