"""Circuits: faithfulness of node and edge circuits, discovery of a planted circuit, and the plots."""

import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402
import torch  # noqa: E402

import mechattr  # noqa: E402
from mechattr.attribution import attribute  # noqa: E402
from mechattr.verification import verify  # noqa: E402
from mechattr.plots.estimates import plot_circuit, plot_estimate_vs_exact, plot_faithfulness  # noqa: E402
from mechattr.circuits import Circuit, discover, edge_faithfulness, node_faithfulness  # noqa: E402
from mechattr.faithfulness import faithfulness  # noqa: E402
from mechattr.graph import Edge, nodes  # noqa: E402
from mechattr.interventions import Noise  # noqa: E402
from mechattr.sites import Site  # noqa: E402
from tests.bridges import bridge  # noqa: E402


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


def test_discovery_reports_its_rankings_mib_faithfulness(planted, tmp_path):
    """`discover(mib=...)` shares its ablator with the faithfulness function and equals it run alone."""
    model, task = planted
    circuit = discover(model, task, "node", method="atp", mib=2, prune=False)
    alone = faithfulness(model, task, attribute(model, task, nodes(model), "atp", intervention=Noise()), random=2)
    mib = Circuit.load(circuit.save(tmp_path)).meta["mib"]
    assert mib["cpr"] == pytest.approx(alone.cpr) and mib["cmd"] == pytest.approx(alone.cmd)
    assert mib["cpr_curve"] == pytest.approx(list(alone.cpr_curve)) and mib["random_cpr"] == pytest.approx(alone.random_cpr)
    assert mib["cpr"] > mib["random_cpr"][0]  # the planted head first beats chance
    ax = plot_faithfulness(circuit)
    assert [list(line.get_ydata()) for line in ax.lines[2:]] == [list(mib["cpr_curve"]), list(mib["random_curve"])]
    assert f"MIB CPR {mib['cpr']:.2f}" in ax.get_title()


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
