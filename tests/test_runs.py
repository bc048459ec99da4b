"""The run layer: both unpatched runs of a task, against hand-written forwards; node and edge results
sharing one `normalized`."""

import pytest
import torch

from mechattr.edges import patch_edges
from mechattr.graph import Edge
from mechattr.interventions import Denoise, Noise, Zero
from mechattr.patching import patch
from mechattr.runs import other_run, readout, unpatched
from mechattr.sites import Site
from tests.reference import logit_diff


@pytest.mark.parametrize("intervention", [Denoise(), Noise(), Zero()], ids=lambda i: i.name)
def test_runs_hold_both_runs_activations_and_metrics(gqa, tiny_task, intervention):
    hook = "blocks.1.attn.hook_z"
    for resumable in (False, True):
        runs = unpatched(gqa, tiny_task, intervention, [hook], resumable=resumable)
        assert runs.source_run == other_run(intervention.base_run) != runs.base_run == intervention.base_run
        for run, tokens in (("clean", tiny_task.clean), ("corrupt", tiny_task.corrupt)):
            torch.testing.assert_close(runs.metrics[run], logit_diff(gqa, tokens, tiny_task.answer, tiny_task.wrong))
            _, cache = gqa.run_with_cache(tokens, names_filter=lambda n: n == hook)
            recorded = runs.base if run == runs.base_run else runs.source
            torch.testing.assert_close(recorded.acts[hook], cache[hook])
        torch.testing.assert_close(runs.reference, gqa(tiny_task.clean)[:, -1].log_softmax(-1), atol=1e-5, rtol=0)


def test_readout_reads_each_stacked_copy(gqa, tiny_task):
    runs = unpatched(gqa, tiny_task, Denoise())
    logits = torch.randn(3 * tiny_task.n_examples, 50, generator=torch.Generator().manual_seed(0))
    per_row = readout(tiny_task, runs.reference)(logits)
    for copy in range(3):
        rows = logits[copy * 4:(copy + 1) * 4]
        expected = rows[torch.arange(4), tiny_task.answer] - rows[torch.arange(4), tiny_task.wrong]
        torch.testing.assert_close(per_row[copy * 4:(copy + 1) * 4], expected)


def test_runs_refuse_a_run_name_they_do_not_have():
    with pytest.raises(ValueError, match="'clean' or 'corrupt', got 'base'"):
        other_run("base")


@pytest.mark.parametrize("intervention", [Denoise(), Noise()], ids=lambda i: i.name)
def test_node_and_edge_results_agree_on_normalized(gqa, tiny_task, intervention):
    """The last MLP writes only into the logits, so patching it and patching its edge into the logits are one
    intervention: every number, `normalized` included, must agree."""
    last = gqa.cfg.n_layers - 1
    node = patch(gqa, tiny_task, [Site("mlp_out", last)], intervention)
    edge = patch_edges(gqa, tiny_task, [Edge(Site("mlp_out", last), Site("resid_post", last))], intervention)
    assert edge.kind == "edge" and node.base_run == edge.base_run == intervention.base_run
    torch.testing.assert_close(edge.per_example, node.per_example, atol=1e-5, rtol=0)
    torch.testing.assert_close(edge.normalized, node.normalized, atol=1e-5, rtol=1e-5)
    gap = float(node.clean.mean() - node.corrupt.mean())
    torch.testing.assert_close(edge.normalized, (edge.values - edge.corrupt.mean()) / gap, atol=1e-5, rtol=1e-5)
    assert abs(float(edge.normalized[0])) > 1e-3  # the MLP matters, so the check above can fail


def test_edge_effects_save_load_and_statistics(gqa, tiny_task, tmp_path):
    edges = [Edge(Site("embed"), Site("q", 1, head=0)), Edge(Site("z", 0, head=1), Site("mlp_out", 1))]
    effects = patch_edges(gqa, tiny_task, edges)
    loaded = type(effects).load(effects.save(tmp_path))
    assert loaded.edges == tuple(edges)
    torch.testing.assert_close(loaded.per_example, effects.per_example)
    assert loaded.significant().shape == (2,) and loaded.pvalues.shape == (2,)
    assert [str(e) for e in effects.to_dataframe()["sender"]] == [str(e.sender) for e in edges]
    with pytest.raises(ValueError, match="'z' sites, not edges"):
        patch(gqa, tiny_task, [Site("z", 0, head=1)]).edges


def test_zero_gap_normalized_names_the_task(gqa, tiny_task):
    same = type(tiny_task)(tiny_task.clean, tiny_task.clean, tiny_task.answer, tiny_task.wrong, name="same")
    effects = patch(gqa, same, [Site("mlp_out", 0)])
    with pytest.raises(ValueError, match="task 'same': clean and corrupted metrics are equal"):
        effects.normalized
