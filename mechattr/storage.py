"""Atomic file writing: every file mechattr writes appears whole or not at all.

Each writer writes under a temporary name beside the target, then renames it (`os.replace`, atomic on
one file system), so a killed run or a concurrent reader never sees half a file under the real name.
"""

import json
import math
import os
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import save_file
from torch import Tensor

__all__ = ["write_atomic", "write_bytes", "write_text", "jsonable", "write_json", "write_safetensors", "write_torch"]


def write_atomic(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """Call `write(tmp)` on a temporary path beside `path` (parents created), then rename it to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The process id keeps two processes writing one file from sharing a temporary name.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_bytes(path: str | Path, data: bytes) -> Path:
    return write_atomic(path, lambda tmp: tmp.write_bytes(data))


def write_text(path: str | Path, text: str) -> Path:
    return write_atomic(path, lambda tmp: tmp.write_text(text))


def jsonable(value: Any) -> Any:
    """Strict JSON: non-finite floats become null, tuples lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def write_json(path: str | Path, value: Any, indent: int = 2, *, strict: bool = False, **dumps: Any) -> Path:
    """`json.dumps(value, indent=indent, **dumps)` and a final newline; `strict`: as strict JSON (see
    `jsonable`; a value that is still not JSON raises)."""
    if strict:
        value, dumps = jsonable(value), {**dumps, "allow_nan": False}
    return write_text(path, json.dumps(value, indent=indent, **dumps) + "\n")


def write_safetensors(path: str | Path, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> Path:
    return write_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def write_torch(path: str | Path, value: Any) -> Path:
    """`torch.save(value)`; for checkpoints (optimizer state and other Python objects)."""
    return write_atomic(path, lambda tmp: torch.save(value, tmp))
