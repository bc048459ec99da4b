"""The resumed forward (`mechattr.forward`): it proves itself on the model at hand, falls back to exact
full forwards with one warning where it cannot (a wrong number or a failure), and never re-runs the
unpatched forward behind a caller's back."""

import warnings

import pytest
import torch

import mechattr
from mechattr import families
from mechattr.forward import FastPathWarning, fast_path_verdict
from mechattr.runs import task_forward
from mechattr.sites import Site
import tiny_families as tf

ATOL = 1e-5


def _max_error(a, b) -> float:
    return float((a - b).abs().max())


def _break_last_position_unembedding(model):
    """Corrupt the unembedding only where it sees one position, as the resumed path calls it."""
    def hook(module, args, output):
        return output + 1e-3 if output.shape[1] == 1 else output
    return model.unembed.register_forward_hook(hook)


def _break_resumed_blocks(model):
    """Make the last block fail whenever its queries are a suffix of its keys, as when a run reuses the
    prefix's keys and values."""
    def hook(module, args, kwargs):
        mask = kwargs.get("attention_mask")
        if torch.is_tensor(mask) and mask.shape[-2] < mask.shape[-1]:
            raise RuntimeError("block called on a suffix of the prompt")
    return model.blocks[-1].register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("breakage, says", [(_break_last_position_unembedding, "misses"),
                                            (_break_resumed_blocks, "fails to run")], ids=["wrong", "raises"])
def test_a_resumed_path_that_cannot_prove_itself_falls_back_exactly(tmp_path, breakage, says):
    model, task = mechattr.load_model(str(families.build("llama", tmp_path / "llama-broken"))), tf.task()
    handle = breakage(model)
    sites = [Site("resid_pre", 1, pos=p) for p in (0, *tf.LATE)] + [Site("z", 1, pos=tf.LATE[1], head=3)]
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            effects = mechattr.patch(model, task, sites)
            again = mechattr.patch(model, task, sites)
        reference = tf.patch_reference(model, task, sites, "corrupt")
    finally:
        handle.remove()
    messages = [str(w.message) for w in caught if issubclass(w.category, FastPathWarning)]
    assert len(messages) == 1 and str(model.cfg.model_name) in messages[0] and says in messages[0]
    assert fast_path_verdict(model) is not None
    assert _max_error(effects.per_example, reference) <= ATOL
    assert torch.equal(again.per_example, effects.per_example)



def test_a_resumed_run_needs_its_recorded_inputs(gqa, tiny_task):
    forward = task_forward(gqa, tiny_task, "corrupt")
    resid = torch.zeros(tiny_task.n_examples, tiny_task.n_pos, gqa.cfg.d_model)
    with pytest.raises(ValueError, match="needs the block inputs of the unpatched run: call cache\\(\\) first"):
        forward.patched(1, [], 1, resid)
    full = forward.patched(1, [])  # a full forward needs nothing recorded
    torch.testing.assert_close(full, gqa(tiny_task.corrupt)[:, -1], atol=1e-5, rtol=0)
