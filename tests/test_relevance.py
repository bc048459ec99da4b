"""Relevance patching: node and edge estimates against hand-written rules, forwards left alone, refusals.

Every family of the support table is checked in `test_conformance.py`; here, one model in detail."""

import pytest
import torch

import mechattr
from mechattr.edges import attribute_edges
from mechattr.graph import Edge
from mechattr.interventions import Denoise
from mechattr.models import NativeConfig, native_model
from mechattr.relevance import RelevanceError, rules
from mechattr.sites import Site
import tiny_families as tf


def test_relp_changes_only_the_backward(gqa, tiny_task):
    """The base and source metrics are the model's own; the estimate differs from AtP's."""
    sites = [Site("z", layer, head=h) for layer in range(3) for h in range(4)] + [Site("mlp_out", 0)]
    relp = mechattr.attribute(gqa, tiny_task, sites, "relp")
    atp = mechattr.attribute(gqa, tiny_task, sites, "atp")
    assert torch.equal(relp.clean, atp.clean) and torch.equal(relp.corrupt, atp.corrupt)
    assert (relp.per_example - atp.per_example).abs().max() > 0.05
    reference = tf.atp_reference(gqa, tiny_task, sites, "corrupt", rules=tf.relp_rules(gqa))
    torch.testing.assert_close(relp.per_example, reference, atol=1e-5, rtol=0)


def test_an_edge_into_an_mlp_gets_the_relevance_at_the_mlps_own_input(gqa, tiny_task):
    """(new - base output of MLP 0) . relevance at MLP 2's input, read by a probe on its norm's input
    under hand-written rules: the rules reach inside the receiver (its norm and its activation)."""
    edge = Edge(Site("mlp_out", 0), Site("mlp_out", 2))
    estimate = attribute_edges(gqa, tiny_task, [edge], "relp", intervention=Denoise())
    with torch.no_grad():
        _, clean = gqa.run_with_cache(tiny_task.clean, names_filter=lambda n: n == "blocks.0.hook_mlp_out")
    probe, acts = {}, {}

    def add(act, hook):
        probe["x"] = torch.zeros_like(act, requires_grad=True)
        return act + probe["x"]

    def save(act, hook):
        acts["out"] = act.detach()

    hooks = [*tf.relp_rules(gqa), ("blocks.2.ln2.hook_in", add), ("blocks.0.hook_mlp_out", save)]
    with torch.enable_grad(), gqa.hooks(fwd_hooks=hooks):
        metric = tf._metric(tiny_task, gqa(tiny_task.corrupt)[:, -1])
        (grad,) = torch.autograd.grad(metric.sum(), [probe["x"]])
    delta = clean["blocks.0.hook_mlp_out"] - acts["out"]
    expected = metric.detach() + (delta * grad).sum((1, 2))
    torch.testing.assert_close(estimate.per_example[0], expected, atol=1e-5, rtol=0)


def test_a_model_without_a_rule_is_refused_by_name():
    odd = native_model(NativeConfig(seed=4))
    odd.cfg.act_fn = "softplus"
    with pytest.raises(RelevanceError, match="activation 'softplus' has no identity rule here; supported: gelu"):
        rules(odd)
