"""Atomic writes: a file appears whole under its name or not at all, and no temporary file is left."""

import json

import pytest
import torch
from safetensors.torch import load_file

from mechattr.storage import write_atomic, write_bytes, write_json, write_safetensors, write_text, write_torch


def test_each_writer_writes_what_it_was_given(tmp_path):
    write_text(tmp_path / "a" / "b.txt", "héllo\n")  # parent directories are created
    write_bytes(tmp_path / "c.bin", b"\x00\x01")
    write_json(tmp_path / "d.json", {"x": [1, 2]}, indent=1)
    tensors = {"w": torch.arange(6.0).reshape(2, 3)}
    write_safetensors(tmp_path / "e.safetensors", tensors, {"note": "m"})
    write_torch(tmp_path / "f.pt", {"step": 3})
    assert (tmp_path / "a" / "b.txt").read_text() == "héllo\n"
    assert (tmp_path / "c.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "d.json").read_text() == json.dumps({"x": [1, 2]}, indent=1) + "\n"
    assert torch.equal(load_file(tmp_path / "e.safetensors")["w"], tensors["w"])
    assert torch.load(tmp_path / "f.pt") == {"step": 3}
    assert sorted(p.name for p in tmp_path.rglob(".*")) == []  # no temporary file left behind


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "metrics.json"
    write_text(path, "old")

    def half_then_fail(tmp):
        tmp.write_text("half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        write_atomic(path, half_then_fail)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_strict_json_has_no_non_finite_numbers(tmp_path):
    value = {"mean": float("nan"), "ci": (0.5, float("inf")), 3: [1.0]}
    write_json(tmp_path / "loose.json", value)
    assert "NaN" in (tmp_path / "loose.json").read_text()  # Python's json accepts it; other readers do not
    write_json(tmp_path / "strict.json", value, strict=True)
    assert json.loads((tmp_path / "strict.json").read_text()) == {"mean": None, "ci": [0.5, None], "3": [1.0]}
    with pytest.raises(TypeError, match="not JSON serializable"):
        write_json(tmp_path / "bad.json", {"t": torch.zeros(1)}, strict=True)
    assert not (tmp_path / "bad.json").exists()
