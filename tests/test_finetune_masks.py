"""Masks own the right entries: checked by counting, and functionally through the model's own hooks."""

import pytest
import torch

import mechattr
from mechattr.finetune import full_masks, masks, n_trained, union
from mechattr.finetune.layouts import find_layout
from mechattr.sites import Site

ATTN = "layers.{l}._original_component.attn._original_component.{p}._original_component.{w}"
MLP = "layers.{l}._original_component.mlp._original_component.{p}._original_component.{w}"


def native(layer, proj, what="weight", block=ATTN):
    return block.format(l=layer, p=proj, w=what)


@pytest.fixture()
def model():
    return mechattr.native_model()


def capture(model, tokens, names, extra=()):
    store = {}

    def saver(name):  # keyed by the name asked for: the bridge reports some hooks under aliases
        def save(act, hook):
            store[name] = act.detach().clone()
        return save

    with torch.no_grad(), model.hooks(fwd_hooks=[(n, saver(n)) for n in names] + list(extra)):
        logits = model(tokens)
    return logits, store


def perturb(model, mask_set, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, mask in mask_set.items():
            params[name] += scale * torch.randn(params[name].shape, generator=g) * mask


def test_head_owns_its_rows_of_q_and_columns_of_o(model):
    got = masks(model, [Site("z", 1, head=2)], kv="never")
    assert set(got) == {native(1, "q"), native(1, "q", "bias"), native(1, "o")}
    q, qb, o = got[native(1, "q")], got[native(1, "q", "bias")], got[native(1, "o")]
    assert q[32:48].all() and q.sum() == 16 * 64
    assert qb[32:48].all() and qb.sum() == 16
    assert o[:, 32:48].all() and o.sum() == 64 * 16
    with_kv = masks(model, [Site("z", 1, head=2)])  # no GQA here: the head's own K/V rows
    for proj in ("k", "v"):
        assert with_kv[native(1, proj)][32:48].all() and with_kv[native(1, proj)].sum() == 16 * 64
        assert with_kv[native(1, proj, "bias")].sum() == 16


def test_head_mask_functionally(model):
    """Perturbing a q-site's W_Q entries moves only that head's queries; its W_O columns act only
    through that head's output (zeroing the head's z hides them)."""
    tokens = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(1))
    site = Site("q", 1, head=2)
    hooks = ["blocks.1.attn.hook_q", "blocks.1.attn.hook_z", "blocks.0.hook_resid_post"]
    _, before = capture(model, tokens, hooks)
    mask_set = masks(model, [site], kv="never")
    perturb(model, {k: v for k, v in mask_set.items() if "._original_component.q." in k})
    _, after = capture(model, tokens, hooks)
    moved = (after["blocks.1.attn.hook_q"] - before["blocks.1.attn.hook_q"]).abs().amax(dim=(0, 1, 3))
    assert moved[2] > 1e-2 and moved[[0, 1, 3]].max() == 0
    assert torch.equal(after["blocks.0.hook_resid_post"], before["blocks.0.hook_resid_post"])

    def kill_head(act, hook):
        act[:, :, 2] = 0
        return act

    silenced = [("blocks.1.attn.hook_z", kill_head)]
    logits, _ = capture(model, tokens, [], silenced)
    perturb(model, {native(1, "o"): mask_set[native(1, "o")]}, seed=1)
    logits_after, _ = capture(model, tokens, [], silenced)
    assert torch.equal(logits, logits_after)


def test_neuron_owns_its_input_row_bias_and_output_column(model):
    got = masks(model, [Site("neuron", 0, neuron=5)])
    fc_in, fc_in_b, fc_out = (got[native(0, p, w, MLP)] for p, w in (("fc_in", "weight"), ("fc_in", "bias"),
                                                                       ("fc_out", "weight")))
    assert len(got) == 3
    assert fc_in[5].all() and fc_in.sum() == 64
    assert fc_in_b[5] and fc_in_b.sum() == 1
    assert fc_out[:, 5].all() and fc_out.sum() == 64
    tokens = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(2))
    _, before = capture(model, tokens, ["blocks.0.mlp.hook_post"])
    perturb(model, got)
    _, after = capture(model, tokens, ["blocks.0.mlp.hook_post"])
    moved = (after["blocks.0.mlp.hook_post"] - before["blocks.0.mlp.hook_post"]).abs().amax(dim=(0, 1))
    assert moved[5] > 1e-3 and torch.cat([moved[:5], moved[6:]]).max() == 0


def test_blocks_and_embeddings(model):
    params = dict(model.named_parameters())
    attn = {n for n in params if n.startswith("layers.1._original_component.attn.")}
    mlp = {n for n in params if n.startswith("layers.1._original_component.mlp.")}
    assert len(attn) == 8 and len(mlp) == 4
    assert set(masks(model, [Site("attn_out", 1, pos=3)])) == attn
    assert set(masks(model, [Site("mlp_out", 1)])) == mlp
    both = masks(model, [Site("resid_pre", 1)])
    assert set(both) == attn | mlp and all(m.all() for m in both.values())
    assert set(masks(model, [Site("embed")])) == {"tok_embed._original_component.weight",
                                                   "pos._original_component.weight"}


def test_masks_are_unions_never_overwritten(model):
    head, block = Site("z", 1, head=2), Site("attn_out", 1)
    for order in ([head, block], [block, head]):
        got = masks(model, order)
        assert all(m.all() for m in got.values()) and len(got) == 8
    a, b = Site("z", 0, head=0), Site("neuron", 0, neuron=3)
    joint = masks(model, [a, b, a])
    separate = union(masks(model, [a]), masks(model, [b]))
    assert joint.keys() == separate.keys() and all(torch.equal(joint[k], separate[k]) for k in joint)
    assert n_trained(joint) == n_trained(masks(model, [a])) + n_trained(masks(model, [b]))
    k_and_head = masks(model, [Site("k", 0, head=1), Site("z", 0, head=1)], kv="never")
    assert k_and_head[native(0, "k")].sum() == 16 * 64  # the k site's rows survive kv="never"


def test_all_heads_and_full_masks(model):
    got = masks(model, [Site("z", 0)], kv="never")
    assert got[native(0, "q")].all() and got[native(0, "o")].all()
    assert n_trained(full_masks(model)) == sum(p.numel() for p in model.parameters())


def test_errors_name_the_problem(model):
    with pytest.raises(ValueError, match="head 9 out of range"):
        masks(model, [Site("z", 0, head=9)])
    with pytest.raises(ValueError, match="kv must be"):
        masks(model, [Site("z", 0, head=0)], kv="some")

    class Other(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Linear(2, 2)

    with pytest.raises(ValueError, match="known layouts: llama"):
        find_layout(Other())
    with pytest.raises(ValueError, match="fits model 'Other'.*gpt2 \\(gpt2; expects"):
        find_layout(Other())


def test_a_config_that_disagrees_with_the_weights_is_refused(model):
    d_mlp = model.cfg.d_mlp
    model.cfg.d_mlp += 1  # a neuron index must not address a row of some other width
    with pytest.raises(ValueError, match=f"fc_in._original_component.weight' has {d_mlp} entries along axis 0, "
                                         f"but {d_mlp + 1} neuron units of 1 need {d_mlp + 1}"):
        masks(model, [Site("neuron", 0, neuron=0)])


@pytest.mark.slow
def test_gqa_key_value_groups_on_smollm2(smollm2):
    """SmolLM2: 9 query heads share 3 key/value groups (heads 3, 4, 5 -> group 1)."""
    prefix = "model.layers.5._original_component.self_attn._original_component.{}._original_component.weight"
    q, k, v, o = (prefix.format(p) for p in ("q_proj", "k_proj", "v_proj", "o_proj"))
    got = masks(smollm2, [Site("z", 5, head=4)])
    assert set(got) == {q, k, v, o}
    assert got[q][256:320].all() and got[q].sum() == 64 * 576 and got[o][:, 256:320].all()
    for name in (k, v):
        assert got[name].shape == (192, 576) and got[name][64:128].all() and got[name].sum() == 64 * 576
    assert set(masks(smollm2, [Site("z", 5, head=4)], kv="never")) == {q, o}
    shared = masks(smollm2, [Site("z", 5, head=3), Site("z", 5, head=5)])
    assert shared[k].sum() == 64 * 576  # one group, trained once
    only_k = masks(smollm2, [Site("k", 5, head=2)])
    assert set(only_k) == {k} and only_k[k][128:192].all() and only_k[k].sum() == 64 * 576

    # The group's W_K rows move group 1's keys only, and so only heads 3, 4, 5's attention patterns.
    model = mechattr.load_model("smollm2-135m")
    tokens = model.to_tokens("When Mary and John went to the store, John gave a drink to")
    hooks = ["blocks.5.attn.hook_k", "blocks.5.attn.hook_pattern"]
    _, before = capture(model, tokens, hooks)
    perturb(model, {k: got[k]}, scale=0.05)
    _, after = capture(model, tokens, hooks)
    keys = (after[hooks[0]] - before[hooks[0]]).abs().amax(dim=(0, 1, 3))
    assert keys[1] > 1e-3 and keys[0] == 0 and keys[2] == 0
    pattern = (after[hooks[1]] - before[hooks[1]]).abs().amax(dim=(0, 2, 3))
    assert (pattern[3:6] > 1e-6).all() and pattern[:3].max() == 0 and pattern[6:].max() == 0


@pytest.mark.slow
def test_training_a_gqa_group_on_smollm2_leaves_everything_else_bit_identical(smollm2):
    from mechattr.finetune import TrainConfig, train

    model = mechattr.load_model("smollm2-135m")  # a copy: the shared fixture stays untrained
    sites = [Site("z", 5, head=3), Site("z", 5, head=5)]
    mask_set = masks(model, sites)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    task = mechattr.tasks.ioi(smollm2, n=4, seed=1)
    train(model, mask_set, task, TrainConfig(steps=2, batch_size=4, lr=1e-3, weight_decay=0.1), progress=False)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == set(mask_set)
    for name, mask in mask_set.items():
        after = dict(model.named_parameters())[name]
        assert torch.equal(after[~mask], before[name][~mask]), name
    k = "model.layers.5._original_component.self_attn._original_component.k_proj._original_component.weight"
    moved_rows = (dict(model.named_parameters())[k] != before[k]).any(-1).nonzero().flatten()
    assert moved_rows.min() >= 64 and moved_rows.max() < 128  # group 1 only
