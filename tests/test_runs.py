"""The run layer: both unpatched runs of a task, against hand-written forwards; node and edge results
sharing one `normalized`; runs shared between consumers give each its own call's numbers, and record
only what is missing."""

import pytest
import torch

from mechattr.attribution import attribute
from mechattr.circuits import discover
from mechattr.edges import attribute_edges, patch_edges
from mechattr.graph import Edge
from mechattr.interventions import Denoise, Noise, Zero
from mechattr.patching import patch
from mechattr.runs import other_run, row_metric, unpatched
from mechattr.sites import Site, grid
from mechattr.verification import verify
from tests.reference import logit_diff


@pytest.mark.parametrize("intervention", [Denoise(), Noise(), Zero()], ids=lambda i: i.name)
def test_runs_hold_both_runs_activations_and_metrics(gqa, tiny_task, intervention):
    hook = "blocks.1.attn.hook_z"
    for block_inputs in (False, True):
        runs = unpatched(gqa, tiny_task, intervention, [hook], block_inputs=block_inputs)
        assert runs.source_run == other_run(intervention.base_run) != runs.base_run == intervention.base_run
        for run, tokens in (("clean", tiny_task.clean), ("corrupt", tiny_task.corrupt)):
            torch.testing.assert_close(runs.metrics[run], logit_diff(gqa, tokens, tiny_task.answer, tiny_task.wrong))
            _, cache = gqa.run_with_cache(tokens, names_filter=lambda n: n == hook)
            recorded = runs.base if run == runs.base_run else runs.source
            torch.testing.assert_close(recorded.acts[hook], cache[hook])
        torch.testing.assert_close(runs.reference, gqa(tiny_task.clean)[:, -1].log_softmax(-1), atol=1e-5, rtol=0)


def test_row_metric_reads_each_stacked_copy(gqa, tiny_task):
    runs = unpatched(gqa, tiny_task, Denoise())
    logits = torch.randn(3 * tiny_task.n_examples, 50, generator=torch.Generator().manual_seed(0))
    per_row = row_metric(tiny_task, runs.reference)(logits)
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


class _Forwards:
    """Counts the model's own forward passes (a resumed run calls its blocks, not the model)."""

    def __init__(self, model):
        self.calls = 0
        self.handle = model.register_forward_pre_hook(self.count)

    def count(self, module, args):
        self.calls += 1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def test_shared_runs_give_every_consumer_its_own_call_s_numbers(gqa, tiny_task):
    z, mlp = grid(gqa, "z"), grid(gqa, "mlp_out", tiny_task.n_pos)
    edges = [Edge(Site("z", 0, head=1), Site("mlp_out", 1)), Edge(Site("mlp_out", 0), Site("resid_post", 2))]
    for intervention in (Denoise(), Noise()):
        runs = unpatched(gqa, tiny_task, intervention)
        shared = [patch(runs, z), attribute(runs, z, "atp"), patch(runs, mlp), attribute(runs, sites=mlp, method="ig"),
                  patch_edges(runs, edges), attribute_edges(runs, edges, "atp")]
        alone = [patch(gqa, tiny_task, z, intervention), attribute(gqa, tiny_task, z, "atp", intervention=intervention),
                 patch(gqa, tiny_task, mlp, intervention),
                 attribute(gqa, tiny_task, mlp, "ig", intervention=intervention),
                 patch_edges(gqa, tiny_task, edges, intervention),
                 attribute_edges(gqa, tiny_task, edges, "atp", intervention=intervention)]
        for a, b in zip(shared, alone):
            assert a.intervention == b.intervention == intervention.name and a.method == b.method
            torch.testing.assert_close(a.per_example, b.per_example, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close((a.clean, a.corrupt), (b.clean, b.corrupt), atol=1e-6, rtol=0)
        check = verify(runs, shared[1], top=3, sample=2)
        torch.testing.assert_close(check.exact.per_example, verify(gqa, tiny_task, shared[1], 3, 2).exact.per_example,
                                   atol=1e-5, rtol=1e-5)
    circuit = discover(unpatched(gqa, tiny_task, Noise()), prune=False)
    alone = discover(gqa, tiny_task, prune=False)
    assert circuit.ranking == alone.ranking
    assert circuit.curve == pytest.approx(alone.curve, abs=1e-5)


def test_runs_run_nothing_until_asked_and_each_missing_hook_once(gqa, tiny_task):
    patch(gqa, tiny_task, [Site("z", 1, head=0)])  # the resumed path's proof of this model, done once
    z1, z2 = grid(gqa, "z", layers=[1]), grid(gqa, "z", layers=[2])
    with _Forwards(gqa) as forwards:
        runs = unpatched(gqa, tiny_task, Denoise())
        assert forwards.calls == 0
        patch(runs, z1)
        assert forwards.calls == 2  # the base run (recording the block inputs too) and the source run
        patch(runs, z1)
        assert forwards.calls == 2  # everything recorded: only resumed runs, no forward of the model
        patch(runs, z2)
        assert forwards.calls == 4  # one hook more: one forward of each run
        attribute(runs, z1, "atp")
        assert forwards.calls == 5  # the gradients: a pass of their own
    with _Forwards(gqa) as forwards:
        runs = unpatched(gqa, tiny_task, Denoise())
        attribute(runs, z1, "atp")
        assert forwards.calls == 2  # the source run, and the gradient pass that is the base run too
        patch(runs, z1)
        assert forwards.calls == 3  # the base run again, for the block inputs patched runs resume from


def test_each_call_form_refuses_what_the_other_provides(gqa, tiny_task):
    runs = unpatched(gqa, tiny_task, Noise())
    sites = [Site("z", 1, head=0)]
    with pytest.raises(TypeError, match=r"patch\(runs, \.\.\.\): the runs carry the intervention \(noise\)"):
        patch(runs, sites, intervention=Denoise())
    with pytest.raises(TypeError, match=r"patch\(runs, units\): the runs carry the task"):
        patch(runs, tiny_task, sites)
    with pytest.raises(TypeError, match=r"patch\(model, task, \.\.\.\) needs a Task second, got list"):
        patch(gqa, sites)
    with pytest.raises(TypeError, match=r"patch\(model, task, sites\): the sites are missing"):
        patch(gqa, tiny_task)
    estimate = attribute(gqa, tiny_task, grid(gqa, "z"), "atp")  # under Denoise
    with pytest.raises(ValueError, match=r"the estimate is under Denoise\(\) but the runs under Noise\(\)"):
        verify(runs, estimate)
