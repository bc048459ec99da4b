"""Names a module exported before a rename or a move, still resolved with a DeprecationWarning."""

import importlib
import warnings
from typing import Any, Callable

__all__ = ["moved_names"]


def moved_names(module: str, moved: dict[str, str]) -> Callable[[str], Any]:
    """A module-level `__getattr__` for `module`: `moved` maps each old name to where it lives now
    ("package.module.name"), which is returned with a DeprecationWarning naming both."""

    def __getattr__(name: str) -> Any:
        if name not in moved:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        where, _, new = moved[name].rpartition(".")
        warnings.warn(f"{module}.{name} moved to {moved[name]}", DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(where), new)

    return __getattr__
