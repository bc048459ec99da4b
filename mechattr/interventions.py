"""Interventions: the value a do-operator sets a site to.

Every intervention is a small final class with one signature, `__call__(base, source) -> Tensor`:
`base` is the site's activation in the run being intervened on and `source` its activation in the
other run, both shaped [example, *site]. `base_run` names which of the task's two runs is intervened
on ("clean" or "corrupt"); the engine feeds the other as the source.

`INTERVENTIONS` is the registry, by name. What an intervention allows is a class attribute
(`examplewise`, `commutes_with_rotary`, `takes_source`, `ablates`, `by_name_ok`; see `Intervention`),
read by the engine and the command line.
"""

from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, ClassVar, Literal

import torch
from jaxtyping import Float
from torch import Tensor

__all__ = ["Intervention", "Denoise", "Noise", "Zero", "Mean", "Resample", "GaussianNoise", "Steer",
           "INTERVENTIONS", "by_name", "arguments", "from_arguments"]

Run = Literal["clean", "corrupt"]
Activation = Float[Tensor, "example *site"]


class Intervention:
    """Base class: do(site := self(base, source)). Capabilities are class attributes, read by the engine
    and the command line instead of lists of classes."""

    base_run: ClassVar[Run] = "clean"
    name: ClassVar[str] = "intervention"
    # Each example's value depends on that example's activations alone, so chunks of examples can be
    # computed apart (sweeps, distributed runs).
    examplewise: ClassVar[bool] = False
    # Commutes with a fixed linear map per position (rotary embeddings): intervening on the rotated
    # activation equals rotating the intervened one (a per-example mean, a permutation of examples, a run).
    commutes_with_rotary: ClassVar[bool] = False
    # The value is the other run's activation, the end point integrated gradients interpolate towards.
    takes_source: ClassVar[bool] = False
    # Sets the clean run's activation to a value the task's behaviour should not rest on: an ablation for
    # circuit discovery (what the components outside a circuit get).
    ablates: ClassVar[bool] = False
    # The default-configured instance (`by_name`) is meaningful; `Steer` needs a vector.
    by_name_ok: ClassVar[bool] = True

    def __call__(self, base: Activation, source: Activation) -> Activation:
        raise NotImplementedError


@dataclass(frozen=True)
class _Source(Intervention):
    """The other run's activation."""

    examplewise = True
    commutes_with_rotary = True
    takes_source = True

    def __call__(self, base: Activation, source: Activation) -> Activation:
        return source


@dataclass(frozen=True)
class Denoise(_Source):
    """Clean activation into the corrupted run: is the site sufficient to restore the behaviour?"""

    base_run: ClassVar[Run] = "corrupt"
    name: ClassVar[str] = "denoise"


@dataclass(frozen=True)
class Noise(_Source):
    """Corrupted activation into the clean run: is the site necessary for the behaviour?"""

    base_run: ClassVar[Run] = "clean"
    name: ClassVar[str] = "noise"
    ablates = True


@dataclass(frozen=True)
class Zero(Intervention):
    """Zero ablation of the clean run."""

    name: ClassVar[str] = "zero"
    examplewise = True
    commutes_with_rotary = True
    ablates = True

    def __call__(self, base: Activation, source: Activation) -> Activation:
        return torch.zeros_like(base)


@dataclass(frozen=True)
class Mean(Intervention):
    """Mean ablation: every example's activation set to its mean over the task's clean and corrupted runs."""

    name: ClassVar[str] = "mean"
    commutes_with_rotary = True
    ablates = True

    def __call__(self, base: Activation, source: Activation) -> Activation:
        return torch.cat([base, source]).mean(0, keepdim=True).expand_as(base)


@dataclass(frozen=True)
class Resample(Intervention):
    """Resample ablation: each example gets another example's clean activation (a seeded derangement)."""

    seed: int = 0
    name: ClassVar[str] = "resample"
    commutes_with_rotary = True
    ablates = True

    def __call__(self, base: Activation, source: Activation) -> Activation:
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

    def __call__(self, base: Activation, source: Activation) -> Activation:
        generator = torch.Generator().manual_seed(self.seed)
        noise = torch.randn(base.shape, generator=generator, dtype=base.dtype)
        return base + self.std * noise.to(base.device)


@dataclass(frozen=True, eq=False)
class Steer(Intervention):
    """Add `scale * vector` (broadcast over the site's activation) to the clean run."""

    vector: Tensor = field(default_factory=lambda: torch.zeros(()))
    scale: float = 1.0
    name: ClassVar[str] = "steer"
    examplewise = True
    by_name_ok = False

    def __call__(self, base: Activation, source: Activation) -> Activation:
        return base + self.scale * self.vector.to(base.device, base.dtype)


# The registry, in the order the command line lists them.
INTERVENTIONS: dict[str, type[Intervention]] = {
    cls.name: cls for cls in (Denoise, Noise, Mean, Zero, Resample, GaussianNoise, Steer)}


def by_name(name: str) -> Intervention:
    """The default-configured intervention called `name` (as used by the command line)."""
    usable = [n for n, cls in INTERVENTIONS.items() if cls.by_name_ok]
    if name not in usable:
        needs = INTERVENTIONS.get(name)
        hint = f" ({name} needs arguments: construct {needs.__name__}(...))" if needs is not None else ""
        raise ValueError(f"unknown intervention {name!r}{hint}; valid: {', '.join(usable)}")
    return INTERVENTIONS[name]()


def arguments(intervention: Intervention) -> dict[str, Any] | None:
    """The intervention's constructor arguments as JSON values ({} for one that takes none), or None when
    they are not (a `Steer` vector) or not known (a class that is not a dataclass)."""
    if not is_dataclass(intervention):
        return None
    values = {f.name: getattr(intervention, f.name) for f in fields(intervention)}
    return values if all(isinstance(v, (bool, int, float, str)) for v in values.values()) else None


def from_arguments(name: str, args: dict[str, Any] | None) -> Intervention | None:
    """The registered intervention `name` built from `args` (see `arguments`); without them, only one
    that takes no arguments can be rebuilt exactly, so the others give None."""
    cls = INTERVENTIONS.get(name)
    if cls is None:
        return None
    if args is None:
        return cls() if is_dataclass(cls) and not fields(cls) else None
    return cls(**args)
