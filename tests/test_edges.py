"""Edges: exact edge patching against hand-written hooks, and edge attribution against it."""

import pytest
import torch

from mechattr.edges import attribute_edges, patch_edges
from mechattr.graph import Edge, all_edges
from mechattr.runs import gradient_pass
from mechattr.sites import Site
from tests.bridges import bridge


EDGES = [Edge(Site("z", 0, head=1), Site("q", 1, head=2)), Edge(Site("z", 0, head=1), Site("k", 2, head=1)),
         Edge(Site("mlp_out", 0), Site("v", 1, head=0)), Edge(Site("z", 1, head=3), Site("mlp_out", 1)),
         Edge(Site("mlp_out", 1), Site("resid_post", 2)), Edge(Site("embed"), Site("q", 0, head=0)),
         Edge(Site("embed"), Site("mlp_out", 2))]


def _reference_edge(model, task, edge):
    """Edge patching by hand: the sender's clean-minus-corrupted write, added to the receiver's input
    only (for a head: the q/k/v the model computes from the shifted input, kept for that head alone)."""
    def act(tokens, name):
        return gradient_pass(model, tokens, [name], None).acts[name]

    s, r = edge.sender, edge.receiver
    delta = act(task.clean, s.hook) - act(task.corrupt, s.hook)
    if s.kind == "z":
        delta = delta[:, :, s.head] @ model.blocks[s.layer].attn.W_O[s.head]
    shift = lambda a, hook: a + delta  # noqa: E731
    if r.kind in ("q", "k", "v"):
        name = f"blocks.{r.layer}.attn.hook_{r.kind}"
        with model.hooks(fwd_hooks=[(f"blocks.{r.layer}.ln1.hook_in", shift)]):
            shifted = act(task.corrupt, name)

        def hook(a, hook):
            a = a.clone()
            a[:, :, r.head] = shifted[:, :, r.head]
            return a
    else:
        name = f"blocks.{r.layer}.ln2.hook_in" if r.kind == "mlp_out" else f"blocks.{r.layer}.hook_resid_post"
        hook = shift
    with torch.no_grad(), model.hooks(fwd_hooks=[(name, hook)]):
        logits = model(task.corrupt)[:, -1]
    return task.metric(logits, task.answer, task.wrong, logits.log_softmax(-1))


def test_edge_patching_matches_hand_written_hooks(gqa, tiny_task):
    exact = patch_edges(gqa, tiny_task, EDGES)
    reference = torch.stack([_reference_edge(gqa, tiny_task, e) for e in EDGES])
    assert exact.effect.abs().max() > 1e-3
    torch.testing.assert_close(exact.per_example, reference, atol=1e-5, rtol=1e-4)
    assert exact.method == "patch" and exact.edges == tuple(EDGES)


def test_edge_attribution_is_exact_into_the_logits_without_layernorm(tiny_task):
    model = bridge(normalization_type=None, seed=3)
    final = Site("resid_post", 1)
    edges = [e for e in all_edges(model) if e.receiver == final]
    exact = patch_edges(model, tiny_task, edges)
    assert exact.effect.abs().max() > 1e-4
    torch.testing.assert_close(attribute_edges(model, tiny_task, edges).per_example, exact.per_example,
                               atol=1e-6, rtol=1e-4)


def test_edge_attribution_tracks_exact(gqa, tiny_task):
    exact = patch_edges(gqa, tiny_task, EDGES)
    atp = attribute_edges(gqa, tiny_task, EDGES)
    assert torch.corrcoef(torch.stack([atp.effect, exact.effect]))[0, 1] > 0.9
    torch.testing.assert_close(attribute_edges(gqa, tiny_task, EDGES, "ig", steps=1).per_example, atp.per_example)
    with pytest.raises(ValueError, match=r"method 'atp\*'; the methods that can: atp, ig"):
        attribute_edges(gqa, tiny_task, EDGES, "atp*")


@pytest.mark.slow
def test_receiver_input_gradients_match_split_input_hooks(smollm2, smollm2_ioi):
    """On SmolLM2 (GQA) the bridge can give every head its own q/k/v input: edge attribution, which
    pulls gradients back through ln1 and W_Q/W_K/W_V instead, must agree with those hooks."""
    task = smollm2_ioi.subset(range(2))
    edges = [Edge(Site("z", 3, head=4), Site(kind, 12, head=h)) for kind in "qkv" for h in range(3)]
    estimate = attribute_edges(smollm2, task, edges)
    smollm2.set_use_split_qkv_input(True)
    try:
        names = [f"blocks.12.hook_{kind}_input" for kind in "qkv"]
        reference = gradient_pass(smollm2, task.clean, [], None).logits.log_softmax(-1)
        run = gradient_pass(smollm2, task.corrupt, names + ["blocks.3.attn.hook_z"],
                            lambda lg: task.metric(lg, task.answer, task.wrong, reference))
        clean_z = gradient_pass(smollm2, task.clean, ["blocks.3.attn.hook_z"], None).acts["blocks.3.attn.hook_z"]
    finally:
        smollm2.set_use_split_qkv_input(False)
    delta = (clean_z - run.acts["blocks.3.attn.hook_z"])[:, :, 4] @ smollm2.blocks[3].attn.W_O[4]
    expected = torch.stack([(delta * run.grads[f"blocks.12.hook_{e.receiver.kind}_input"][:, :, e.receiver.head]
                             ).sum((1, 2)) for e in edges])
    torch.testing.assert_close(estimate.per_example - estimate.corrupt, expected, atol=1e-4, rtol=1e-3)
