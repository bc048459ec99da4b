"""mechattr: causal attribution for transformers, from the do-operator to precision fine-tuning.

The package in layers, each built on the ones before it:

- the engine: `models` (loading, and the facts the engine reads off a model), `gguf` (GGUF files),
  `families` (the architectures checked), `sites`, `interventions`, `tasks`, `forward` (resumed
  forwards), `runs` (a task's two unpatched runs), `cells` (patched runs), `patching`, `effects`
  (labelled results), `graph` (nodes and edges), `sweeps` and `distributed` (scale);
- the estimates: `attribution`, `relevance` (RelP's rules), `edges`, `ablation`, `circuits`,
  `faithfulness` (MIB's measure of a ranking), `verification`, `selection`;
- shared: `stats`, `storage`, `moved` (old names, resolved with a DeprecationWarning);
- precision fine-tuning: `finetune`; the paper's causal attribution model: `causal`; figures: `plots`;
- the application: `app` (`mechattr run`) and `cli`.
"""

import importlib as _importlib
import importlib.metadata as _metadata

from mechattr import interventions, tasks
from mechattr.attribution import attribute
from mechattr.circuits import discover
from mechattr.effects import Effects
from mechattr.models import load_model, native_model
from mechattr.moved import moved_names as _moved_names
from mechattr.patching import patch
from mechattr.runs import unpatched
from mechattr.selection import select
from mechattr.sites import Site, grid
from mechattr.tasks import Task
from mechattr.verification import verify

try:
    __version__ = _metadata.version("mechattr")
except _metadata.PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["__version__", "load_model", "native_model", "Site", "grid", "Task", "interventions", "unpatched", "patch",
           "attribute", "Effects", "select", "verify", "discover", "tasks", "plots", "finetune"]

# Imported on first use: matplotlib and the trainer cost seconds that patching alone does not need.
_LAZY = ("plots", "finetune", "causal")
# Names the package exported before its front door shrank, and where they live now.
_moved = _moved_names("mechattr", {
    **{name: f"mechattr.interventions.{name}" for name in ("Denoise", "Noise", "Zero", "Mean", "Resample",
                                                            "GaussianNoise", "Steer")},
    "NativeConfig": "mechattr.models.NativeConfig", "Circuit": "mechattr.circuits.Circuit",
    "load_effects": "mechattr.effects.load_effects", "save_effects": "mechattr.effects.save_effects"})


def __getattr__(name: str):
    if name in _LAZY:
        return _importlib.import_module(f"mechattr.{name}")
    return _moved(name)
