"""Property-based tests: invariants of patching over random small models, sites and token tasks, and
fuzzed task files and command lines that must fail only as documented.

Examples are derandomized (the same inputs every run); set MECHATTR_FUZZ=k to try k times as many, with
fresh random inputs.
"""

import io
import json
import os
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import replace
from functools import lru_cache
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, Phase, assume, event, given, settings, strategies as st

import mechattr
import mechattr.cli
from mechattr import Site, patch, sweeps
from mechattr.effects import Effects
from mechattr.interventions import Denoise, Noise, Steer, Zero
from mechattr.models import NativeConfig, model_shape
from mechattr.sites import Grid, KINDS, validate
from mechattr.tasks import Task, TaskError, from_jsonl

FUZZ = int(os.environ.get("MECHATTR_FUZZ", "1"))


def _settings(examples: int):
    # No explain phase: it reruns a failing example ~100 times to trace lines, minutes on these models.
    return settings(max_examples=examples * FUZZ, deadline=None, database=None, derandomize=FUZZ == 1,
                    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink],
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# Random models, tasks and sites ---------------------------------------------------------------------

@lru_cache(maxsize=None)
def _model(config: NativeConfig):
    return mechattr.native_model(config)


configs = st.builds(NativeConfig, d_model=st.sampled_from([16, 32]), n_layers=st.integers(1, 3),
                    n_heads=st.sampled_from([1, 2, 4]), d_head=st.sampled_from([4, 8]), n_ctx=st.just(12),
                    d_vocab=st.sampled_from([11, 23]), act_fn=st.sampled_from(["gelu", "relu"]),
                    seed=st.integers(0, 3))


@st.composite
def tasks(draw, d_vocab: int):
    """n prompts of one length; the corrupted ones differ at a random set of positions."""
    n, n_pos = draw(st.integers(1, 4)), draw(st.integers(2, 8))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, d_vocab, (n, n_pos), generator=g)
    corrupt = clean.clone()
    changed = draw(st.lists(st.integers(0, n_pos - 1), min_size=1, max_size=n_pos, unique=True))
    corrupt[:, changed] = torch.randint(0, d_vocab, (n, len(changed)), generator=g)
    answer, wrong = (torch.randint(0, d_vocab, (n,), generator=g) for _ in range(2))
    return Task(clean, corrupt, answer, wrong, name="random")


@st.composite
def sites(draw, model, n_pos: int):
    """Any site of `model`, each optional axis left whole or indexed."""
    shape = model_shape(model)
    kind = draw(st.sampled_from(sorted(KINDS)))
    spec = KINDS[kind]
    maybe = lambda bound: draw(st.none() | st.integers(0, bound - 1))  # noqa: E731
    coords = {"layer": 0 if kind == "embed" else draw(st.integers(0, shape["n_layers"] - 1))}
    if "pos" in spec.dims:
        coords["pos"] = maybe(n_pos)
    if spec.heads:
        coords["head"] = maybe(shape["n_heads" if spec.heads == "query" else "n_kv_heads"])
    if spec.width:
        coords["neuron"] = maybe(shape["d_mlp"])
    site = Site(kind, **coords)
    validate([site], model, n_pos)
    return site


@st.composite
def cases(draw, max_sites: int = 5):
    """(model, task, sites) with 1..max_sites distinct random sites."""
    model = _model(draw(configs))
    task = draw(tasks(model.cfg.d_vocab))
    chosen = draw(st.lists(sites(model, task.n_pos), min_size=1, max_size=max_sites, unique=True))
    return model, task, chosen


def _close(actual, expected, what):
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5, msg=lambda m: f"{what}: {m}")


# Patching invariants --------------------------------------------------------------------------------

@_settings(20)
@given(cases(), st.sampled_from([Denoise(), Noise()]))
def test_patching_clean_into_clean_changes_nothing(case, intervention):
    model, task, chosen = case
    same = replace(task, corrupt=task.clean)
    effects = patch(model, same, chosen, intervention, progress=False)
    _close(effects.per_example, effects.clean.expand_as(effects.per_example), f"sites {chosen}")


@_settings(20)
@given(configs, st.data())
def test_patching_the_whole_residual_restores_clean(config, data):
    model = _model(config)
    task = data.draw(tasks(model.cfg.d_vocab))
    kind = data.draw(st.sampled_from(["resid_pre", "resid_mid", "resid_post"]))
    site = Site(kind, data.draw(st.integers(0, config.n_layers - 1)))
    effects = patch(model, task, [site], progress=False)
    _close(effects.per_example[0], effects.clean, str(site))
    assume(float((effects.clean - effects.corrupt).abs().max()) > 1e-4)  # the patch had something to restore


@_settings(15)
@given(cases(max_sites=6), st.sampled_from([Denoise(), Noise(), Zero()]))
def test_batched_sites_equal_each_site_alone(case, intervention):
    model, task, chosen = case
    together = patch(model, task, chosen, intervention, progress=False)
    for i, site in enumerate(chosen):
        alone = patch(model, task, [site], intervention, progress=False)
        _close(together.per_example[i], alone.per_example[0], str(site))


def test_embed_site_batched_with_a_layer0_site_is_patched(tiny, tiny_task):
    embed = Site("embed", pos=2)
    alone = patch(tiny, tiny_task, [embed], progress=False)
    together = patch(tiny, tiny_task, [Site("attn_out", 0, pos=2), embed], progress=False)
    assert not torch.allclose(alone.per_example[0], alone.corrupt)  # the patch moves the metric
    _close(together.per_example[1], alone.per_example[0], "embed batched with attn_out L0")


@_settings(15)
@given(cases())
def test_reruns_are_bit_identical(case):
    model, task, chosen = case
    first, second = (patch(model, task, chosen, progress=False) for _ in range(2))
    assert torch.equal(first.per_example, second.per_example)
    assert torch.equal(first.clean, second.clean) and torch.equal(first.corrupt, second.corrupt)


@_settings(15)
@given(cases(max_sites=6), st.integers(1, 4), st.integers(1, 4), st.sampled_from(["denoise", "zero", "steer"]))
def test_chunked_sweep_equals_one_patch(case, cells_per_chunk, examples_per_chunk, name):
    model, task, chosen = case
    intervention = {"denoise": Denoise(), "zero": Zero(), "steer": Steer(torch.ones(()), scale=0.5)}[name]
    whole = patch(model, task, chosen, intervention, progress=False)
    pieces = sweeps.sweep(model, task, chosen, intervention, cells_per_chunk=cells_per_chunk,
                          examples_per_chunk=examples_per_chunk, progress=False)
    _close(pieces.per_example, whole.per_example, f"chunks {cells_per_chunk} x {examples_per_chunk}")
    _close(pieces.clean, whole.clean, "clean baseline")
    assert pieces.grid == whole.grid and pieces.intervention == whole.intervention


# Fuzzed task files ----------------------------------------------------------------------------------

KEYS = ("clean", "corrupt", "answer", "wrong")
# Any text, lone surrogates included (JSON escapes them as \ud800; written raw they are not UTF-8).
strings = st.lists(st.characters() | st.integers(0xD800, 0xDFFF).map(chr), max_size=20).map("".join)
json_values = st.recursive(st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=True)
                           | strings, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(strings, inner, max_size=3), max_leaves=6)
rows = st.dictionaries(st.sampled_from(KEYS + ("extra",)), json_values | strings, max_size=5)
lines = st.one_of(
    st.builds(lambda row, ascii_only: json.dumps(row, ensure_ascii=ascii_only), rows, st.booleans()),
    json_values.map(json.dumps),  # valid JSON that is not an object
    strings,  # free text
    st.builds(lambda row, cut: json.dumps(row)[:cut], rows, st.integers(0, 40)),  # truncated objects
    st.sampled_from(["", "   ", "{}", "[]", "null", "NaN",
                     '{"clean": "a", "corrupt": "a", "answer": " b", "wrong": " c"}']),
).map(lambda line: line.encode("utf-8", "surrogatepass")) | st.binary(max_size=40)


@pytest.mark.slow
@_settings(40)
@given(st.lists(lines, max_size=4))
def test_fuzzed_jsonl_fails_only_with_task_errors(smollm2, tmp_path_factory, content):
    path = tmp_path_factory.mktemp("fuzz") / "task.jsonl"
    path.write_bytes(b"\n".join(content))
    try:
        task = from_jsonl(smollm2, path)
    except TaskError as error:
        assert str(error)  # the message names the problem
        return
    assert task.clean.shape == task.corrupt.shape and task.answer.shape == (task.n_examples,)


@pytest.mark.slow
@_settings(25)
@given(st.text(max_size=30), st.booleans(), st.integers(1, 3))
def test_any_text_in_a_well_formed_task_file_parses(smollm2, tmp_path_factory, text, ascii_only, n):
    row = {"clean": text, "corrupt": text, "answer": " Paris", "wrong": " Rome"}
    path = tmp_path_factory.mktemp("rows") / "task.jsonl"
    path.write_text("\n".join([json.dumps(row, ensure_ascii=ascii_only)] * n), encoding="utf-8")
    task = from_jsonl(smollm2, path)
    assert torch.equal(task.clean, smollm2.to_tokens(text).expand(n, -1))
    assert task.answer.tolist() == [smollm2.to_single_token(" Paris")] * n


# Inputs past the limits of UTF-8, the JSON parser or Python's integers must still end in a TaskError.
@pytest.mark.slow
@pytest.mark.parametrize("content", [
    pytest.param(b"\xff\xfe{}\n", id="invalid-utf8"),
    pytest.param(b"[" * 100_000 + b"]" * 100_000, id="deep-nesting"),  # past the JSON parser's recursion limit
    pytest.param(b'{"clean": "a\\ud800", "corrupt": "a\\ud800", "answer": " b", "wrong": " c"}', id="lone-surrogate"),
    pytest.param(b'{"clean": ' + b"1" * 5000 + b"}", id="huge-integer"),  # past Python's int digit limit
])
def test_malformed_task_files_raise_task_errors(smollm2, tmp_path, content):
    path = tmp_path / "task.jsonl"
    path.write_bytes(content)
    with pytest.raises(TaskError):
        from_jsonl(smollm2, path)


@pytest.mark.slow
def test_unicode_line_separators_inside_strings_parse(smollm2, tmp_path):
    row = {"clean": "Paris\u2028is", "corrupt": "Paris\u2028is", "answer": " a", "wrong": " b"}
    path = tmp_path / "task.jsonl"
    path.write_text(json.dumps(row, ensure_ascii=False), encoding="utf-8")
    assert from_jsonl(smollm2, path).n_examples == 1


# Fuzzed command lines -------------------------------------------------------------------------------

def _fake_patch(model, task, sites, intervention=Denoise(), **kwargs):
    """The engine's input checks and result type without its forward passes (tested elsewhere)."""
    grid = sites if isinstance(sites, Grid) else Grid.of(list(sites))
    validate(grid.sites, model, task.n_pos)
    n = task.n_examples
    intervention(torch.zeros(n, 1), torch.zeros(n, 1))  # e.g. Resample refuses a single example
    per_example = torch.linspace(-1, 1, len(grid) * n).reshape(*grid.shape, n)
    return Effects(per_example.mean(-1), per_example, clean=torch.ones(n), corrupt=-torch.ones(n), grid=grid,
                   base_run=intervention.base_run, intervention=intervention.name, metric=task.metric.name)


words = st.text(st.characters(codec="ascii", exclude_categories=["Cc"]), max_size=8)


def _mostly(valid):
    """Mostly `valid`, else a random word (hypothesis does not weight the branches of `one_of` evenly)."""
    return st.integers(0, 3).flatmap(lambda i: words if i == 3 else valid)


flags = {
    "--model": _mostly(st.sampled_from(["smollm2-135m", "smollm2-135m", "./no-such-dir", "no-such/model", ""])),
    "--task": _mostly(st.sampled_from(["ioi", "facts", "missing.jsonl", "bad.jsonl", "good.jsonl"])),
    "--n": _mostly(st.integers(-2, 6).map(str)),
    "--seed": _mostly(st.integers(-3, 2**40).map(str)),
    "--metric": _mostly(st.sampled_from(["logit_diff", "answer_prob", "kl"])),
    "--sites": st.lists(_mostly(st.sampled_from(sorted(KINDS))), min_size=1, max_size=3).map(",".join),
    "--intervention": _mostly(st.sampled_from(["denoise", "noise", "zero", "mean", "resample", "gaussian"])),
    "--layers": st.lists(_mostly(st.integers(-2, 31).map(str)), min_size=1, max_size=3).map(",".join),
    "--out": st.sampled_from(["out", "out/nested", ".", "bad.jsonl"]),
}


@st.composite
def command_lines(draw):
    """Mostly `patch` with an --out, so that most lines get past argparse to mechattr's own checks."""
    command = draw(_mostly(st.integers(0, 9).map(lambda i: (["patch"] * 6 + ["demo", "pach", "--help", ""])[i])))
    chosen = draw(st.lists(st.sampled_from(sorted(flags) * 3 + ["--per-position", "--bogus"]), max_size=6))
    argv = [command] + (["--out", draw(flags["--out"])] if command == "patch" and draw(st.integers(0, 4)) else [])
    for flag in chosen:
        argv.append(flag)
        if flag in flags and draw(st.integers(0, 9)):  # now and then a flag without its value
            argv.append(draw(flags[flag]))
    return argv


def _fake_attribute(model, task, sites, method="atp", *, steps=8, intervention=Denoise(), **kwargs):
    return replace(_fake_patch(model, task, sites, intervention), method=method)


def _fake_discover(model, task, level="node", *, method="atp", ablation=Noise(), target=0.8, threshold=0.01,
                   points=24, prune=True):
    """A two-node circuit after the same input checks as `discover`."""
    from mechattr.circuits import LEVELS, Circuit

    if level not in LEVELS or points < 1:
        raise ValueError(f"bad level {level!r} or points {points}")
    nodes = (Site("embed", 0), Site("z", 29, head=0))
    return Circuit(level="node", nodes=nodes, edges=(), ranking=nodes, scores=(1.0, 0.5), sizes=(0, 1, 2),
                   curve=(0.0, 0.5, 1.0), faithfulness=1.0, clean_metric=1.0, corrupt_metric=-1.0,
                   meta={"method": method})


research_flags = {
    "--method": _mostly(st.sampled_from(["atp", "atp*", "ig"])),
    "--steps": _mostly(st.integers(-1, 4).map(str)),
    "--effects": st.sampled_from(["est", "est/effects.safetensors", "two", "nowhere", "bad.jsonl"]),
    "--kind": _mostly(st.sampled_from(["z", "mlp_out"])),
    "--top": _mostly(st.integers(-1, 4).map(str)),
    "--sample": _mostly(st.integers(-1, 4).map(str)),
    "--level": _mostly(st.sampled_from(["node", "edge"])),
    "--ablation": _mostly(st.sampled_from(["noise", "mean", "zero", "resample"])),
    "--points": _mostly(st.integers(-1, 5).map(str)),
    "--target": _mostly(st.sampled_from(["0.8", "1.5", "-1"])),
}


@st.composite
def research_command_lines(draw):
    """attribute, verify and discover with their own flags and the task flags."""
    command = draw(st.sampled_from(["attribute", "verify", "discover"]))
    pool = sorted({"--model", "--task", "--n", "--seed", "--metric"} | set(research_flags)) + ["--no-prune"]
    argv = [command, "--out", draw(flags["--out"])] if draw(st.integers(0, 5)) else [command]
    if command == "verify" and draw(st.integers(0, 5)):
        argv += ["--effects", draw(research_flags["--effects"])]
    for flag in draw(st.lists(st.sampled_from(pool), max_size=5)):
        argv.append(flag)
        if flag != "--no-prune" and draw(st.integers(0, 9)):
            argv.append(draw({**flags, **research_flags}[flag]))
    return argv


def _run_cli(smollm2, root, argv: list[str]) -> tuple[int, str]:
    """`mechattr.cli.main(argv)` in `root` with the session's SmolLM2, the fake engine and figures saved as
    empty files (rendering is most of a run's time): (exit status, stderr)."""
    from matplotlib.figure import Figure

    err = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, redirect_stderr(err), redirect_stdout(io.StringIO()):
        mp.chdir(root)
        mp.setattr(mechattr, "patch", _fake_patch)
        mp.setattr(mechattr.patching, "patch", _fake_patch)  # what `verify` calls
        mp.setattr(mechattr, "attribute", _fake_attribute)
        mp.setattr(mechattr, "discover", _fake_discover)
        mp.setattr(Figure, "savefig", lambda self, target, **kwargs: Path(target).write_bytes(b""))
        mp.setattr(mechattr, "load_model", lambda name="smollm2-135m", *a, **k: smollm2 if name == "smollm2-135m"
                   else mechattr.models.load_model(name, *a, **k))
        try:
            status = mechattr.cli.main(argv)
        except SystemExit as exit:  # argparse's own usage errors and --help
            status = exit.code
    return status, err.getvalue().strip()


def _ends_in_a_status(smollm2, root, argv: list[str]) -> None:
    """The command line ends in exit 0, or in exit 2 with a message."""
    status, message = _run_cli(smollm2, root, argv)
    event(f"{argv[0] if argv else ''} exit {status}: {message.rpartition('error: ')[2][:25]}")
    assert status in (0, 2), argv
    assert status == 0 or message, argv


@pytest.mark.slow
@_settings(50)
@given(command_lines())
def test_fuzzed_command_lines_end_in_a_status(smollm2, tmp_path_factory, argv):
    root = tmp_path_factory.mktemp("cli")
    (root / "bad.jsonl").write_text('{"clean": 1}\n')
    (root / "good.jsonl").write_text(json.dumps({"clean": "The Eiffel Tower is in", "corrupt": "The Colosseum is in",
                                                 "answer": " Paris", "wrong": " Rome"}) + "\n")
    _ends_in_a_status(smollm2, root, argv)


@pytest.mark.slow
def test_out_naming_a_file_is_bad_input(smollm2, tmp_path):
    (tmp_path / "taken").write_text("")
    argv = ["patch", "--n", "2", "--sites", "resid_pre", "--layers", "29", "--out", "taken"]
    assert _run_cli(smollm2, tmp_path, argv)[0] == 2


def test_empty_grid_is_refused_with_a_value_error(tiny, tiny_task):
    with pytest.raises(ValueError):
        patch(tiny, tiny_task, mechattr.grid(tiny, "resid_pre", tiny_task.n_pos, layers=[]), progress=False)


@pytest.mark.slow
@_settings(40)
@given(research_command_lines())
def test_fuzzed_research_command_lines_end_in_a_status(smollm2, tmp_path_factory, argv):
    root = tmp_path_factory.mktemp("cli")
    (root / "bad.jsonl").write_text('{"clean": 1}\n')
    task = mechattr.tasks.ioi(smollm2, n=8, seed=0)
    estimate = _fake_attribute(smollm2, task, mechattr.grid(smollm2, "z", layers=[29]))
    mechattr.effects.save_effects(root / "est", [estimate], model="smollm2-135m", task="ioi", task_spec="ioi", n=8, seed=0)
    blocks = _fake_patch(smollm2, task, mechattr.grid(smollm2, "mlp_out", task.n_pos, layers=[29]))
    mechattr.effects.save_effects(root / "two", [estimate, blocks], model="smollm2-135m", task="ioi")
    _ends_in_a_status(smollm2, root, argv)
