"""Attribution estimates against exact patching and hand-written gradients."""

import pytest
import torch
from scipy import stats

import mechattr
from mechattr.attribution import attribute
from mechattr.runs import gradient_pass
from mechattr.interventions import Mean, Noise, Zero
from tests.bridges import bridge
from mechattr.sites import Site, grid


@pytest.fixture(scope="module")
def attn_only():
    """No LayerNorm, no MLPs: the metric is linear in the last layer's z, v, attn_out and pattern.
    Attention weights are scaled up so that patterns, and patching them, matter."""
    model = bridge(normalization_type=None, attn_only=True, n_key_value_heads=2, seed=2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q._original_component.weight", "k._original_component.weight")):
                p.mul_(6.0)
            elif name.endswith(("v._original_component.weight", "o._original_component.weight")):
                p.mul_(4.0)
    return model


def _assert_close_nontrivial(estimate, exact, atol=1e-5):
    assert exact.effect.abs().max() > 1e-3  # the comparison must not pass vacuously
    torch.testing.assert_close(estimate.per_example, exact.per_example, atol=atol, rtol=1e-4)


def test_atp_equals_patching_where_the_metric_is_linear(tiny_task):
    model = bridge(normalization_type=None, seed=3)
    sites = grid(model, "mlp_out", tiny_task.n_pos, layers=[1]).sites + grid(model, "resid_post", tiny_task.n_pos,
                                                                           layers=[1]).sites
    exact = mechattr.patch(model, tiny_task, sites)
    estimate = attribute(model, tiny_task, sites, "atp")
    _assert_close_nontrivial(estimate, exact)
    assert estimate.method == "atp" and exact.method == "patch"
    torch.testing.assert_close(estimate.clean, exact.clean)
    torch.testing.assert_close(estimate.corrupt, exact.corrupt)


@pytest.mark.parametrize("kind", ["z", "v", "attn_out", "pattern"])
def test_atp_is_exact_for_the_last_attention_layer_without_layernorm(attn_only, tiny_task, kind):
    sites = grid(attn_only, kind, tiny_task.n_pos, layers=[1], per_position=True)
    _assert_close_nontrivial(attribute(attn_only, tiny_task, sites, "atp"), mechattr.patch(attn_only, tiny_task, sites))


@pytest.mark.parametrize("kind", ["q", "k"])
def test_qk_fix_is_exact_where_the_metric_is_linear_in_the_pattern(attn_only, tiny_task, kind):
    """The last layer's output is linear in its pattern, so recomputing the softmax exactly (AtP*'s QK fix)
    leaves no error for its query and key sites, per position and at all positions, on a GQA model."""
    sites = list(grid(attn_only, kind, tiny_task.n_pos, layers=[1], per_position=True).sites)
    sites += list(grid(attn_only, kind, tiny_task.n_pos, layers=[1]).sites)
    exact = mechattr.patch(attn_only, tiny_task, sites)
    fixed = attribute(attn_only, tiny_task, sites, "atp*", graddrop=False)
    _assert_close_nontrivial(fixed, exact)
    plain = attribute(attn_only, tiny_task, sites, "atp")
    assert (plain.per_example - exact.per_example).abs().max() > 10 * (fixed.per_example - exact.per_example).abs().max()


def test_qk_fix_with_mean_ablation(attn_only, tiny_task):
    sites = grid(attn_only, "k", tiny_task.n_pos, layers=[1], per_position=True)
    exact = mechattr.patch(attn_only, tiny_task, sites, Mean())
    _assert_close_nontrivial(attribute(attn_only, tiny_task, sites, "atp*", graddrop=False, intervention=Mean()),
                             exact)


@pytest.mark.parametrize("kind", ["z", "q", "k", "v", "resid_pre", "mlp_out", "neuron", "embed"])
def test_ig_with_one_step_is_atp(gqa, tiny_task, kind):
    sites = grid(gqa, kind, tiny_task.n_pos, per_position=kind != "neuron")
    one = attribute(gqa, tiny_task, sites, "ig", steps=1)
    torch.testing.assert_close(one.per_example, attribute(gqa, tiny_task, sites, "atp").per_example)
    assert one.method == "ig" and one.meta["steps"] == 1


def test_ig_is_complete_on_the_embedding(gqa, tiny_task):
    """Integrated gradients sum to the total change along the path: patching every embedding restores
    the clean metric, up to the Riemann sum's error."""
    estimate = attribute(gqa, tiny_task, [Site("embed")], "ig", steps=64)
    gap = (estimate.clean - estimate.corrupt).abs().max()
    torch.testing.assert_close(estimate.per_example[0], estimate.clean, atol=float(0.05 * gap), rtol=0)
    atp_error = (attribute(gqa, tiny_task, [Site("embed")], "atp").per_example[0] - estimate.clean).abs().max()
    assert (estimate.per_example[0] - estimate.clean).abs().max() < atp_error


def _gradient_with_block_dropped(model, task, site, dropped):
    """Reference GradDrop gradient: the forward detaches block `dropped`'s attention and MLP outputs."""
    cut = lambda act, hook: act.detach()  # noqa: E731
    names = [f"blocks.{dropped}.hook_attn_out", f"blocks.{dropped}.hook_mlp_out"]
    probe = {}

    def add_probe(act, hook):
        probe["p"] = torch.zeros_like(act, requires_grad=True)
        return act + probe["p"]

    reference = gradient_pass(model, task.clean, [], None).logits.log_softmax(-1)
    with torch.enable_grad(), model.hooks(fwd_hooks=[(n, cut) for n in names] + [(site.hook, add_probe)]):
        logits = model(task.corrupt)[:, -1]
        value = task.metric(logits, task.answer, task.wrong, reference).sum()
        (grad,) = torch.autograd.grad(value, probe["p"])
    return grad


def test_graddrop_matches_detached_forwards(gqa, tiny_task):
    site = Site("z", 0, head=1)
    acts = {r: gradient_pass(gqa, tiny_task.tokens(r), [site.hook], None).acts[site.hook] for r in ("clean", "corrupt")}
    delta = (acts["clean"] - acts["corrupt"])[:, :, 1]
    magnitudes = [(delta * _gradient_with_block_dropped(gqa, tiny_task, site, l)[:, :, 1]).sum((1, 2)).abs()
                  for l in (1, 2)]
    expected = torch.stack(magnitudes).sum(0) / 2  # layers other than the site's own, over L - 1 = 2
    star = attribute(gqa, tiny_task, [site], "atp*")
    plain = attribute(gqa, tiny_task, [site], "atp")
    torch.testing.assert_close((star.per_example - star.corrupt)[0], plain.per_example[0].sub(plain.corrupt).sign()
                               * expected, atol=1e-5, rtol=1e-4)


def test_graddrop_leaves_last_layer_sites_as_atp(gqa, tiny_task):
    sites = grid(gqa, "z", tiny_task.n_pos, layers=[2])
    torch.testing.assert_close(attribute(gqa, tiny_task, sites, "atp*").per_example,
                               attribute(gqa, tiny_task, sites, "atp").per_example)


def test_noise_direction_estimates_the_clean_run(attn_only, tiny_task):
    sites = grid(attn_only, "z", tiny_task.n_pos, layers=[1])
    estimate = attribute(attn_only, tiny_task, sites, "atp", intervention=Noise())
    assert estimate.base_run == "clean" and estimate.intervention == "noise"
    _assert_close_nontrivial(estimate, mechattr.patch(attn_only, tiny_task, sites, Noise()))


def test_errors_name_the_site_and_the_methods_that_can(tiny_task):
    capped = bridge(attn_scores_soft_cap=5.0)
    with pytest.raises(ValueError, match=r"atp\* cannot estimate site q\[L1 H0\].*'atp' or method='ig'"):
        attribute(capped, tiny_task, [Site("q", 1, head=0)], "atp*")
    attribute(capped, tiny_task, [Site("q", 1, head=0)], "atp")  # the plain estimate still runs
    with pytest.raises(ValueError, match="unknown attribution method 'eap'; valid: atp, atp\\*, ig"):
        attribute(capped, tiny_task, [Site("z", 0)], "eap")
    with pytest.raises(ValueError, match="'ig'.*not 'zero'; use 'atp' or 'atp\\*'"):
        attribute(capped, tiny_task, [Site("z", 0)], "ig", intervention=Zero())
    with pytest.raises(ValueError, match="out of range"):
        attribute(capped, tiny_task, [Site("z", 5, head=0)])


@pytest.mark.slow
def test_gqa_sites_on_smollm2(smollm2, smollm2_ioi):
    """k and v sites index SmolLM2's 3 key/value heads; the rotary QK fix rebuilds its pattern, and
    estimates track exact patching on the last layers."""
    task = smollm2_ioi.subset(range(4))
    sites = [Site(kind, layer, head=h) for kind in "kv" for layer in (27, 29) for h in range(3)]
    sites += [Site("q", 29, head=h) for h in range(9)] + [Site("k", 29, pos=p, head=0) for p in range(task.n_pos)]
    exact = mechattr.patch(smollm2, task, sites)
    atp = attribute(smollm2, task, sites, "atp")
    torch.testing.assert_close(attribute(smollm2, task, sites, "ig", steps=1).per_example, atp.per_example)
    star = attribute(smollm2, task, sites, "atp*", graddrop=False)
    for estimate in (atp, star):
        assert stats.pearsonr(estimate.effect, exact.effect)[0] > 0.8
    qk = [i for i, s in enumerate(sites) if s.kind in "qk" and s.layer == 29]
    error = lambda e: (e.effect[qk] - exact.effect[qk]).abs().sum()  # noqa: E731
    assert error(star) < error(atp)
