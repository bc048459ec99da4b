"""Edges and circuits: exact edge patching against hand-written hooks, edge attribution, joint ablation
invariants, and discovery of a planted circuit."""

import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402
import torch  # noqa: E402

import mechattr  # noqa: E402
from mechattr.attribution import attribute, gradient_pass  # noqa: E402
from mechattr.verification import verify  # noqa: E402
from mechattr.attribution_plots import plot_circuit, plot_estimate_vs_exact, plot_faithfulness  # noqa: E402
from mechattr.circuits import Circuit, discover, edge_faithfulness, node_faithfulness, nodes  # noqa: E402
from mechattr.edges import Edge, EdgeAblator, all_edges, attribute_edges, patch_edges  # noqa: E402
from mechattr.interventions import Noise  # noqa: E402
from mechattr.sites import Site  # noqa: E402
from tests.test_attribution import bridge  # noqa: E402


@pytest.fixture(scope="module")
def gqa():
    return bridge(n_layers=3, n_key_value_heads=2, seed=1)


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
    return task.metric(logits, task.answer, task.wrong, None)


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


def test_edges_are_validated(gqa):
    with pytest.raises(ValueError, match="writes after the receiver reads"):
        Edge(Site("z", 1, head=0), Site("q", 1, head=0))
    with pytest.raises(ValueError, match="receiver z"):
        Edge(Site("embed"), Site("z", 1, head=0))
    n_senders = 1 + 3 * 5
    per_layer = [(1 + 5 * layer) * (4 + 2 + 2) + (1 + 5 * layer + 4) for layer in range(3)]
    assert len(all_edges(gqa)) == sum(per_layer) + n_senders


def test_joint_edge_ablation_invariants(gqa, tiny_task):
    graph = all_edges(gqa)
    metric = EdgeAblator(gqa, tiny_task, Noise())([set(graph), set(), set(graph) - {EDGES[0]}, set(graph) - {EDGES[3]}])
    single = patch_edges(gqa, tiny_task, [EDGES[0], EDGES[3]], Noise())
    torch.testing.assert_close(metric[0], single.clean)  # nothing ablated: the clean run
    torch.testing.assert_close(metric[1], single.corrupt, atol=1e-5, rtol=1e-5)  # everything: the corrupted run
    torch.testing.assert_close(metric[2:], single.per_example, atol=1e-5, rtol=1e-4)  # one edge: edge patching
    assert (metric[2:] - single.clean).abs().max() > 1e-4


def test_node_faithfulness_spans_zero_to_one(gqa, tiny_task):
    everything = set(nodes(gqa))
    low, high, middle = node_faithfulness(gqa, tiny_task, [set(), everything, everything - {Site("embed")}])
    assert low == pytest.approx(0.0, abs=1e-5) and high == pytest.approx(1.0, abs=1e-6)
    exact = mechattr.patch(gqa, tiny_task, [Site("embed")], Noise())
    gap = exact.clean_metric - exact.corrupt_metric
    assert middle == pytest.approx((exact.values[0].item() - exact.corrupt_metric) / gap, abs=1e-4)


def planted_model():
    """2 layers, no LayerNorm, zero MLPs. Head 2 of layer 1 copies the token at position 1 to the last
    position (queries and keys read the positional embedding, values the token); head 1 of layer 0 is
    a distractor that attends by token and writes only into dimensions nothing reads."""
    model = bridge(normalization_type=None, seed=0)
    params = dict(model.named_parameters())

    def weight(name):
        return params[name + "._original_component.weight"]

    def attn(layer, part):
        return weight(f"layers.{layer}._original_component.attn._original_component.{part}")

    head = slice(32, 48)  # head 2's rows of q/k/v and columns of o
    with torch.no_grad():
        for p in params.values():
            p.zero_()
        weight("tok_embed")[:, :50] = torch.eye(50)
        weight("pos")[:14, 50:64] = torch.eye(14)
        weight("head")[:, :50] = torch.eye(50)
        attn(1, "q")[32, 56] = 10.0  # the last position (6) ...
        attn(1, "k")[32, 51] = 10.0  # ... attends to position 1
        attn(1, "v")[head, :16] = torch.eye(16)
        attn(1, "o")[:16, head] = 5 * torch.eye(16)
        for part in "qkv":
            attn(0, part)[16:32, :16] = torch.eye(16)
        attn(0, "o")[57:64, 16:23] = torch.eye(7)
    return model


@pytest.fixture(scope="module")
def planted():
    g = torch.Generator().manual_seed(0)
    names = torch.randperm(16, generator=g)[:12].reshape(6, 2)
    filler = torch.randint(20, 36, (6, 4), generator=g)
    clean = torch.cat([torch.full((6, 1), 40), names[:, :1], filler, torch.full((6, 1), 45)], 1)
    corrupt = clean.clone()
    corrupt[:, 1] = names[:, 1]
    return planted_model(), mechattr.Task(clean, corrupt, answer=names[:, 0], wrong=names[:, 1], name="planted")


def test_discovery_finds_the_planted_nodes(planted, tmp_path):
    model, task = planted
    circuit = discover(model, task, "node", method="atp*")
    assert set(circuit.nodes) == {Site("embed"), Site("z", 1, head=2)}
    assert circuit.faithfulness == pytest.approx(1.0, abs=1e-3)
    assert circuit.curve[0] == pytest.approx(0.0, abs=1e-6) and circuit.curve[-1] == pytest.approx(1.0)
    assert set(circuit.ranking[:2]) == set(circuit.nodes) and 0.5 < circuit.auc <= 1.0
    loaded = Circuit.load(circuit.save(tmp_path))
    assert loaded.nodes == circuit.nodes and loaded.ranking == circuit.ranking and loaded.auc == circuit.auc


def test_discovery_finds_the_planted_edges(planted, tmp_path):
    model, task = planted
    circuit = discover(model, task, "edge", points=10)
    assert set(circuit.edges) == {Edge(Site("embed"), Site("v", 1, head=2)),
                                  Edge(Site("z", 1, head=2), Site("resid_post", 1))}
    assert circuit.faithfulness == pytest.approx(1.0, abs=1e-3)
    assert edge_faithfulness(model, task, [set(circuit.edges)]) == pytest.approx([circuit.faithfulness])
    assert Circuit.load(circuit.save(tmp_path)).edges == circuit.edges


def test_plots_draw_what_they_show(planted, gqa, tiny_task):
    model, task = planted
    circuit = discover(model, task, "edge", points=6)
    ax = plot_circuit(circuit)
    assert len(ax.collections) == 3  # embed, head 1.2 (its v input and its output), logits
    assert sorted(t.get_text() for t in ax.texts if t.get_text()) == ["1.2", "emb", "out"]
    assert len([t for t in ax.texts if not t.get_text()]) == 2  # one arrow per edge
    ax = plot_faithfulness(circuit)
    assert list(ax.lines[0].get_ydata()) == list(circuit.curve)
    checked = verify(gqa, tiny_task, attribute(gqa, tiny_task, mechattr.grid(gqa, "z", tiny_task.n_pos)), 4, 4)
    ax = plot_estimate_vs_exact(checked)
    assert sum(len(c.get_offsets()) for c in ax.collections) == 8
    assert list(ax.lines[0].get_xdata()) == list(ax.lines[0].get_ydata())  # the identity line


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
