"""Interventions: the values the do-operator sets, against hand-written hooks, and their arguments."""

import pytest
import torch

from mechattr import Site, patch
from mechattr.interventions import (INTERVENTIONS, Denoise, GaussianNoise, Mean, Noise, Resample, Steer, Zero,
                                    arguments, from_arguments)
from reference import hand_patch


@pytest.mark.parametrize("intervention, value_fn", [
    (Zero(), lambda base, source: torch.zeros_like(base)),
    (Mean(), lambda base, source: torch.cat([base, source]).mean(0, keepdim=True).expand_as(base)),
])
def test_ablations_match_hand_written_values(tiny, tiny_task, intervention, value_fn):
    site = Site("z", 1, head=2)
    effects = patch(tiny, tiny_task, [site], intervention, progress=False)
    expected = hand_patch(tiny, tiny_task.clean, tiny_task.corrupt, site.hook, site.index,
                          tiny_task.answer, tiny_task.wrong, value_fn)
    torch.testing.assert_close(effects.per_example[0], expected, atol=1e-5, rtol=0)


def test_resample_takes_another_examples_activation(tiny, tiny_task):
    site = Site("mlp_out", 0)
    effects = patch(tiny, tiny_task, [site], Resample(seed=3), progress=False)
    donor_ids = Resample(seed=3)(torch.arange(4.0)[:, None], torch.arange(4.0)[:, None])[:, 0].long()
    assert (donor_ids != torch.arange(4)).all()  # a derangement
    expected = hand_patch(tiny, tiny_task.clean, tiny_task.clean[donor_ids], site.hook, site.index,
                          tiny_task.answer, tiny_task.wrong, lambda base, source: source)
    torch.testing.assert_close(effects.per_example[0], expected, atol=1e-5, rtol=0)


def test_arguments_rebuild_every_registered_intervention_but_a_steer_vector():
    for made in (Denoise(), Noise(), Zero(), Mean(), Resample(seed=3), GaussianNoise(std=0.5, seed=2)):
        assert from_arguments(made.name, arguments(made)) == made
    assert arguments(Resample(seed=3)) == {"seed": 3} and arguments(Denoise()) == {}
    assert arguments(Steer(torch.ones(3))) is None and from_arguments("steer", None) is None
    # Without arguments only an intervention that takes none is rebuilt; a seed or a std is not guessed.
    assert from_arguments("noise", None) == Noise() and from_arguments("resample", None) is None
    assert from_arguments("shuffle", {}) is None and set(INTERVENTIONS) >= {"denoise", "resample", "steer"}
