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
    with pytest.raises(ValueError, match="device_map='auto'.*excludes device=None and 'smollm2-135m'"):
        mechattr.load_model("smollm2-135m", device_map="auto")
    with pytest.raises(ValueError, match="excludes device='cpu'"):
        mechattr.load_model("some/model", device="cpu", device_map="auto")
