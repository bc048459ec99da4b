"""Fine-tuning methods to compare: each turns a fresh base model into (model to train, masks, sites).

Precision fine-tuning trains the top-k sites of an `Effects` (exact patching, or an attribution
estimate); the baselines train the bottom-k sites, a random set of sites with as many trained
parameters, LoRA adapters of about as many parameters (peft), or everything.
"""

import copy
import functools
import types
import random
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch
from jaxtyping import Bool
from torch import Tensor

from mechattr.effects import Effects
from mechattr.finetune.masks import full_masks, masks, n_trained
from mechattr.finetune.trainer import TrainConfig
from mechattr.moved import moved_names
from mechattr.selection import SiteSet, select

__all__ = ["Setup", "Method", "TopSites", "BottomSites", "RandomSites", "LoRA", "Full", "FINETUNE_METHODS", "BASELINES",
           "plain_model"]


@dataclass(frozen=True, eq=False)
class Setup:
    """What one method trains."""

    model: Any  # the model to train: the bridge itself, or a peft-wrapped copy of its HF model
    masks: dict[str, Bool[Tensor, "..."]]  # entries to train, by parameter name of `model`
    sites: SiteSet  # the sites behind the masks (empty for LoRA and full fine-tuning)


class Method:
    """Base class. `target` is the trained-parameter count a matched baseline aims for."""

    name: ClassVar[str] = "method"
    baseline: ClassVar[bool] = True  # compared against precision fine-tuning (which is not a baseline)
    lr: float | None = None  # learning rate for this method; None: the comparison's config

    @property
    def label(self) -> str:
        return self.name

    def build(self, model: Any, seed: int, target: int | None) -> Setup:
        raise NotImplementedError

    def run_config(self, config: TrainConfig, seed: int) -> TrainConfig:
        """`config` with this run's seed and, where the method sets one, its learning rate."""
        return replace(config, seed=seed, lr=config.lr if self.lr is None else self.lr)

    @classmethod
    def against(cls, effects: Effects | list[Effects], k: int, kv: str, **settings: Any) -> "Method":
        """This method set up to compare with precision fine-tuning of the top `k` sites of `effects`;
        `settings` are fields of the method's own (LoRA's `targets`, a learning rate)."""
        return cls(**settings)


def _grids(effects: Effects | list[Effects]) -> list[Effects]:
    return [effects] if isinstance(effects, Effects) else list(effects)


def _ranked(effects: Effects | list[Effects]) -> SiteSet:
    """Every site of the grids, by decreasing |effect| (no significance filter)."""
    grids = _grids(effects)
    return select(grids, top_k=sum(len(e.sites) for e in grids), significant_only=False)


@dataclass(frozen=True, eq=False)
class TopSites(Method):
    """Precision fine-tuning: the `k` sites of largest |effect|."""

    name: ClassVar[str] = "precision"
    baseline: ClassVar[bool] = False

    effects: Effects | list[Effects]
    k: int = 8  # sites to train
    kv: str = "any"  # head sites train their key/value group: "any" (when selected) or "never"
    significant_only: bool = False  # only BH-significant cells are eligible
    tag: str = "precision"  # label in tables (e.g. "precision (attribution)")
    lr: float | None = None

    @property
    def label(self) -> str:
        return self.tag

    @classmethod
    def against(cls, effects: Effects | list[Effects], k: int, kv: str, **settings: Any) -> Method:
        return cls(effects, k=k, kv=kv, **settings)

    def build(self, model, seed, target):
        sites = select(self.effects, top_k=self.k, significant_only=self.significant_only)
        if not len(sites):
            raise ValueError(f"{self.tag}: no site is eligible (significant_only={self.significant_only})")
        return Setup(model, masks(model, sites, self.kv), sites)


@dataclass(frozen=True, eq=False)
class BottomSites(Method):
    """The `k` sites of smallest |effect|: trains as many sites where patching says nothing happens."""

    name: ClassVar[str] = "bottom-k"
    effects: Effects | list[Effects]
    k: int = 8
    kv: str = "any"  # as in TopSites
    lr: float | None = None

    @classmethod
    def against(cls, effects: Effects | list[Effects], k: int, kv: str, **settings: Any) -> Method:
        return cls(effects, k=k, kv=kv, **settings)

    def build(self, model, seed, target):
        ranked = _ranked(self.effects)
        sites = SiteSet(ranked.sites[-self.k:][::-1], ranked.scores[-self.k:][::-1])
        return Setup(model, masks(model, sites, self.kv), sites)


@dataclass(frozen=True, eq=False)
class RandomSites(Method):
    """Random sites from the same grids, drawn (seeded) until the trained-parameter count is closest to
    the target. The draw depends on the grids' sites and the seed only, never on the effects: a ranking
    orders near-equal estimates by their rounding, which changes with the thread count and the hardware."""

    name: ClassVar[str] = "random"
    effects: Effects | list[Effects]
    kv: str = "any"  # as in TopSites
    lr: float | None = None

    @classmethod
    def against(cls, effects: Effects | list[Effects], k: int, kv: str, **settings: Any) -> Method:
        return cls(effects, kv=kv, **settings)  # matches the trained-parameter count, not the number of sites

    def build(self, model, seed, target):
        pool = [site for grid in _grids(self.effects) for site in grid.sites]  # grid order
        random.Random(seed).shuffle(pool)
        # Monotone in j; cached: the search and the final nearest-of-two choice ask for some prefixes twice.
        count = functools.cache(lambda j: n_trained(masks(model, pool[:j], self.kv)))
        if target is None:
            raise ValueError("RandomSites needs a target parameter count (the reference method's)")
        # The smallest prefix reaching the target: doubling from 1, then halving. A budget is a small share
        # of the pool (tens of SmolLM2's 46k neurons), and a count builds the masks of its whole prefix.
        lo, hi = 1, 1
        while hi < len(pool) and count(hi) < target:
            lo, hi = hi + 1, min(2 * hi, len(pool))
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (mid + 1, hi) if count(mid) < target else (lo, mid)
        if lo > 1 and abs(count(lo - 1) - target) <= abs(count(lo) - target):
            lo -= 1
        sites = SiteSet.of(pool[:lo])
        return Setup(model, masks(model, sites, self.kv), sites)


def plain_model(bridge: Any) -> Any:
    """A copy of the model the bridge wraps, with every bridge wrapper removed: plain Hugging Face modules
    holding the bridge's weights (compatibility mode's, if the bridge is in it), so it computes the same
    logits without hooks."""
    def unwrap(module):
        for name, child in list(module.named_children()):
            while hasattr(child, "_original_component"):
                child = child._original_component
            setattr(module, name, child)
            unwrap(child)

    model = copy.deepcopy(bridge.original_model)
    unwrap(model)
    for module in model.modules():
        # TransformerLens replaces Falcon's linear layers' forward with closures over the bridge's module: a
        # copy would go on computing with the bridge's tensors, and a reloaded model runs the class's forward.
        if isinstance(vars(module).get("forward"), types.FunctionType):
            del module.forward
    # Which weights these are: a delta trained on the copy (LoRA) records its coordinates from this.
    model.compatibility_mode = bool(getattr(bridge, "compatibility_mode", False))
    return model


@dataclass(frozen=True, eq=False)
class LoRA(Method):
    """LoRA adapters (peft) on `targets` of a plain copy of the bridge's model, same coordinates. The rank
    is chosen so the adapter count is closest to the target; `rank` fixes it instead."""

    name: ClassVar[str] = "lora"
    targets: tuple[str, ...] = ("q_proj", "v_proj")  # module names to adapt
    rank: int | None = None  # None: match the target parameter count
    lr: float | None = None

    def build(self, model, seed, target):
        from peft import LoraConfig, get_peft_model

        plain = plain_model(model)
        adapted = [m for name, m in plain.named_modules()
                   if isinstance(m, torch.nn.Linear) and name.split(".")[-1] in self.targets]
        if not adapted:
            raise ValueError(f"LoRA targets {self.targets} match no nn.Linear of the model")
        per_rank = sum(m.in_features + m.out_features for m in adapted)
        if self.rank is None and target is None:
            raise ValueError("LoRA needs a rank or a target parameter count")
        rank = self.rank or max(1, round(target / per_rank))
        with torch.random.fork_rng():  # peft draws lora_A from the global generator
            torch.manual_seed(seed)
            peft_model = get_peft_model(plain, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                                                          target_modules=list(self.targets)))
        trained = {n: torch.ones(p.shape, dtype=torch.bool)
                   for n, p in peft_model.named_parameters() if p.requires_grad}
        return Setup(peft_model, trained, SiteSet())


@dataclass(frozen=True, eq=False)
class Full(Method):
    """Full fine-tuning: every parameter, through the same masked trainer (so with the same decay toward
    the base weights). That keeps a base copy and a gradient buffer of every weight: about twice the
    peak memory of a plain AdamW loop (see benchmarks/bench_finetune.py)."""

    name: ClassVar[str] = "full"
    lr: float | None = None

    def build(self, model, seed, target):
        return Setup(model, full_masks(model), SiteSet())


# The registry, the reference first, then the baselines in the order comparisons list them.
FINETUNE_METHODS: dict[str, type[Method]] = {cls.name: cls for cls in (TopSites, RandomSites, BottomSites, LoRA,
                                                                       Full)}
BASELINES: tuple[str, ...] = tuple(name for name, cls in FINETUNE_METHODS.items() if cls.baseline)
__getattr__ = moved_names(__name__, {"METHODS": f"{__name__}.FINETUNE_METHODS"})
