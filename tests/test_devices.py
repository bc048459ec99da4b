"""Devices and dtypes: `load_model` / `native_model` device and dtype arguments, bfloat16 models on the
CPU checked against a bfloat16 one-hook-per-forward reference, and (where CUDA exists) a GPU model
checked against the CPU one."""

import pytest
import torch

import mechattr
from mechattr import families
from mechattr.finetune import TrainConfig, train
from mechattr.models import parse_device, parse_dtype
from tests.bridges import random_task

# bfloat16 keeps 8 significant bits: one rounding is off by up to 2**-8 of the value. The engine batches
# cells, resumes at late blocks and reuses prefix keys/values, so its roundings differ from a plain
# forward's; a few roundings of the logits, all through 2 layers, stay within 4 * 2**-8 of the logits'
# magnitude. (float32 agrees to 0.0 on the same models.)
BF16_TOLERANCE = 4 * 2**-8


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    return str(families.build("llama", tmp_path_factory.mktemp("llama")))


@pytest.fixture(scope="module")
def task():
    """4 prompts of 7 byte tokens; the corrupted ones differ at positions 2 and 5."""
    return random_task(256, (2, 5), seed=1, name="bf16")


def last_logits(model, tokens, hook_name=None, where=None, value=None):
    """float32 last-position logits of one plain forward, with activation[where] := value at hook_name."""
    def hook(act, hook):
        act[where] = value
        return act

    hooks = [] if hook_name is None else [(hook_name, hook)]
    with torch.no_grad():
        return model.run_with_hooks(tokens, fwd_hooks=hooks)[:, -1].float()


def reference_effect(model, task, site):
    """Denoising `site` by hand, one forward per site: the corrupted run with the clean activation
    written in, logit difference computed in float32 from the model's own-dtype logits."""
    where = (slice(None),) + site.index
    with torch.no_grad():
        _, cache = model.run_with_cache(task.clean, names_filter=lambda n: n == site.hook)
    logits = last_logits(model, task.corrupt, site.hook, where, cache[site.hook][where])
    rows = torch.arange(task.n_examples)
    return logits[rows, task.answer] - logits[rows, task.wrong]


def test_dtype_and_device_are_read_from_strings_and_bad_ones_are_named():
    assert parse_dtype("bfloat16") is torch.bfloat16 and parse_dtype("float16") is torch.float16
    assert parse_dtype("torch.float32") is torch.float32 and parse_dtype("bf16") is torch.bfloat16
    assert parse_dtype(None) is torch.float32 and parse_dtype(torch.float16) is torch.float16
    for bad in ("int8", "float64", torch.int64):
        with pytest.raises(ValueError, match=r"unknown model dtype .*valid: float32, bfloat16, float16"):
            parse_dtype(bad)
    assert parse_device("cpu") == "cpu" and parse_device(torch.device("cpu")) == "cpu" and parse_device(None) is None
    with pytest.raises(ValueError, match=r"unknown device 'gpu'; valid e.g. 'cpu', 'cuda'"):
        parse_device("gpu")
    missing = "cuda" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"
    with pytest.raises(ValueError, match=rf"device '{missing}' is not available"):
        parse_device(missing)


def test_load_model_refuses_a_bad_dtype_or_device_before_loading(llama_folder, monkeypatch):
    def no_load(*args):
        raise AssertionError("a bad dtype or device must be refused before any weights are read")

    monkeypatch.setattr(mechattr.models, "_load_uncached", no_load)
    with pytest.raises(ValueError, match="unknown model dtype 'int4'"):
        mechattr.load_model(llama_folder, dtype="int4")
    with pytest.raises(ValueError, match="unknown device 'tpu0'"):
        mechattr.load_model(llama_folder, device="tpu0")
    with pytest.raises(ValueError, match="unknown device 'gpu'"):
        mechattr.native_model(device="gpu")


@pytest.mark.parametrize("source", ["native", "llama folder"])
def test_bfloat16_model_on_cpu_patches_like_a_bfloat16_reference(source, llama_folder, task):
    if source == "native":
        model = mechattr.native_model(mechattr.models.NativeConfig(d_vocab=256), device="cpu", dtype="bfloat16")
        float_model = mechattr.native_model(mechattr.models.NativeConfig(d_vocab=256))
    else:
        model = mechattr.load_model(llama_folder, device="cpu", dtype="bfloat16")
        float_model = mechattr.load_model(llama_folder, dtype=torch.float32)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16} and model.cfg.dtype == torch.bfloat16
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    scale = float(last_logits(model, task.clean).abs().max())
    for kind in ("resid_pre", "z"):
        grid = mechattr.grid(model, kind, task.n_pos)
        effects = mechattr.patch(model, task, grid, progress=False)
        assert effects.values.dtype == effects.per_example.dtype == effects.clean.dtype == torch.float32
        expected = torch.stack([reference_effect(model, task, site) for site in grid.sites])
        error = float((effects.per_example.reshape(len(grid.sites), -1) - expected).abs().max())
        assert error <= BF16_TOLERANCE * scale, f"{source} {kind}: {error} > {BF16_TOLERANCE * scale}"
        # The same weights in float32 give the same effects up to bfloat16's rounding of the weights.
        exact = mechattr.patch(float_model, task, grid, progress=False)
        assert float((effects.per_example - exact.per_example).abs().max()) < 0.1 * scale
    assert effects.values.abs().max() > 10 * BF16_TOLERANCE * scale  # the patches move the metric


def test_bfloat16_training_step_keeps_float32_loss_and_frozen_entries(task):
    model = mechattr.native_model(mechattr.models.NativeConfig(d_vocab=256), device="cpu", dtype=torch.bfloat16)
    name = "layers.0._original_component.attn._original_component.q._original_component.weight"
    weight = dict(model.named_parameters())[name]
    mask = torch.zeros(weight.shape, dtype=torch.bool)
    mask[16:32] = True  # head 1's query rows
    before = weight.detach().clone()
    result = train(model, {name: mask}, task, TrainConfig(lr=0.1, steps=2, batch_size=4), progress=False)
    assert len(result.losses) == 2 and all(isinstance(v, float) and v == v for v in result.losses)
    after = weight.detach()
    assert after.dtype == torch.bfloat16 and torch.equal(after[~mask], before[~mask])
    assert not torch.equal(after[mask], before[mask])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_cuda_model_patches_attributes_and_trains_like_the_cpu_one(llama_folder, task):
    cpu, gpu = mechattr.load_model(llama_folder), mechattr.load_model(llama_folder, device="cuda")
    assert {p.device.type for p in gpu.parameters()} == {"cuda"}
    scale = float(last_logits(cpu, task.clean).abs().max())
    for kind in ("resid_pre", "z"):
        grid = mechattr.grid(cpu, kind, task.n_pos)
        for method in (mechattr.patch, mechattr.attribute):  # the task stays on the CPU: moved for the run
            expected = method(cpu, task, grid).per_example
            got = method(gpu, task, grid).per_example
            assert float((got.cpu() - expected).abs().max()) <= 1e-4 * scale, f"{method.__name__} {kind}"
    name = "model.layers.1._original_component.self_attn._original_component.o_proj._original_component.weight"
    results = []
    for model in (cpu, gpu):
        weight = dict(model.named_parameters())[name]
        mask = torch.zeros(weight.shape, dtype=torch.bool, device=weight.device)
        mask[:, :16] = True
        results.append(train(model, {name: mask}, task, TrainConfig(lr=0.1, steps=2, batch_size=4), progress=False))
    assert results[0].losses == pytest.approx(results[1].losses, abs=1e-4)
