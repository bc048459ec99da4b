import shutil

import pytest
import torch

import mechattr
from mechattr.models import ModelNotAvailable


def test_native_model_is_a_compat_bridge_in_eval_mode(tiny):
    from transformer_lens import TransformerBridge

    assert isinstance(tiny, TransformerBridge) and not tiny.training
    assert tiny.cfg.n_layers == 2 and tiny.cfg.n_heads == 4
    assert not any(p.requires_grad for p in tiny.parameters())


def test_missing_model_fails_fast_naming_it(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotAvailable, match=r"cannot load model 'some-org/no-such-model'.*smollm2-135m"):
        mechattr.load_model("some-org/no-such-model")
    with pytest.raises(ModelNotAvailable, match=r"'./no/such/dir' does not exist"):
        mechattr.load_model("./no/such/dir")


@pytest.mark.slow
def test_smollm2_loads_offline_and_second_load_is_an_independent_copy(smollm2, monkeypatch):
    assert smollm2.cfg.n_layers == 30 and smollm2.cfg.n_heads == 9 and smollm2.cfg.n_key_value_heads == 3
    tokens = smollm2.to_tokens("When Mary and John went to the store, John gave a drink to")
    with torch.no_grad():
        probs = smollm2(tokens)[0, -1].softmax(-1)
    assert smollm2.tokenizer.decode([int(probs.argmax())]) == " Mary" and float(probs.max()) > 0.5
    def no_reload(*args):
        raise AssertionError("the second load in a process must not read the weights again")

    monkeypatch.setattr(mechattr.models, "_load_uncached", no_reload)
    copy = mechattr.load_model("smollm2-135m")
    weight = next(copy.parameters())
    weight.data.add_(1.0)
    assert not torch.equal(weight, next(smollm2.parameters()))


def test_device_map_is_refused_for_the_built_in_model_and_with_a_device():
    with pytest.raises(ValueError, match="device_map='auto'.*excludes device=None, GGUF files and 'smollm2-135m'"):
        mechattr.load_model("smollm2-135m", device_map="auto")
    with pytest.raises(ValueError, match="excludes device='cpu'"):
        mechattr.load_model("some/model", device="cpu", device_map="auto")


def test_a_gguf_file_of_an_architecture_transformers_cannot_read_is_named(tmp_path):
    import gguf
    import numpy as np

    path = tmp_path / "tiny-rwkv.gguf"
    writer = gguf.GGUFWriter(str(path), "rwkv6")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelNotAvailable, match=r"cannot load GGUF file '.*tiny-rwkv.gguf' \(architecture 'rwkv6'\)"
                                                r": transformers .* cannot read it.*architectures transformers reads: "
                                                r"llama, "):
        mechattr.load_model(str(path))
    with pytest.raises(ModelNotAvailable, match=r"'.*no-such.gguf': the GGUF file does not exist"):
        mechattr.load_model(str(tmp_path / "no-such.gguf"))
    with pytest.raises(ValueError, match="excludes device=None, GGUF files"):
        mechattr.load_model(str(path), device_map="auto")


@pytest.mark.slow
def test_a_users_gguf_file_loads_by_path_like_the_built_in_model_and_is_cached(smollm2, tmp_path, monkeypatch):
    # The built-in model's GGUF file under another name and in another folder is a user's file.
    path = tmp_path / "files" / "My-SmolLM2.Q4_1.gguf"
    path.parent.mkdir()
    shutil.copy(mechattr.gguf.smollm2_gguf(), path)
    monkeypatch.setenv("MECHATTR_CACHE", str(tmp_path / "cache"))
    tokens = smollm2.to_tokens("When Mary and John went to the store, John gave a drink to")
    with torch.no_grad():
        expected = smollm2(tokens)
    key = (str(path.resolve()), str(torch.float32), True)  # the process-wide copy, dropped to load again
    model = mechattr.load_model(str(path))
    mechattr.models._CACHE.pop(key)
    (stored,) = (tmp_path / "cache").iterdir()
    assert stored.name.startswith("gguf-My-SmolLM2.Q4_1-") and (stored / "model.safetensors").is_file()

    def no_dequantizing(*args, **kwargs):
        raise AssertionError("a stored GGUF file must not be dequantized again")

    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", no_dequantizing)
    cached = mechattr.load_model(str(path))
    mechattr.models._CACHE.pop(key)
    with torch.no_grad():
        assert torch.equal(model(tokens), expected) and torch.equal(cached(tokens), expected)
    assert model.cfg.n_layers == 30 and model.cfg.n_key_value_heads == 3


def test_an_architecture_the_bridge_cannot_wrap_is_named(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    from mechattr.families import tokenizer

    config = AutoConfig.for_model("biogpt", vocab_size=260, hidden_size=32, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=64, max_position_embeddings=32)
    config.architectures = ["BioGptForCausalLM"]
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    tokenizer().save_pretrained(tmp_path)
    with pytest.raises(ModelNotAvailable, match=r"TransformerLens .* has no bridge for its architecture "
                                                r"'BioGptForCausalLM'"):
        mechattr.load_model(str(tmp_path))


@pytest.mark.parametrize("name", ["falcon", "llama"])
def test_every_load_computes_with_its_own_weights(tmp_path, name):
    """Loads are independent copies: changing one model's output projection changes its logits only.
    (TL 4.3's Falcon adapter replaces linear layers' forwards by closures, which a deep copy would share.)"""
    from mechattr import families

    folder = str(families.build(name, tmp_path / name))
    first, second = mechattr.load_model(folder), mechattr.load_model(folder)
    tokens = torch.arange(6)[None] % families.VOCAB
    before = second(tokens)[:, -1]
    with torch.no_grad():
        for block in first.blocks:
            for p in block.attn.parameters():
                p.mul_(0.0)
        changed = first(tokens)[:, -1]
    assert not torch.allclose(changed, before, atol=1e-3)
    torch.testing.assert_close(second(tokens)[:, -1], before, atol=0, rtol=0)
    assert not torch.allclose(mechattr.load_model(folder)(tokens)[:, -1], changed, atol=1e-3)
