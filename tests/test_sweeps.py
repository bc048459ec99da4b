import functools
import json
from dataclasses import replace

import pytest
import torch

import mechattr
from mechattr import Site, grid, patch, sweeps
from mechattr.attribution import attribute
from mechattr.interventions import Denoise, Mean, Zero


class Interrupted(Exception):
    pass


def _counting(compute):
    """`compute` that records the sites and the clean prompts of every call (under its name: a sweep's
    directory records which function computed it)."""
    calls = []

    @functools.wraps(compute)
    def run(model, task, sites, **kwargs):
        calls.append((tuple(sites), tuple(map(tuple, task.clean.tolist()))))
        return compute(model, task, sites, **kwargs)
    run.calls = calls
    return run


@pytest.fixture
def resid(tiny, tiny_task):
    return grid(tiny, "resid_pre", tiny_task.n_pos)  # 2 layers x 7 positions


def test_interrupted_sweep_resumes_with_only_the_missing_chunks(tiny, tiny_task, resid, tmp_path):
    chunks = {"cells_per_chunk": 4, "examples_per_chunk": 2}  # 4 x 2 chunks

    def stop_after_three(done, total):
        assert total == 8
        if done == 3:
            raise Interrupted

    with pytest.raises(Interrupted):
        sweeps.sweep(tiny, tiny_task, resid, directory=tmp_path / "run", on_chunk=stop_after_three, progress=False,
                     **chunks)
    assert len(list((tmp_path / "run").glob("chunk-*.safetensors"))) == 3
    compute = _counting(patch)
    resumed = sweeps.sweep(tiny, tiny_task, resid, compute=compute, directory=tmp_path / "run", progress=False,
                           **chunks)
    assert len(compute.calls) == 5
    # Chunks run examples-major: the first three were cells 0-3, 4-7 and 8-11 of examples 0-1.
    rows = [tuple(map(tuple, tiny_task.clean[i:i + 2].tolist())) for i in (0, 2)]
    expected = [(resid.sites[12:14], rows[0])] + [(resid.sites[c:c + 4], rows[1]) for c in (0, 4, 8, 12)]
    assert compute.calls == expected
    whole = sweeps.sweep(tiny, tiny_task, resid, directory=tmp_path / "uninterrupted", progress=False, **chunks)
    assert torch.equal(resumed.per_example, whole.per_example) and torch.equal(resumed.values, whole.values)
    assert torch.equal(resumed.clean, whole.clean) and torch.equal(resumed.corrupt, whole.corrupt)
    assert resumed.grid == resid and resumed.meta == whole.meta and resumed.str_tokens == whole.str_tokens
    reference = patch(tiny, tiny_task, resid, progress=False)
    torch.testing.assert_close(resumed.per_example, reference.per_example, atol=1e-5, rtol=0)
    assert reference.per_example.std() > 0.1  # not trivially constant


def test_finished_sweep_computes_nothing_and_ignores_half_written_files(tiny, tiny_task, resid, tmp_path):
    first = sweeps.sweep(tiny, tiny_task, resid, cells_per_chunk=5, directory=tmp_path, progress=False)
    (tmp_path / ".chunk-00000-00000.safetensors.999.tmp").write_bytes(b"truncated")  # a killed writer's leftover
    compute = _counting(patch)
    again = sweeps.sweep(tiny, tiny_task, resid, compute=compute, cells_per_chunk=5, directory=tmp_path,
                         max_memory=2**20, progress=None)  # run-only arguments may change
    assert compute.calls == []
    assert torch.equal(again.per_example, first.per_example)


@pytest.mark.parametrize("change, field", [
    (lambda kw: {**kw, "intervention": Zero()}, "intervention"),
    (lambda kw: {**kw, "cells_per_chunk": 3}, "chunks"),
    (lambda kw: {**kw, "task": replace(kw["task"], answer=kw["task"].wrong)}, "task"),
    (lambda kw: {**kw, "sites": [Site("z", 0, head=1)]}, "grid"),
    (lambda kw: {**kw, "resume": False}, "arguments"),
], ids=["intervention", "chunks", "task", "grid", "arguments"])
def test_a_directory_of_another_sweep_is_refused(tiny, tiny_task, resid, tmp_path, change, field):
    kwargs = {"model": tiny, "task": tiny_task, "sites": resid, "intervention": Denoise(), "cells_per_chunk": 7,
              "directory": tmp_path, "progress": False}
    sweeps.sweep(**kwargs)
    with pytest.raises(ValueError, match=f"a different {field};"):
        sweeps.sweep(**change(kwargs))


def test_changed_weights_are_refused(tiny_task, tmp_path):
    model = mechattr.native_model()
    sites = [Site("mlp_out", 1, pos=6)]
    sweeps.sweep(model, tiny_task, sites, directory=tmp_path, progress=False)
    with torch.no_grad():
        list(model.parameters())[-1].add_(1e-3)
    with pytest.raises(ValueError, match="a different model;"):
        sweeps.sweep(model, tiny_task, sites, directory=tmp_path, progress=False)


def test_whole_task_interventions_split_only_by_cells(tiny, tiny_task, resid):
    with pytest.raises(ValueError, match="'mean' reads every example.*denoise, noise, zero, steer"):
        sweeps.sweep(tiny, tiny_task, resid, Mean(), examples_per_chunk=2)
    split = sweeps.sweep(tiny, tiny_task, resid, Mean(), cells_per_chunk=3, progress=False)
    torch.testing.assert_close(split.per_example, patch(tiny, tiny_task, resid, Mean(), progress=False).per_example,
                               atol=1e-5, rtol=0)


def test_attribution_sweeps_in_chunks(tiny, tiny_task):
    z = grid(tiny, "z")
    split = sweeps.sweep(tiny, tiny_task, z, compute=attribute, method="atp", cells_per_chunk=3, examples_per_chunk=3)
    whole = attribute(tiny, tiny_task, z, "atp")
    torch.testing.assert_close(split.per_example, whole.per_example, atol=1e-5, rtol=0)
    assert split.method == "atp" and split.values.shape == (2, 4)


def test_manifest_names_what_the_directory_holds(tiny, tiny_task, tmp_path):
    sweeps.sweep(tiny, tiny_task, [Site("z", 1, head=3)], cells_per_chunk=1, directory=tmp_path, progress=False)
    manifest = json.loads((tmp_path / "sweep.json").read_text())
    assert manifest["grid"][3] == [["z", 1, None, 3, None]]
    assert manifest["compute"] == "mechattr.patching.patch" and manifest["chunks"] == [1, None]


@pytest.mark.parametrize("size", [0, -1])
def test_chunk_sizes_must_be_positive(tiny, tiny_task, size):
    with pytest.raises(ValueError, match=f"cells_per_chunk must be a positive number, got {size}"):
        sweeps.sweep(tiny, tiny_task, [Site("z", 1, head=3)], cells_per_chunk=size)
