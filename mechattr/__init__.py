"""mechattr: causal attribution for transformers, from the do-operator to precision fine-tuning."""

from mechattr.attribution import attribute
from mechattr.circuits import Circuit, discover
from mechattr.effects import Effects, load_effects, save_effects
from mechattr.interventions import Denoise, GaussianNoise, Mean, Noise, Resample, Steer, Zero
from mechattr.models import NativeConfig, load_model, native_model
from mechattr.patching import patch
from mechattr.selection import SiteSet, select
from mechattr.sites import Grid, Site, grid
from mechattr.tasks import Task
from mechattr.verification import Verification, verify

__all__ = ["Effects", "load_effects", "save_effects", "Denoise", "Noise", "Zero", "Mean", "Resample",
           "GaussianNoise", "Steer", "NativeConfig", "load_model", "native_model", "patch", "Grid", "Site",
           "grid", "Task", "attribute", "verify", "Verification", "discover", "Circuit", "select", "SiteSet"]
