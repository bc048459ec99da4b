"""Deltas: only trained entries are saved, and applying one to a fresh base model reproduces the
trained model exactly."""

import pytest
import torch
from safetensors import safe_open

import mechattr
from mechattr.finetune import Delta, TrainConfig, full_masks, masks, merge, train
from mechattr.selection import SiteSet
from mechattr.sites import Site
from mechattr.tasks import Task


@pytest.fixture(scope="module")
def task():
    g = torch.Generator().manual_seed(1)
    clean = torch.randint(0, 50, (8, 6), generator=g)
    return Task(clean, clean.clone(), answer=torch.randint(0, 50, (8,), generator=g),
                wrong=torch.randint(0, 50, (8,), generator=g))


def trained(task, sites, steps=4, seed=0):
    model = mechattr.native_model()
    site_set = SiteSet.of(sites)
    result = train(model, masks(model, site_set), task, TrainConfig(steps=steps, lr=1e-2, seed=seed),
                   progress=False, sites=site_set, base_model="native")
    return model, result


def test_save_load_apply_reproduces_the_trained_logits(task, tmp_path):
    sites = [Site("z", 0, head=1), Site("neuron", 1, neuron=10)]
    model, result = trained(task, sites)
    path = result.delta.save(tmp_path / "delta.safetensors")
    with safe_open(str(path), "pt") as f:
        stored = sum(f.get_slice(k).get_shape()[0] for k in f.keys() if k.endswith("::values"))
    assert stored == result.n_trained == sum(int(m.sum()) for m in masks(model, sites).values())
    loaded = Delta.load(path)
    assert loaded.sites == SiteSet.of(sites) and loaded.base_model == "native"
    fresh = loaded.apply(mechattr.native_model())
    tokens = torch.randint(0, 50, (3, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(fresh(tokens), model(tokens))
        assert not torch.equal(mechattr.native_model()(tokens), model(tokens))


def test_apply_refuses_other_weights(task):
    _, result = trained(task, [Site("z", 0, head=1)])
    other = mechattr.native_model(mechattr.models.NativeConfig(seed=1))
    with pytest.raises(ValueError, match="compatibility-mode weights, not the original checkpoint"):
        result.delta.apply(other)
    result.delta.apply(other, check=False)  # possible on request


def test_dense_delta_from_full_fine_tuning(task, tmp_path):
    model = mechattr.native_model()
    result = train(model, full_masks(model), task, TrainConfig(steps=2), progress=False)
    path = result.delta.save(tmp_path / "full.safetensors")
    with safe_open(str(path), "pt") as f:
        assert not any(k.endswith("::indices") for k in f.keys())  # no index for fully trained tensors
    fresh = Delta.load(path).apply(mechattr.native_model())
    assert all(torch.equal(a, b) for a, b in zip(fresh.parameters(), model.parameters()))


def test_merge_equals_applying_each(task):
    _, first = trained(task, [Site("z", 0, head=1), Site("neuron", 1, neuron=10)], seed=0)
    _, second = trained(task, [Site("z", 0)], seed=1)  # overlaps head 1
    merged = merge(first.delta, second.delta)
    one_by_one = second.delta.apply(first.delta.apply(mechattr.native_model()), check=False)
    at_once = merged.apply(mechattr.native_model())
    for a, b in zip(one_by_one.parameters(), at_once.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    union = masks(one_by_one, [Site("z", 0), Site("neuron", 1, neuron=10)])
    assert merged.n_trained == sum(int(m.sum()) for m in union.values())
    assert set(merged.sites) == {Site("z", 0, head=1), Site("neuron", 1, neuron=10), Site("z", 0)}
    with pytest.raises(ValueError, match="different bases"):
        merge(first.delta, Delta({}, {}, {}, {}, base_model="other"))


def test_scaled_apply(task):
    model, result = trained(task, [Site("z", 1, head=0)])
    name = next(iter(result.delta.values))
    base = dict(mechattr.native_model().named_parameters())[name].detach().clone()
    half = dict(result.delta.apply(mechattr.native_model(), scale=0.5).named_parameters())[name]
    full = dict(model.named_parameters())[name]
    assert torch.allclose(half, base + 0.5 * (full - base), atol=1e-6)
