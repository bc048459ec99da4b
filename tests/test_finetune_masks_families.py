"""Precision masks on every architecture family, checked through each model's own hooks.

For every query head, key/value group and MLP neuron of one layer, the entries its mask selects are
perturbed and the layer's hooks must show that only that unit moved: its query/key/value/z (input side),
or, with the unit's output zeroed, nothing at all (output side). The masks of all units of a role must
tile their parameters exactly (disjoint, covering). Together these pin each mask to its unit's entries
without reading the layout code. Training with a mask must leave every other entry bit-identical.
"""

import pytest
import torch

import mechattr
from mechattr import families
from mechattr.finetune import TrainConfig, Text, full_masks, masks, train, union
from mechattr.finetune.layouts import SUPPORTED_FAMILIES, find_layout
from mechattr.sites import Site, available_kinds

LAYER = 1  # the layer whose units are checked (the last of the tiny models)
VOCAB = families.VOCAB
TOKENS = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(3))
TOL = 1e-5  # float32 differences between batch sizes; a leaked perturbation moves activations by ~0.1
# OLMo-2 normalises all heads' queries (keys) together: a head's W_Q (W_K) rows move every head's
# attention through the shared RMS, so there they are checked on the projection output (hook_q /
# hook_k, read before the norm) only; the rest of the mask (per-channel norm weights, W_O) must still
# move only its own heads' z.
COUPLED = {"olmo2": ("q_proj", "k_proj")}
def d_mlp_seen(model):
    """The MLP width the model's own hook shows (TL 4.3 reads OPT's config d_mlp as 4 * d_model)."""
    return run(model, [f"blocks.{LAYER}.mlp.hook_post"])[f"blocks.{LAYER}.mlp.hook_post"].shape[-1]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {name: families.build(name, root / name) for name in SUPPORTED_FAMILIES}


@pytest.fixture(scope="module", params=SUPPORTED_FAMILIES)
def family(request, folders):
    return request.param, mechattr.load_model(str(folders[request.param]))


def test_every_booting_family_has_a_layout():
    booting = {name for name, f in families.FAMILIES.items() if f.boots}
    assert booting <= set(SUPPORTED_FAMILIES), booting - set(SUPPORTED_FAMILIES)


def run(model, names, silence=None, groups=()):
    """{hook name: activation [copy, batch, ...]} of one forward of 1 + len(groups) stacked copies of
    TOKENS; copy j + 1 has the units groups[j] zeroed at hook `silence` ([b, pos, head, d] or
    [b, pos, neuron])."""
    copies, store = 1 + len(groups), {}

    def silencer(act, hook):
        act = act.clone().unflatten(0, (copies, -1))
        for j, units in enumerate(groups):
            act[j + 1, :, :, list(units)] = 0
        return act.flatten(0, 1)

    def saver(name):
        def save(act, hook):
            store[name] = act.detach().clone().unflatten(0, (copies, -1))
        return save

    edits = [(silence, silencer)] if groups else []
    with torch.no_grad(), model.hooks(fwd_hooks=[*edits, *[(n, saver(n)) for n in names]]):
        model(TOKENS.repeat(copies, 1))
    return store


class Perturbed:
    """Adds noise at the masked entries; restores the exact original values on exit."""

    def __init__(self, model, mask_set, seed=0):
        self.params, self.mask_set, self.seed = dict(model.named_parameters()), mask_set, seed

    def __enter__(self):
        g = torch.Generator().manual_seed(self.seed)
        self.saved = {n: self.params[n].detach().clone() for n in self.mask_set}
        with torch.no_grad():
            for name, mask in self.mask_set.items():
                self.params[name] += torch.randn(mask.shape, generator=g) * mask

    def __exit__(self, *exc):
        with torch.no_grad():
            for name, value in self.saved.items():
                self.params[name].copy_(value)


def moved(before, after):
    """Largest change per unit of [batch, pos, unit, ...] activations."""
    return (after - before).abs().movedim(2, 0).flatten(1).amax(1)


def assert_only(change, owners, what):
    """`change` (per unit) is clearly non-zero at the `owners` and within TOL elsewhere."""
    others = torch.ones_like(change, dtype=torch.bool)
    others[owners] = False
    assert change[owners].min() > 100 * TOL, f"{what}: the owners {owners} did not move: {change.tolist()}"
    assert not others.any() or change[others].max() <= TOL, f"{what}: other units moved: {change.tolist()}"


def part(mask_set, names, keep):
    """The masks of the parameters whose name contains one of `names` (keep=True) or none (keep=False)."""
    return {n: m for n, m in mask_set.items() if any(k in n for k in names) == keep}


def assert_tiles(mask_sets):
    """The masks are disjoint and together cover every entry of every parameter they touch."""
    joint = union(*mask_sets)
    count = {name: sum(int(m[name].sum()) for m in mask_sets if name in m) for name in joint}
    for name, mask in joint.items():
        assert mask.all(), f"{name}: entries owned by no unit"
        assert count[name] == mask.numel(), f"{name}: entries owned by two units"


def test_every_family_has_a_layout(family):
    name, model = family
    assert name in find_layout(model).families


def perturbed_runs(model, mask_set, coupled, seed, *args):
    """`run(model, *args)` with the whole mask perturbed, and with only its part outside the `coupled`
    parameters (the same run when nothing is coupled)."""
    with Perturbed(model, mask_set, seed):
        whole = run(model, *args)
    rest = part(mask_set, coupled, keep=False)
    if len(rest) == len(mask_set):
        return whole, whole
    with Perturbed(model, rest, seed):
        return whole, run(model, *args)


def test_each_query_head_owns_exactly_its_entries(family):
    name, model = family
    coupled = COUPLED.get(name, ())
    q, z, out = f"blocks.{LAYER}.attn.hook_q", f"blocks.{LAYER}.attn.hook_z", f"blocks.{LAYER}.hook_attn_out"
    per_head = [masks(model, [Site("z", LAYER, head=h)], kv="never") for h in range(model.cfg.n_heads)]
    assert_tiles(per_head)
    base = run(model, [q, z, out], z, [[h] for h in range(len(per_head))])
    for h, mask_set in enumerate(per_head):
        whole, rest = perturbed_runs(model, mask_set, coupled, h, [q, z, out], z, [[h]])
        assert_only(moved(base[q][0], whole[q][0]), [h], f"{name} head {h}: hook_q")
        assert_only(moved(base[z][0], rest[z][0]), [h], f"{name} head {h}: hook_z")
        # With head h's output zeroed, nothing its W_O entries do can show: they read only head h.
        assert (rest[out][1] - base[out][h + 1]).abs().max() <= TOL, f"{name}: head {h}'s W_O entries read others"


def group_masks(model, kind, n_heads, n_kv):
    """Per key/value group, the masks of its `kind` site; where that kind cannot be patched (Bloom's
    hook_k is read-only) the site is refused, and the group's W_K and W_V entries are what kv="any" adds
    to the group's first head."""
    if kind in available_kinds(model):
        return [masks(model, [Site(kind, LAYER, head=g)]) for g in range(n_kv)], True
    with pytest.raises(ValueError, match=f"site kind '{kind}' is not available on model"):
        masks(model, [Site(kind, LAYER, head=0)])
    heads = [[Site("z", LAYER, head=g * n_heads // n_kv)] for g in range(n_kv)]
    return [{n: m for n, m in masks(model, h).items() if n not in masks(model, h, kv="never")} for h in heads], False


@pytest.mark.parametrize("kind", ["k", "v"])
def test_each_key_value_group_owns_exactly_its_entries(family, kind):
    name, model = family
    coupled = COUPLED.get(name, ())
    n_heads = model.cfg.n_heads
    n_kv = getattr(model.cfg, "n_key_value_heads", None) or n_heads
    k, v, z = (f"blocks.{LAYER}.attn.hook_{x}" for x in "kvz")
    mine, other = (k, v) if kind == "k" else (v, k)
    per_group, alone = group_masks(model, kind, n_heads, n_kv)
    assert_tiles(per_group)
    base = run(model, [k, v, z])
    for g, mask_set in enumerate(per_group):
        whole, rest = perturbed_runs(model, mask_set, coupled, g, [k, v, z])
        for hook in [mine] if alone else [k, v]:
            assert_only(moved(base[hook][0], whole[hook][0]), [g], f"{name} {kind} group {g}: {hook}")
        if alone:
            assert (whole[other][0] - base[other][0]).abs().max() <= TOL, f"{name}: group {g}'s {kind} moves {other}"
        group_heads = [h for h in range(n_heads) if h * n_kv // n_heads == g]
        assert_only(moved(base[z][0], rest[z][0]), group_heads, f"{name} {kind} group {g}: its heads' hook_z")


def bit_groups(n):
    """For each bit b of the unit index, the units with that bit 0 and those with it 1: a mask that is
    confined to each of its unit's groups is confined to the unit (the groups' intersection)."""
    return [[i for i in range(n) if (i >> b) & 1 == value] for b in range(max(1, (n - 1).bit_length()))
            for value in (0, 1)]


def test_each_neuron_owns_exactly_its_entries(family):
    """Per neuron, through bit groups: 2 log2(d_mlp) perturbed forwards instead of d_mlp."""
    name, model = family
    if find_layout(model).no_neurons:
        with pytest.raises(ValueError, match="neuron sites cannot be masked on model .*mixture of experts"):
            masks(model, [Site("neuron", LAYER, neuron=0)])
        return
    if d_mlp_seen(model) != model.cfg.d_mlp:  # a wrong config must not give masks of the wrong width
        with pytest.raises(ValueError, match=f"{d_mlp_seen(model)} entries along axis .* config disagrees"):
            masks(model, [Site("neuron", LAYER, neuron=0)])
        return
    pre, post, out = (f"blocks.{LAYER}.{x}" for x in ("mlp.hook_pre", "mlp.hook_post", "hook_mlp_out"))
    per_neuron = [masks(model, [Site("neuron", LAYER, neuron=i)]) for i in range(model.cfg.d_mlp)]
    assert_tiles(per_neuron)
    groups = bit_groups(len(per_neuron))
    base = run(model, [pre, post, out], post, groups)
    for j, group in enumerate(groups):
        with Perturbed(model, union(*(per_neuron[i] for i in group)), seed=j):
            after = run(model, [pre, post, out], post, [group])
        # A ReLU neuron may be off on every token (post unmoved), a gated one's up row does not reach
        # pre: each neuron of the group must move in one of them, and no other neuron in either.
        change = [(after[h][0] - base[h][0]).abs().flatten(0, 1).amax(0) for h in (pre, post)]  # (d_mlp,) x 2
        assert_only(torch.maximum(*change), group, f"{name} neurons {group[:4]}...: hook_pre / hook_post")
        assert (after[out][1] - base[out][j + 1]).abs().max() <= TOL, f"{name}: group {j}'s output entries read others"


def test_block_and_full_masks_hold_only_parameters_the_forward_reads(family):
    """attn_out / mlp_out / embed masks and full fine-tuning skip the fused projections the bridge split
    and no longer reads: they select exactly parameters that get a gradient from the logits."""
    name, model = family
    attn, mlp = masks(model, [Site("attn_out", LAYER)]), masks(model, [Site("mlp_out", LAYER)])
    embed = masks(model, [Site("embed")])
    assert attn and mlp and embed and not set(attn) & set(mlp)
    blocks = union(attn, mlp, embed)
    assert all(mask.all() for mask in blocks.values())
    params = dict(model.named_parameters())
    try:
        for p in params.values():
            p.requires_grad_(True)
        model(TOKENS).sin().sum().backward()
        read = {n for n, p in params.items() if p.grad is not None and p.grad.any()}
    finally:
        for p in params.values():
            p.requires_grad_(False)
            p.grad = None
    assert set(blocks) <= read, f"{name}: masked but never read: {sorted(set(blocks) - read)}"
    assert set(full_masks(model)) == read, f"{name}: {sorted(set(full_masks(model)) ^ read)}"


def test_training_leaves_every_frozen_entry_bit_identical(family, folders):
    name, _ = family
    model = mechattr.load_model(str(folders[name]))  # a fresh copy: training changes it
    n_kv = getattr(model.cfg, "n_key_value_heads", None) or model.cfg.n_heads
    kv_kind = next(kind for kind in ("k", "v") if kind in available_kinds(model))
    sites = [Site("z", 1, head=1), Site(kv_kind, 0, head=n_kv - 1), Site("mlp_out", 0)]
    if not find_layout(model).no_neurons and d_mlp_seen(model) == model.cfg.d_mlp:
        sites.append(Site("neuron", 1, neuron=3))
    mask_set = masks(model, sites)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    text = Text(torch.randint(0, VOCAB, (8, 6), generator=torch.Generator().manual_seed(5)))
    train(model, mask_set, text, TrainConfig(steps=3, batch_size=4, lr=1e-2, weight_decay=0.1), progress=False)
    params = dict(model.named_parameters())
    changed = {n for n, p in params.items() if not torch.equal(p, before[n])}
    assert changed == set(mask_set), f"{name}: changed {sorted(changed ^ set(mask_set))[:3]}"
    for param_name, mask in mask_set.items():
        assert torch.equal(params[param_name][~mask], before[param_name][~mask]), param_name
