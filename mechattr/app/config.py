"""`RunConfig`: what the main job (`mechattr run`) measures and trains."""

import json
from dataclasses import dataclass, fields
from typing import Any

from mechattr import causal
from mechattr.finetune.methods import BASELINES
from mechattr.models import DEFAULT_MODEL
from mechattr.sites import KINDS
from mechattr.tasks.registry import TASKS

# Generated tasks with room to improve (base held-out accuracy about 55-85%): the budget curves' tasks.
CURVE_TASKS: tuple[str, ...] = ("greater_than", "ioi_distractor")
# What `RunConfig.full()` (`mechattr run --full`) changes: every budget on every task, every baseline.
FULL_CURVES: dict[str, Any] = dict(curve_tasks=CURVE_TASKS, curve_heads=(1, 2, 4, 8, 16), curve_neurons=True,
                                   curve_draws=3, curve_baselines=BASELINES, curve_exact_examples=None)
# ... and the attribution views at full size: both networks' tables, the knowledge view at every layer.
FULL_VIEWS: dict[str, Any] = dict(networks=("asia", "sachs"), component_stride=1)

__all__ = ["RunConfig", "CURVE_TASKS", "FULL_CURVES", "FULL_VIEWS"]


@dataclass(frozen=True)
class RunConfig:
    """What `run` measures and trains (see `mechattr.app.stages` for timings)."""

    model: str = DEFAULT_MODEL  # name for mechattr.load_model
    # Networks of the input-level attribution table. Sachs (11 variables, 110 questions per setting) would
    # add about 3 min to the default job; `full` and notebook 04 show it.
    networks: tuple[str, ...] = ("asia",)
    trials: int = 3  # trials per table (column order, data rows and made-up names redrawn)
    data_tokens: int = 160  # tokens for the data table in each table prompt, beyond the prompt without data
    n_samples: int = 1000  # rows sampled from each network
    component_network: str = "asia"  # network of the component-level knowledge-vs-data patching
    component_kinds: tuple[str, ...] = ("attn_out", "mlp_out")  # patched per layer (all positions at once)
    component_layers: tuple[int, ...] | None = None  # layers patched there (None: every component_stride-th)
    component_stride: int = 2  # with component_layers None: layers 0, stride, 2 * stride, ... (`full`: 1)
    component_rows: int = 3  # data rows in each component prompt
    component_examples: int = 8  # most examples per component task
    component_trials: int = 4  # row redraws per edge; more give more prompts of one token length to keep
    candidates: int = 16  # heads AtP shortlists for exact patching on the training pairs
    top_k: int = 8  # heads precision fine-tuning trains (the top by exact |effect|)
    steps: int = 20  # optimizer steps of every fine-tuning run (fewer leave precision near chance)
    batch_size: int = 8  # examples per step
    lr: float = 1e-3  # learning rate of every method
    seeds: tuple[int, ...] = (0, 1, 2)  # the kept precision delta trains with the first
    heldout: float = 0.3  # share of cause-effect pairs held out from training
    examples: int | None = None  # cause-effect examples used of each split, from its first (None: all)
    reattribute: tuple[str, ...] = ("asia",)  # networks whose table is recomputed on the fine-tuned model
    curve_tasks: tuple[str, ...] = (CURVE_TASKS[0],)  # tasks of the budget curves (train/held-out splits)
    # The default curves are one budget; `full` runs every budget, kind and baseline.
    curve_heads: tuple[int, ...] = (1,)  # head budgets of the curves (`full`: 1, 2, 4, 8, 16)
    curve_neurons: bool = False  # also neuron budgets, matched to the head budgets' parameter counts (`full`)
    curve_seeds: tuple[int, ...] = (0, 1, 2, 3, 4)  # seeds of every curve point
    curve_draws: int = 2  # random site sets per seed
    curve_baselines: tuple[str, ...] = ("random",)  # besides exact- and AtP-selected sites (`full`: all four)
    # Few steps: after 20, every method at every budget from 1 to 16 heads reaches 0.95-1.00 held-out
    # accuracy on greater_than, so accuracy no longer tells the sites apart (docs/budget_curves.md).
    curve_steps: int = 5  # optimizer steps of every curve run
    curve_rank_examples: int = 32  # training examples the sites are ranked on (AtP)
    # The first of those that exact patching ranks on (None: all; `full`). Exact patching costs a forward
    # per head and example: on 8 it takes 0.27-0.30 of the time on 32 and chooses the same head, L6 H0
    # (benchmarks/bench_ranking.py); random sites depend on no ranking.
    curve_exact_examples: int | None = 8
    curve_heldout: int | None = None  # held-out examples scored (None: the whole held-out split)
    curve_others: int = 100  # most examples scored of each other task (collateral accuracy; IOI has 64)
    seed: int = 0  # draws data, prompts, made-up names and the train/held-out split
    fast: bool = False  # a smoke-test configuration (see `quick`); the report says so

    def __post_init__(self):
        def bad(name: str, problem: str) -> None:
            raise ValueError(f"RunConfig.{name}: {problem}")

        for name in ("networks", "reattribute"):
            unknown = [n for n in getattr(self, name) if n not in causal.NETWORKS]
            if unknown or (name == "networks" and not self.networks):
                bad(name, f"unknown network(s) {unknown or '(none given)'}; valid options: {list(causal.NETWORKS)}")
        if self.component_network not in causal.NETWORKS:
            bad("component_network", f"unknown network {self.component_network!r}; valid options: "
                f"{list(causal.NETWORKS)}")
        missing = [n for n in self.reattribute if n not in self.networks]
        if missing:
            bad("reattribute", f"{missing} not in networks {list(self.networks)}: a table after fine-tuning "
                "is compared with the one before")
        unknown_kinds = [k for k in self.component_kinds if k not in KINDS]
        if unknown_kinds or not self.component_kinds:
            bad("component_kinds", f"unknown site kind(s) {unknown_kinds or '(none given)'}; valid: {list(KINDS)}")
        for name, low, why in (("top_k", 1, "a positive number of heads"), ("trials", 2, "at least 2 (intervals)"),
                               ("steps", 1, "at least 1"), ("batch_size", 1, "at least 1"),
                               ("component_rows", 1, "at least 1"), ("component_examples", 2, "at least 2"),
                               ("component_trials", 1, "at least 1"), ("curve_others", 1, "at least 1"),
                               ("component_stride", 1, "at least 1 (1: every layer)"),
                               ("data_tokens", 16, "at least 16 tokens"), ("n_samples", 10, "at least 10 rows")):
            if getattr(self, name) < low:
                bad(name, f"must be {why}, got {getattr(self, name)}")
        if self.curve_exact_examples is not None and self.curve_exact_examples < 1:
            bad("curve_exact_examples", f"need None (every ranking example) or a positive count, got "
                f"{self.curve_exact_examples}")
        if self.component_layers is not None and (not self.component_layers or min(self.component_layers) < 0):
            bad("component_layers", f"need None (every layer) or layer indices >= 0, got {self.component_layers}")
        if self.candidates < self.top_k:
            bad("candidates", f"must be at least top_k={self.top_k}, got {self.candidates}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            bad("seeds", f"need one or more distinct seeds, got {self.seeds}")
        if not 0 < self.heldout < 1:
            bad("heldout", f"must be a share in (0, 1), got {self.heldout}")
        # Two examples per pair (its Yes and its No question): an odd count would train one without the other.
        if self.examples is not None and (self.examples < 2 or self.examples % 2):
            bad("examples", f"need None (all) or an even count >= 2 (whole pairs), got {self.examples}")
        unknown_tasks = [t for t in self.curve_tasks if t not in TASKS or TASKS[t].split is None]
        if unknown_tasks:
            bad("curve_tasks", f"{unknown_tasks} are not tasks with a train/held-out split; valid: "
                f"{[name for name, entry in TASKS.items() if entry.split is not None]}")
        if not self.curve_heads or min(self.curve_heads) < 1 or self.curve_draws < 1:
            bad("curve_heads", f"need positive head budgets and curve_draws >= 1, got {self.curve_heads} and "
                f"{self.curve_draws}")
        if not self.curve_seeds or len(set(self.curve_seeds)) != len(self.curve_seeds):
            bad("curve_seeds", f"need one or more distinct seeds, got {self.curve_seeds}")
        if not self.lr > 0:
            bad("lr", f"must be positive, got {self.lr}")

    def knowledge_layers(self, n_layers: int) -> tuple[int, ...]:
        """The layers the component view patches on a model of `n_layers` blocks."""
        return self.component_layers or tuple(range(0, n_layers, self.component_stride))

    @classmethod
    def quick(cls, **changes: Any) -> "RunConfig":
        """A small configuration for tests and CI: the 5-variable cancer network, short prompts, few layers,
        heads, steps and seeds."""
        small = dict(networks=("cancer",), trials=2, data_tokens=48, n_samples=200, component_network="cancer",
                     component_kinds=("attn_out",), component_layers=(12, 24), component_rows=2,
                     component_examples=4, component_trials=2, candidates=4, top_k=4, steps=4, seeds=(0,),
                     examples=16,
                     reattribute=("cancer",), curve_heads=(1,), curve_neurons=False, curve_seeds=(0,),
                     curve_draws=1, curve_baselines=("random",), curve_steps=2, curve_rank_examples=2,
                     curve_heldout=16, curve_others=16, fast=True)
        return cls(**{**small, **changes})

    @classmethod
    def full(cls, **changes: Any) -> "RunConfig":
        """Every budget curve (both generated tasks, 1-16 heads and matched neurons, every baseline), both
        networks' tables and the knowledge view at every layer."""
        return cls(**{**FULL_CURVES, **FULL_VIEWS, **changes})

    @classmethod
    def from_json(cls, text: str) -> "RunConfig":
        values = json.loads(text)
        # Runs saved before exact patching could rank on fewer examples ranked on every one.
        values.setdefault("curve_exact_examples", None)
        return cls(**{f.name: tuple(values[f.name]) if isinstance(values[f.name], list) else values[f.name]
                      for f in fields(cls) if f.name in values})
