"""Export: a model fine-tuned in checkpoint coordinates leaves mechattr as a Hugging Face folder that plain
`transformers` loads with the same logits, differing from the original checkpoint only at trained
entries, and as a sparse delta that reproduces it from the original checkpoint bit for bit. On families
with fused projections, TransformerLens's own split of the exported fused tensors is the reference."""

import copy
import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

import mechattr
from mechattr import families
from mechattr.cli import main
from mechattr.finetune import Delta, TrainConfig, fused, masks, train
from mechattr.finetune.delta import CHECKPOINT, COMPAT, hf_name
from mechattr.finetune.export import DELTA_FILE, INFO_FILE, checkpoint_delta, export
from mechattr.finetune.layouts import SUPPORTED_FAMILIES, find_layout, unused_parameters
from mechattr.selection import SiteSet
from mechattr.sites import Site
from tests import tiny_families

SITES = SiteSet.of([Site("z", 0, head=1), Site("z", 1, head=3)])
PROMPT = torch.randint(0, families.VOCAB, (1, 6), generator=torch.Generator().manual_seed(7))
FUSED = ("gpt2", "gpt_neox", "bloom", "falcon", "phi3")  # families whose bridge splits a fused projection
# Falcon's other layout that TransformerLens 4.3 boots: query_key_value interleaved per head, with biases.
VARIANTS = {"falcon-per-head": replace(families.FAMILIES["falcon"],
                                       kwargs=dict(families.FAMILIES["falcon"].kwargs, multi_query=False, bias=True))}
FUSED_SITES = SiteSet.of([*SITES, Site("neuron", 1, neuron=5)])  # Phi-3's neurons live in gate_up_proj


def build(name, folder):
    """A tiny random model of family `name`, or of a variant in VARIANTS, as a Hugging Face folder."""
    with pytest.MonkeyPatch.context() as patch:
        if name in VARIANTS:
            patch.setitem(families.FAMILIES, name, VARIANTS[name])
        return families.build(name, folder)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny random Llama (GQA) with tied embeddings, as a Hugging Face folder."""
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=families.VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=128, max_position_embeddings=64,
                         tie_word_embeddings=True, bos_token_id=258, eos_token_id=256, pad_token_id=257,
                         architectures=["LlamaForCausalLM"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for param in model.parameters():
            param.mul_(4.0)  # default initialisation is so small that training barely moves the logits
    path = tmp_path_factory.mktemp("tied") / "llama"
    model.save_pretrained(path)
    families.tokenizer().save_pretrained(path)
    return path


def trained(name, compatibility=False, sites=SITES):
    model = mechattr.load_model(str(name), compatibility=compatibility)
    result = train(model, masks(model, sites), tiny_families.task(), TrainConfig(steps=3, lr=5e-2),
                   progress=False, sites=sites, base_model=str(name))
    return model, result


@pytest.fixture(scope="module")
def tiny_export(folder, tmp_path_factory):
    model, result = trained(folder)
    return model, result, export(model, tmp_path_factory.mktemp("out") / "tuned", delta=result.delta)


@pytest.fixture(scope="module", params=[*FUSED, *VARIANTS])
def fused_export(request, tmp_path_factory):
    """A tiny model of a fused-projection family with two heads and a neuron trained, exported:
    (trained bridge, its `FinetuneResult`, the export folder, the original checkpoint's folder)."""
    root = tmp_path_factory.mktemp(request.param)
    checkpoint = build(request.param, root / "checkpoint")
    model, result = trained(checkpoint, sites=FUSED_SITES)
    return model, result, export(model, root / "tuned", delta=result.delta), checkpoint


def split_modules(model):
    """(bridge module, its split copies' roles, TransformerLens's split function, the Hugging Face module it
    splits) for each fused projection the bridge split at boot."""
    for block in model.blocks:
        for module, roles, split in ((block.attn, ("q", "k", "v"), "split_qkv_matrix"),
                                     (block.mlp, ("gate", "in"), "split_gate_up_matrix")):
            if hasattr(module, split):
                yield module, roles, getattr(module, split), f"{block.name}.{module.name}"


def resplit(model, hf_model):
    """{bridge parameter name: tensor}: the split copies that TransformerLens's own boot-time split makes
    of `hf_model`'s fused projections (none on families without them)."""
    names = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for module, roles, split, path in split_modules(model):
        for role, piece in zip(roles, split(hf_model.get_submodule(path))):
            copies = getattr(module, role).original_component
            for leaf, value in piece.named_parameters():
                out[names[id(getattr(copies, leaf))]] = value.detach()
    return out


def aliases(model):
    """{id(parameter): every name it has in `model`, wrappers removed} (the bridge reaches a tensor by
    several paths, e.g. GPT-2's attn.o and attn.c_proj)."""
    out = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        out.setdefault(id(param), []).append(hf_name(name))
    return out


def checkpoint_masks(model, owned, hf_model):
    """`owned` (masks on the bridge's parameters) as masks on `hf_model`'s tensors, found without
    `mechattr.finetune.fused`: a split copy's entries through TransformerLens's split of a copy of `hf_model`
    whose every entry holds its own number; any other parameter is `hf_model`'s tensor under one of its names."""
    paths = {path for *_, path in split_modules(model)}
    numbered, starts, start = copy.deepcopy(hf_model) if paths else hf_model, {}, 0
    with torch.no_grad():
        for path in sorted(paths):
            for name, param in numbered.get_submodule(path).named_parameters(prefix=path):
                param.copy_(torch.arange(start, start + param.numel()).view(param.shape))
                starts[name], start = start, start + param.numel()
    assert start < 2 ** 24  # every number is exact in float32
    split, names, params = resplit(model, numbered), aliases(model), dict(model.named_parameters())
    out = {name: torch.zeros(p.shape, dtype=torch.bool) for name, p in hf_model.named_parameters()}
    for name, mask in owned.items():
        if name not in split:
            out[next(a for a in names[id(params[name])] if a in out)] |= mask
            continue
        numbers = split[name][mask].long()
        for target, first in starts.items():
            inside = (numbers >= first) & (numbers < first + out[target].numel())
            out[target].view(-1)[numbers[inside] - first] = True
    return {name: mask for name, mask in out.items() if mask.any()}


def original(checkpoint):
    """The original checkpoint as a plain `transformers` model, every tensor read from its folder."""
    model, info = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32, output_loading_info=True)
    assert not any(info.values()), info
    return model.eval()


def apply_by_hand(model, path):
    """The delta file format as documented in `mechattr.finetune.delta`, with torch and safetensors only."""
    tensors = load_file(str(path))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, values in tensors.items():
            if key.endswith("::values"):
                name = key.removesuffix("::values")
                flat, index = params[name].data.view(-1), tensors.get(name + "::indices")
                flat.copy_(flat + values) if index is None else flat.index_copy_(0, index, flat[index] + values)
    return model


def greedy(model, tokens, n):
    """n greedy tokens from the bridge's own forward."""
    for _ in range(n):
        with torch.no_grad():
            tokens = torch.cat([tokens, model(tokens)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return tokens


def check_round_trip(model, result, out, checkpoint, prompt, atol=1e-4):
    """The assertions shared by the tiny model and SmolLM2; returns (max |logit diff|, entries that
    differ from the checkpoint, trained entries)."""
    exported = original(out)
    with torch.no_grad():
        gap = float((exported(prompt).logits[:, -1] - model(prompt)[:, -1]).abs().max())
    assert gap <= atol

    # Every entry outside the trained units is the checkpoint's, bit for bit; trained ones moved.
    owned = checkpoint_masks(model, masks(model, result.delta.sites), exported)
    state, base = exported.state_dict(), original(checkpoint).state_dict()
    assert set(base) == set(state)
    changed = 0
    for name, value in base.items():
        mask = owned.get(name)
        if mask is None:
            assert torch.equal(state[name], value), name
            continue
        assert torch.equal(state[name][~mask], value[~mask]), name
        assert not torch.equal(state[name][mask], value[mask]), name
        changed += int((state[name] != value).sum())
    assert 0 < changed <= result.n_trained == sum(int(m.sum()) for m in owned.values())

    # The sparse delta turns the original checkpoint into the export, bit for bit, with or without mechattr.
    for fresh in (Delta.load(out / DELTA_FILE).apply(original(checkpoint)),
                  apply_by_hand(original(checkpoint), out / DELTA_FILE)):
        applied = fresh.state_dict()
        assert all(torch.equal(applied[k], v) for k, v in state.items())

    # Tied as the checkpoint was after reload; generation runs and matches greedy decoding with the bridge.
    tied = AutoConfig.from_pretrained(checkpoint).tie_word_embeddings
    assert exported.config.tie_word_embeddings == tied
    if tied:
        assert exported.get_output_embeddings().weight.data_ptr() == exported.get_input_embeddings().weight.data_ptr()
    generated = exported.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4,
                                  do_sample=False, pad_token_id=exported.config.eos_token_id)
    assert torch.equal(generated, greedy(model, prompt, 4))

    info = json.loads((out / INFO_FILE).read_text())
    assert info["coordinates"] == CHECKPOINT and info["n_trained"] == result.n_trained
    assert SiteSet.from_json(info["sites"]) == result.delta.sites
    return gap, changed, result.n_trained


def test_the_raw_bridge_holds_the_checkpoint_weights_and_the_same_masks(folder):
    raw, compat = mechattr.load_model(str(folder), compatibility=False), mechattr.load_model(str(folder))
    assert not raw.compatibility_mode and compat.compatibility_mode  # cached apart
    params = {hf_name(n): p for n, p in raw.named_parameters()}
    base = load_file(str(folder / "model.safetensors"))
    assert set(base) <= set(params) and all(torch.equal(params[k], v) for k, v in base.items())
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(dict((hf_name(n), p) for n, p in compat.named_parameters())[q], base[q])
    raw_masks, compat_masks = masks(raw, SITES), masks(compat, SITES)
    assert raw_masks.keys() == compat_masks.keys()
    assert all(torch.equal(mask, compat_masks[name]) for name, mask in raw_masks.items())


@pytest.mark.parametrize("name", [n for n in SUPPORTED_FAMILIES if families.FAMILIES[n].boots])
def test_every_family_masks_alike_without_compatibility_mode_and_exports(name, tmp_path):
    raw = mechattr.load_model(str(families.build(name, tmp_path / name)), compatibility=False)
    compat = mechattr.load_model(str(tmp_path / name))
    sites = [Site("z", 1, head=0), *([] if find_layout(raw).no_neurons else [Site("neuron", 1, neuron=3)])]
    raw_masks, compat_masks = masks(raw, sites), masks(compat, sites)
    # Folding LayerNorm gives some projections a bias the checkpoint lacks; every other mask is the same.
    assert set(raw_masks) <= set(compat_masks)
    assert all(n.endswith("bias") for n in set(compat_masks) - set(raw_masks))
    assert all(torch.equal(mask, compat_masks[n]) for n, mask in raw_masks.items())
    exported = AutoModelForCausalLM.from_pretrained(export(raw, tmp_path / "out"), dtype=torch.float32).eval()
    with torch.no_grad():
        assert float((exported(PROMPT).logits[:, -1] - raw(PROMPT)[:, -1]).abs().max()) <= 1e-4


def test_tiny_round_trip(tiny_export, folder):
    model, result, out = tiny_export
    assert result.delta.coordinates == CHECKPOINT
    check_round_trip(model, result, out, folder, PROMPT)
    info = json.loads((out / INFO_FILE).read_text())
    assert info["base_checkpoint"] == str(folder.resolve()) and info["base_model"] == str(folder)


def test_checkpoint_delta_applies_to_the_raw_bridge_and_refuses_another_base(tiny_export, folder):
    model, result, out = tiny_export
    hf_delta = Delta.load(out / DELTA_FILE)
    assert all("_original_component" not in name for name in hf_delta.values)
    fresh = hf_delta.apply(mechattr.load_model(str(folder), compatibility=False))  # found by Hugging Face name
    assert all(torch.equal(a, b) for a, b in zip(fresh.parameters(), model.parameters()))
    other = original(folder)
    name = next(iter(hf_delta.probes))
    index = hf_delta.probes[name][0][0]
    with torch.no_grad():
        dict(other.named_parameters())[name].view(-1)[index] += 1.0
    with pytest.raises(ValueError, match=r"does not fit.*the original checkpoint"):
        hf_delta.apply(other)


def test_compatibility_mode_is_refused_with_the_way_to_export(folder):
    model, result = trained(folder, compatibility=True)
    assert result.delta.coordinates == COMPAT
    with pytest.raises(ValueError, match=r"compatibility mode.*compatibility=False.*--export"):
        export(model, folder.parent / "never")
    with pytest.raises(ValueError, match=r"transformer_bridge_compat.*compatibility=False"):
        checkpoint_delta(result.delta, model)
    assert not (folder.parent / "never").exists()


def test_untied_embeddings_and_foreign_folders_are_refused(tiny_export, tmp_path):
    model, result, out = tiny_export
    untied = copy.deepcopy(model)
    lm_head = untied.original_model.lm_head._original_component
    lm_head.weight = torch.nn.Parameter(lm_head.weight.detach() + 1.0)
    with pytest.raises(ValueError, match="tie_word_embeddings=True"):
        export(untied, tmp_path / "untied")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not an empty directory or an earlier export"):
        export(model, tmp_path / "notes")
    assert export(model, out) == out.resolve()  # an earlier export is replaced


def test_lora_is_exported_merged(folder, tmp_path):
    from mechattr.finetune.methods import LoRA

    model = mechattr.load_model(str(folder), compatibility=False)
    setup = LoRA(rank=2).build(model, seed=0, target=None)
    train(setup.model, setup.masks, tiny_families.task(), TrainConfig(steps=3, lr=5e-2), progress=False)
    out = export(setup.model, tmp_path / "lora", tokenizer=model.tokenizer)
    exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert not any("lora" in name for name in exported.state_dict())
    with torch.no_grad():
        expected, actual = setup.model(PROMPT).logits[:, -1], exported(PROMPT).logits[:, -1]
        assert float((expected - actual).abs().max()) <= 1e-4
        assert not torch.allclose(actual, model(PROMPT)[:, -1], atol=1e-3)  # the adapters did change it
    assert (out / "tokenizer.json").is_file()


def test_fused_projections_export_with_the_trained_split_copies(fused_export):
    model, result, out, checkpoint = fused_export
    gap, changed, n = check_round_trip(model, result, out, checkpoint, PROMPT)
    print(f"{fused.variant(model.original_model.config)}: max |logit difference| {gap:.3g}; "
          f"{changed:,} entries differ of {n:,} trained")
    # The delta holds exactly the trained entries, at their indices in the checkpoint's (fused) tensors.
    owned = checkpoint_masks(model, masks(model, FUSED_SITES), original(out))
    hf_delta = Delta.load(out / DELTA_FILE)
    assert set(hf_delta.values) == set(owned)
    for name, mask in owned.items():
        index = hf_delta.indices[name]
        assert torch.equal(torch.arange(mask.numel()) if index is None else index, mask.flatten().nonzero()[:, 0])


def test_the_bridges_own_split_of_the_exported_fused_tensors_gives_back_the_trained_copies(fused_export):
    model, result, out, checkpoint = fused_export
    exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    again = resplit(model, exported)
    params = dict(model.named_parameters())
    base = dict(mechattr.load_model(str(checkpoint), compatibility=False).named_parameters())
    names, own = aliases(model), set(exported.state_dict())
    assert set(again) == {n for n, p in params.items() if not own & set(names[id(p)])}  # every split copy
    assert all(torch.equal(value, params[name]) for name, value in again.items())
    trained_copies = set(masks(model, FUSED_SITES)) & set(again)
    assert trained_copies and all(not torch.equal(params[n], base[n]) for n in trained_copies)


@pytest.mark.parametrize("name", [*FUSED, *VARIANTS])
def test_an_untrained_bridges_split_copies_fuse_back_to_the_checkpoint_bit_for_bit(name, tmp_path):
    checkpoint = build(name, tmp_path / name)
    model = mechattr.load_model(str(checkpoint), compatibility=False)
    unread = unused_parameters(model)
    assert unread
    with torch.no_grad():  # the fused tensors the bridge keeps unread: the export must not take them from there
        for param_name, param in model.named_parameters():
            if param_name in unread:
                param.fill_(float("nan"))
    saved = load_file(str(export(model, tmp_path / "out") / "model.safetensors"))
    base = load_file(str(checkpoint / "model.safetensors"))
    assert saved.keys() == base.keys() and all(torch.equal(saved[k], v) for k, v in base.items())


def test_a_delta_on_a_fused_tensor_is_refused_by_the_bridge_which_reads_split_copies(fused_export):
    model, result, out, checkpoint = fused_export
    fresh = mechattr.load_model(str(checkpoint), compatibility=False)
    with pytest.raises(ValueError, match="no longer reads.*plain transformers model"):
        Delta.load(out / DELTA_FILE).apply(fresh)
    result.delta.apply(fresh)  # the training run's delta, in bridge names
    assert all(torch.equal(a, b) for a, b in zip(fresh.parameters(), model.parameters()))


def test_a_fusion_that_is_not_known_is_refused_naming_the_split_copy(tmp_path, monkeypatch):
    model, result = trained(families.build("gpt2", tmp_path / "gpt2"), sites=SiteSet.of([Site("z", 0, head=1)]))
    monkeypatch.delitem(fused.FUSIONS, "gpt2")
    with pytest.raises(ValueError, match=r"delta parameter '[^']*attn\.q\.[^']*weight' \(64, 64\) is a copy only "
                                         r"the bridge reads.*'gpt2' fuses it back.*not known"):
        export(model, tmp_path / "out", delta=result.delta)
    with pytest.raises(ValueError, match=r"other logits than the bridge.*fusion into the checkpoint is not known for "
                                         r"'gpt2'.*attn\.q"):
        export(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_export_command_rebuilds_the_model_from_a_saved_delta(tiny_export, folder, tmp_path, capsys):
    model, result, _ = tiny_export
    path = result.delta.save(tmp_path / "delta.safetensors")
    assert main(["export", str(path), "--out", str(tmp_path / "cli")]) == 0
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "cli", dtype=torch.float32)
    state = exported.state_dict()
    assert all(torch.equal(state[hf_name(n)], p) for n, p in model.named_parameters())
    _, compat = trained(folder, compatibility=True)
    assert main(["export", str(compat.delta.save(tmp_path / "compat.safetensors")), "--out",
                 str(tmp_path / "no")]) == 2
    assert "compatibility=False" in capsys.readouterr().err


@pytest.mark.slow
def test_smollm2_round_trip(smollm2_export):
    model, result, out = smollm2_export
    checkpoint = mechattr.gguf.cache_dir() / f"smollm2-135m-{mechattr.gguf.smollm2_gguf().stat().st_size}"
    assert json.loads((out / INFO_FILE).read_text())["base_checkpoint"] == str(checkpoint)
    prompt = model.to_tokens("When Mary and John went to the store, John gave a drink to")
    gap, changed, n = check_round_trip(model, result, out, checkpoint, prompt)
    print(f"max |logit difference| {gap:.3g}; {changed:,} entries differ of {n:,} trained")


@pytest.mark.slow
def test_smollm2_compatibility_mode_is_refused(smollm2):
    with pytest.raises(ValueError, match=r"compatibility mode.*compatibility=False"):
        export(smollm2, "never")


# `mechattr finetune --export` on SmolLM2 runs, and its export is checked, in test_readme (the README's
# command).
