"""The graph of nodes and edges (`mechattr.graph`): which edges exist and which cannot, and that the
nodes' writes are the whole residual stream."""

import pytest
import torch

from mechattr.graph import Edge, all_edges, contributions, nodes
from mechattr.runs import gradient_pass
from mechattr.sites import Site


def test_edges_are_validated(gqa):
    with pytest.raises(ValueError, match="writes after the receiver reads"):
        Edge(Site("z", 1, head=0), Site("q", 1, head=0))
    with pytest.raises(ValueError, match="receiver z"):
        Edge(Site("embed"), Site("z", 1, head=0))
    n_senders = 1 + 3 * 5
    per_layer = [(1 + 5 * layer) * (4 + 2 + 2) + (1 + 5 * layer + 4) for layer in range(3)]
    assert len(all_edges(gqa)) == sum(per_layer) + n_senders


def test_the_senders_writes_add_up_to_the_residual_stream(gqa, tiny_task):
    """nodes() is every sender: their writes (`contributions`), plus what every run shares and no sender
    writes (the positional embedding, the attention output biases), are the whole residual stream after
    the last block."""
    send = nodes(gqa)
    assert send[0] == Site("embed") and len(send) == 1 + 3 * (4 + 1) and send[-1] == Site("mlp_out", 2)
    last = "blocks.2.hook_resid_post"
    acts = gradient_pass(gqa, tiny_task.clean, sorted({s.hook for s in send} | {last, "hook_pos_embed"}), None).acts
    shared = acts["hook_pos_embed"] + sum(gqa.blocks[layer].attn.b_O for layer in range(3))
    total = contributions(gqa, send, acts).sum(0) + shared
    assert acts[last].abs().max() > 1
    torch.testing.assert_close(total, acts[last], atol=1e-5, rtol=1e-5)
