"""Ablating everything outside a circuit (`mechattr.ablation`): the circuit of everything is the base run,
the empty circuit the other run, and a circuit missing one unit is patching that unit."""

import torch

from mechattr.ablation import EdgeAblator, NodeAblator
from mechattr.edges import patch_edges
from mechattr.graph import all_edges, nodes
from mechattr.interventions import Noise
from mechattr.patching import patch
from tests.test_edges import EDGES


def test_joint_edge_ablation_invariants(gqa, tiny_task):
    graph = all_edges(gqa)
    metric = EdgeAblator(gqa, tiny_task, Noise())([set(graph), set(), set(graph) - {EDGES[0]}, set(graph) - {EDGES[3]}])
    single = patch_edges(gqa, tiny_task, [EDGES[0], EDGES[3]], Noise())
    torch.testing.assert_close(metric[0], single.clean)  # nothing ablated: the clean run
    torch.testing.assert_close(metric[1], single.corrupt, atol=1e-5, rtol=1e-5)  # everything: the corrupted run
    torch.testing.assert_close(metric[2:], single.per_example, atol=1e-5, rtol=1e-4)  # one edge: edge patching
    assert (metric[2:] - single.clean).abs().max() > 1e-4


def test_joint_node_ablation_invariants(gqa, tiny_task):
    candidates = nodes(gqa)  # the embedding, every head and every MLP
    every = set(candidates)
    one = [candidates[0], candidates[5], candidates[-1]]
    metric = NodeAblator(gqa, tiny_task, candidates, Noise())([every, set()] + [every - {c} for c in one])
    single = patch(gqa, tiny_task, one, Noise())
    torch.testing.assert_close(metric[0], single.clean)  # nothing ablated: the clean run
    torch.testing.assert_close(metric[1], single.corrupt, atol=1e-5, rtol=1e-5)  # everything: the corrupted run
    torch.testing.assert_close(metric[2:], single.per_example, atol=1e-5, rtol=1e-4)  # one node: node patching
    assert (metric[2:] - single.clean).abs().max() > 1e-4
