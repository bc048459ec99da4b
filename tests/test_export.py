"""Export: a model fine-tuned in checkpoint coordinates leaves mechattr as a Hugging Face folder that plain
`transformers` loads with the same logits, differing from the original checkpoint only at trained
entries, and as a sparse delta that reproduces it from the original checkpoint bit for bit."""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, load_model as load_weights
from transformers import AutoConfig, AutoModelForCausalLM

import mechattr
from mechattr import families
from mechattr.cli import main
from mechattr.finetune import Delta, TrainConfig, masks, train
from mechattr.finetune.delta import CHECKPOINT, COMPAT, hf_name
from mechattr.finetune.export import DELTA_FILE, INFO_FILE, checkpoint_delta, export
from mechattr.finetune.layouts import SUPPORTED_FAMILIES, find_layout
from mechattr.selection import SiteSet
from mechattr.sites import Site
from tests import tiny_families

SITES = SiteSet.of([Site("z", 0, head=1), Site("z", 1, head=3)])
PROMPT = torch.randint(0, families.VOCAB, (1, 6), generator=torch.Generator().manual_seed(7))


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


def original(checkpoint):
    """The original checkpoint as a plain `transformers` model, read from its folder's safetensors."""
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(checkpoint), dtype=torch.float32)
    load_weights(model, str(checkpoint / "model.safetensors"))
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
    exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        gap = float((exported(prompt).logits[:, -1] - model(prompt)[:, -1]).abs().max())
    assert gap <= atol

    # Every entry outside the trained units is the checkpoint's, bit for bit; trained ones moved.
    owned = {hf_name(n): m for n, m in masks(model, result.delta.sites).items()}
    state, base = exported.state_dict(), load_file(str(checkpoint / "model.safetensors"))
    assert set(load_file(str(out / "model.safetensors"))) <= set(state) and set(base) <= set(state)
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
        assert all(torch.equal(fresh.state_dict()[k], v) for k, v in state.items())

    # Still tied after reload; generation runs and matches greedy decoding with the trained bridge.
    assert exported.config.tie_word_embeddings
    assert exported.lm_head.weight.data_ptr() == exported.model.embed_tokens.weight.data_ptr()
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
        checkpoint_delta(result.delta)
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


def test_training_the_bridges_split_copies_of_a_fused_projection_is_refused(tmp_path):
    gpt2 = families.build("gpt2", tmp_path / "gpt2")
    model, _ = trained(gpt2, sites=SiteSet.of([Site("z", 0, head=1)]))
    with pytest.raises(ValueError, match=r"other logits than the bridge.*attn\.q"):
        export(model, tmp_path / "out")


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
    checkpoint = mechattr.models.cache_dir() / f"smollm2-135m-{mechattr.models.smollm2_gguf().stat().st_size}"
    assert json.loads((out / INFO_FILE).read_text())["base_checkpoint"] == str(checkpoint)
    prompt = model.to_tokens("When Mary and John went to the store, John gave a drink to")
    gap, changed, n = check_round_trip(model, result, out, checkpoint, prompt)
    print(f"max |logit difference| {gap:.3g}; {changed:,} entries differ of {n:,} trained")


@pytest.mark.slow
def test_smollm2_compatibility_mode_is_refused(smollm2):
    with pytest.raises(ValueError, match=r"compatibility mode.*compatibility=False"):
        export(smollm2, "never")


@pytest.mark.slow
def test_finetune_export_trains_on_the_checkpoint_weights(tmp_path, capsys):
    assert main(["attribute", "--method", "atp", "--n", "2", "--sites", "z", "--layers", "28,29",
                 "--out", str(tmp_path / "atp")]) == 0
    status = main(["finetune", "--sites-from", str(tmp_path / "atp"), "--top-k", "1", "--steps", "1",
                   "--out", str(tmp_path / "run"), "--export", str(tmp_path / "hf")])
    out, err = capsys.readouterr()
    assert status == 0, err
    assert "no compatibility mode" in out
    delta = Delta.load(tmp_path / "run" / "delta.safetensors")
    assert delta.coordinates == CHECKPOINT == json.loads((tmp_path / "run" / "metrics.json").read_text())["coordinates"]
    tuned = delta.apply(mechattr.load_model("smollm2-135m", compatibility=False))
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    prompt = tuned.to_tokens("The Eiffel Tower is located in the city of")
    with torch.no_grad():
        assert float((exported(prompt).logits[:, -1] - tuned(prompt)[:, -1]).abs().max()) <= 1e-4
