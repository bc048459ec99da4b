"""Interventions: the value a do-operator sets a site to.

Every intervention is a small final class with one signature, `__call__(base, source) -> Tensor`:
`base` is the site's activation in the run being intervened on and `source` its activation in the
other run, both shaped [example, *site]. `base_run` names which of the task's two runs is intervened
on ("clean" or "corrupt"); the engine feeds the other as the source.
"""

from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
from jaxtyping import Float
from torch import Tensor

__all__ = ["Intervention", "Denoise", "Noise", "Zero", "Mean", "Resample", "GaussianNoise", "Steer", "by_name"]

Run = Literal["clean", "corrupt"]


class Intervention:
    """Base class: do(site := self(base, source))."""

    base_run: ClassVar[Run] = "clean"
    name: ClassVar[str] = "intervention"

    def __call__(self, base: Float[Tensor, "example *site"], source: Float[Tensor, "example *site"]
                 ) -> Float[Tensor, "example *site"]:
        raise NotImplementedError


@dataclass(frozen=True)
class Denoise(Intervention):
    """Clean activation into the corrupted run: is the site sufficient to restore the behaviour?"""

    base_run: ClassVar[Run] = "corrupt"
    name: ClassVar[str] = "denoise"

    def __call__(self, base, source):
        return source


@dataclass(frozen=True)
class Noise(Intervention):
    """Corrupted activation into the clean run: is the site necessary for the behaviour?"""

    base_run: ClassVar[Run] = "clean"
    name: ClassVar[str] = "noise"

    def __call__(self, base, source):
        return source


@dataclass(frozen=True)
class Zero(Intervention):
    """Zero ablation of the clean run."""

    name: ClassVar[str] = "zero"

    def __call__(self, base, source):
        return torch.zeros_like(base)


@dataclass(frozen=True)
class Mean(Intervention):
    """Mean ablation: every example's activation set to its mean over the task's clean and corrupted runs."""

    name: ClassVar[str] = "mean"

    def __call__(self, base, source):
        return torch.cat([base, source]).mean(0, keepdim=True).expand_as(base)


@dataclass(frozen=True)
class Resample(Intervention):
    """Resample ablation: each example gets another example's clean activation (a seeded derangement)."""

    seed: int = 0
    name: ClassVar[str] = "resample"

    def __call__(self, base, source):
        n = base.shape[0]
        if n < 2:
            raise ValueError("resample ablation needs a task with at least 2 examples, got 1")
        generator = torch.Generator().manual_seed(self.seed)
        # A random cyclic shift of a random order never maps an example to itself.
        order = torch.randperm(n, generator=generator)
        shift = int(torch.randint(1, n, (1,), generator=generator))
        donor = torch.empty(n, dtype=torch.long)
        donor[order] = order.roll(shift)
        return base[donor]


@dataclass(frozen=True)
class GaussianNoise(Intervention):
    """base + std * N(0, 1), seeded. On `embed` sites with std = 3 x the embedding std, this is
    ROME-style causal tracing's corruption (Meng et al. 2022)."""

    std: float = 0.1
    seed: int = 0
    name: ClassVar[str] = "gaussian"

    def __call__(self, base, source):
        generator = torch.Generator().manual_seed(self.seed)
        noise = torch.randn(base.shape, generator=generator, dtype=base.dtype)
        return base + self.std * noise.to(base.device)


@dataclass(frozen=True, eq=False)
class Steer(Intervention):
    """Add `scale * vector` (broadcast over the site's activation) to the clean run."""

    vector: Tensor = field(default_factory=lambda: torch.zeros(()))
    scale: float = 1.0
    name: ClassVar[str] = "steer"

    def __call__(self, base, source):
        return base + self.scale * self.vector.to(base.device, base.dtype)


_BY_NAME = {cls.name: cls for cls in (Denoise, Noise, Zero, Mean, Resample, GaussianNoise)}


def by_name(name: str) -> Intervention:
    """The default-configured intervention called `name` (as used by the CLI)."""
    if name not in _BY_NAME:
        raise ValueError(f"unknown intervention {name!r}; valid: {', '.join(_BY_NAME)}")
    return _BY_NAME[name]()
