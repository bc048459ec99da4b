"""mechattr: causal attribution for transformers, from the do-operator to precision fine-tuning.

The package in layers, each built on the ones before it:

- the engine: `models` (loading, and the facts the engine reads off a model), `gguf` (GGUF files),
  `families` (the architectures checked), `sites`, `interventions`, `tasks`, `forward` (resumed forwards), `runs` (a task's two unpatched runs), `patching`, `effects`
  (labelled results), `graph` (nodes and edges), `sweeps` and `distributed` (scale);
- the estimates: `attribution`, `edges`, `ablation`, `circuits`, `verification`, `selection`;
- shared: `stats`, `storage`;
- precision fine-tuning: `finetune`; the paper's causal attribution model: `causal`; figures: `plots`;
- the application: `app` (`mechattr run`) and `cli`.
"""

import importlib.metadata as _metadata

from mechattr.attribution import attribute
from mechattr.circuits import Circuit, discover
from mechattr.effects import Effects, load_effects, save_effects
from mechattr.interventions import Denoise, GaussianNoise, Mean, Noise, Resample, Steer, Zero
from mechattr.models import NativeConfig, load_model, native_model
from mechattr.patching import patch
from mechattr.selection import select
from mechattr.sites import Site, grid
from mechattr.tasks import Task
from mechattr.verification import verify

try:
    __version__ = _metadata.version("mechattr")
except _metadata.PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["__version__", "load_model", "native_model", "NativeConfig", "Site", "grid", "Task", "Denoise", "Noise", "Zero", "Mean",
           "Resample", "GaussianNoise", "Steer", "patch", "attribute", "Effects", "load_effects", "save_effects",
           "verify", "discover", "Circuit", "select"]
