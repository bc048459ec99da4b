import pytest
import torch
from dataclasses import replace

from mechattr import Site, grid, patch
from mechattr.interventions import Noise
from mechattr.sites import KINDS
from reference import hand_patch, logit_diff

TINY_KINDS = [k for k in KINDS if k != "neuron"]


@pytest.mark.parametrize("kind", TINY_KINDS)
def test_every_kind_matches_hand_written_hook(tiny, tiny_task, kind):
    g = grid(tiny, kind, tiny_task.n_pos)
    effects = patch(tiny, tiny_task, g, progress=False)
    per_site = effects.per_example.reshape(len(g), -1)
    for i, site in enumerate(g):
        expected = hand_patch(tiny, tiny_task.corrupt, tiny_task.clean, site.hook, site.index,
                              tiny_task.answer, tiny_task.wrong)
        torch.testing.assert_close(per_site[i], expected, atol=1e-5, rtol=0)
    assert effects.per_example.abs().max() > 0.01  # the grid is not trivially constant


def test_neurons_match_hand_written_hook(tiny, tiny_task):
    sites = [Site("neuron", layer=l, neuron=n) for l in (0, 1) for n in (0, 17, 255)]
    effects = patch(tiny, tiny_task, sites, progress=False)
    for i, site in enumerate(sites):
        expected = hand_patch(tiny, tiny_task.corrupt, tiny_task.clean, site.hook, site.index,
                              tiny_task.answer, tiny_task.wrong)
        torch.testing.assert_close(effects.per_example[i], expected, atol=1e-5, rtol=0)


def test_baselines_are_the_unpatched_runs(tiny, tiny_task):
    effects = patch(tiny, tiny_task, [Site("z", 0, head=1)], progress=False)
    torch.testing.assert_close(effects.clean, logit_diff(tiny, tiny_task.clean, tiny_task.answer, tiny_task.wrong))
    torch.testing.assert_close(effects.corrupt, logit_diff(tiny, tiny_task.corrupt, tiny_task.answer, tiny_task.wrong))
    assert effects.base_run == "corrupt"


def test_clean_into_clean_changes_nothing(tiny, tiny_task):
    same = replace(tiny_task, corrupt=tiny_task.clean)
    for kind in ("resid_pre", "z", "pattern", "mlp_out"):
        effects = patch(tiny, same, grid(tiny, kind, same.n_pos), progress=False)
        torch.testing.assert_close(effects.per_example, effects.clean.expand_as(effects.per_example), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["resid_pre", "resid_mid", "resid_post"])
def test_patching_whole_residual_restores_clean(tiny, tiny_task, kind):
    effects = patch(tiny, tiny_task, [Site(kind, layer) for layer in range(2)], progress=False)
    for row in effects.per_example:
        torch.testing.assert_close(row, effects.clean, atol=1e-5, rtol=0)


def test_resume_equals_full_forward_and_chunking_changes_nothing(tiny, tiny_task):
    g = grid(tiny, "resid_pre", tiny_task.n_pos)
    fast = patch(tiny, tiny_task, g, progress=False)
    full = patch(tiny, tiny_task, g, resume=False, progress=False)
    chunked = patch(tiny, tiny_task, g, max_memory=1, progress=False)  # one cell per batch
    torch.testing.assert_close(fast.per_example, full.per_example, atol=1e-5, rtol=0)
    torch.testing.assert_close(fast.per_example, chunked.per_example, atol=1e-5, rtol=0)


def test_noise_patches_corrupt_into_clean(tiny, tiny_task):
    site = Site("attn_out", 1, pos=6)
    effects = patch(tiny, tiny_task, [site], Noise(), progress=False)
    expected = hand_patch(tiny, tiny_task.clean, tiny_task.corrupt, site.hook, site.index,
                          tiny_task.answer, tiny_task.wrong)
    torch.testing.assert_close(effects.per_example[0], expected, atol=1e-5, rtol=0)
    assert effects.base_run == "clean"


def test_bad_sites_are_named_in_the_error(tiny, tiny_task):
    with pytest.raises(ValueError, match=r"resid_pre\[L7 P0\].*layer 7 out of range.*n_layers = 2"):
        patch(tiny, tiny_task, [Site("resid_pre", 7, pos=0)])
    with pytest.raises(ValueError, match=r"pos 9 out of range.*prompt length in tokens = 7"):
        patch(tiny, tiny_task, [Site("mlp_out", 1, pos=9)])
    with pytest.raises(ValueError, match=r"head 4 out of range.*n_heads = 4"):
        patch(tiny, tiny_task, [Site("z", 1, head=4)])


@pytest.mark.slow
def test_smollm2_grid_cells_match_hand_written_hook(smollm2, smollm2_ioi):
    task = smollm2_ioi.subset(range(4))
    sites = [Site("resid_pre", 0, pos=10), Site("resid_pre", 17, pos=10), Site("attn_out", 23, pos=14),
             Site("mlp_out", 0, pos=10), Site("resid_mid", 29, pos=14), Site("z", 23, head=3),
             Site("q", 20, head=8), Site("pattern", 17, head=4), Site("neuron", 12, neuron=7)]
    patch(smollm2, task, sites[:1], progress=False)  # a model's first use proves the fast path (more forwards)
    lengths = []  # positions entering the last block, per forward
    handle = smollm2.blocks[29].register_forward_pre_hook(lambda module, args: lengths.append(args[0].shape[1]))
    try:
        effects = patch(smollm2, task, sites, progress=False)
    finally:
        handle.remove()
    for i, site in enumerate(sites):
        expected = hand_patch(smollm2, task.corrupt, task.clean, site.hook, site.index, task.answer, task.wrong)
        torch.testing.assert_close(effects.per_example[i], expected, atol=1e-4, rtol=0)
    # The prompts first differ at position 10, so every patched run, at a position or over every
    # position (whose values equal the unpatched run's before 10; a pattern's query positions), starts
    # there or later. The two full-length forwards are the unpatched runs.
    patched = lengths[lengths.index(task.n_pos) + 2:]
    assert lengths.count(task.n_pos) == 2 and max(patched) == task.n_pos - 10, str(lengths)


@pytest.mark.slow
def test_smollm2_gqa_key_value_sites_index_groups(smollm2, smollm2_ioi):
    task = smollm2_ioi.subset(range(4))
    kv = grid(smollm2, "k", task.n_pos, layers=[20])
    assert kv.shape == (1, 3)  # 3 key/value groups, not 9 query heads
    sites = [Site("k", 20, head=h) for h in range(3)] + [Site("v", 23, head=2), Site("v", 23, head=1, pos=10)]
    effects = patch(smollm2, task, sites, progress=False)
    for i, site in enumerate(sites):
        expected = hand_patch(smollm2, task.corrupt, task.clean, site.hook, site.index, task.answer, task.wrong)
        torch.testing.assert_close(effects.per_example[i], expected, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match=r"head 3 out of range.*n_kv_heads = 3"):
        patch(smollm2, task, [Site("v", 23, head=3)])


@pytest.mark.slow
def test_smollm2_whole_residual_restores_clean_and_denoising_moves_metric(smollm2, smollm2_ioi):
    task = smollm2_ioi
    effects = patch(smollm2, task, [Site(k, l) for k in ("resid_pre", "resid_mid") for l in (3, 29)], progress=False)
    for row in effects.per_example:
        torch.testing.assert_close(row, effects.clean, atol=1e-4, rtol=0)
    assert effects.clean_metric - effects.corrupt_metric > 4  # the IOI task separates the runs

