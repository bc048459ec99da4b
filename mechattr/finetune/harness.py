"""One harness for every comparison of fine-tuning methods (`compare`, `budgets.budget_curves`).

    scorer = Scorer(base, heldout, others=[ioi_task], text=unrelated)     # the base model's scores, once
    method = TopSites(effects, k=4)
    trial = run_trial(method.build(base, 0, None), base, train, method.run_config(config, seed=0), scorer)
    trial.scores.heldout_accuracy, trial.scores.correct                  # base's weights are back after

Every method trains the one base model it is given (LoRA trains a plain copy), and the harness puts the
entries it trained back bit for bit afterwards, so runs never reload the model. Work is done once where
runs share it: the base model's run of the training data and of every scored set (`Prefix`), from
which each run's training steps and scoring start at the lowest block it changed, once that is proved
on the trained model (`Prefix.check`). Only the positions a score or a loss reads are unembedded.
"""

import math
import time
from dataclasses import dataclass, replace
from typing import Any, Mapping, Sequence

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from mechattr.finetune.data import Data, Text, tokens_of
from mechattr.finetune.evaluation import kl_from_base, log_probs, per_example
from mechattr.finetune.memory import PeakMemory
from mechattr.finetune.methods import Setup
from mechattr.finetune.prefix import Prefix, first_block
from mechattr.finetune.trainer import FinetuneResult, TrainConfig, train
from mechattr.models import is_bridge
from mechattr.tasks import Task

__all__ = ["Scores", "Scorer", "Trial", "run_trial", "UNRELATED_TEXT", "unrelated_text"]

# Text unrelated to the built-in tasks, for measuring how much a method changes the model elsewhere.
UNRELATED_TEXT = (
    "The recipe calls for two cups of flour, a pinch of salt and three eggs beaten until smooth.",
    "In 1969 the first crewed spacecraft landed on the Moon, and millions watched the broadcast.",
    "To install the package, open a terminal and run the command shown in the documentation.",
    "The orchestra tuned their instruments while the audience slowly found their seats.",
    "Photosynthesis converts light energy into chemical energy stored in glucose molecules.",
    "She folded the letter carefully, placed it in an envelope and walked to the post office.",
    "The river winds through the valley for forty miles before it reaches the sea.",
    "Prime numbers have exactly two divisors: one and the number itself.",
)


def unrelated_text(model: Any) -> Text:
    """`UNRELATED_TEXT` in windows of 32 tokens, where a model's collateral change (KL) is measured."""
    return Text.from_strings(model, UNRELATED_TEXT, seq_len=32, name="unrelated")


@dataclass(frozen=True, eq=False)
class Scores:
    """A model's scores: held-out metric and accuracy (and per-example correctness), the other tasks'
    metric and accuracy by name, and KL from the base model on the text (nats, mean over positions)."""

    heldout_metric: float
    heldout_accuracy: float
    kl_unrelated: float
    others: dict[str, dict[str, float]]  # name -> {"metric", "accuracy"}
    correct: Bool[Tensor, " n"]  # held-out correctness per example

    def other_accuracy(self) -> dict[str, float]:
        return {name: s["accuracy"] for name, s in self.others.items()}


class Scorer:
    """Scores models against the base model they were trained from: on `heldout`, on `others` (tasks, by
    name: a sequence is named by each task's name), and by KL from the base model on `text`. The base
    model's run of every scored set is computed once, at construction (`Prefix.fill`), with the base
    model's own scores (`base`)."""

    def __init__(self, model: Any, heldout: Task, others: Sequence[Task] | Mapping[str, Task] = (),
                 text: Text | None = None):
        if not isinstance(others, Mapping):
            names = [t.name for t in others]
            if len(set(names)) != len(names):
                raise ValueError(f"Scorer: the other tasks need distinct names, got {names}")
            others = dict(zip(names, others))
        device = next(model.parameters()).device
        self.heldout = heldout.to(device)
        self.others = {name: task.to(device) for name, task in others.items()}
        self.text = None if text is None else replace(text, tokens=text.tokens.to(device))
        self._prefixes: list[Prefix] = []
        if is_bridge(model):
            for task in (self.heldout, *self.others.values()):
                self.prefix(task.clean, task.last).fill(model)
            if self.text is not None:
                self.prefix(self.text.tokens, None).fill(model)
        after = len(model.blocks) if is_bridge(model) else None  # the base model's own run: nothing to rerun
        self.base_text = None if self.text is None else log_probs(model, self.text.tokens,
                                                                  **self._resume(self.text.tokens, after))
        self.base = self(model, after)

    def prefix(self, tokens: Int[Tensor, "n pos"], last: Int[Tensor, " n"] | None) -> Prefix:
        """The base model's run of `tokens`: one per distinct batch, shared by every run scored or trained on it."""
        for prefix in self._prefixes:
            if prefix.tokens.shape == tokens.shape and torch.equal(prefix.tokens, tokens):
                return prefix
        self._prefixes.append(Prefix(tokens, last))
        return self._prefixes[-1]

    def _resume(self, tokens: Tensor, layer: int | None) -> dict[str, Any]:
        """Keyword arguments of the evaluation functions that run from block `layer` of `tokens`' prefix."""
        if layer is None:
            return {}
        prefix = next((p for p in self._prefixes if p.tokens is tokens), None)
        return {} if prefix is None else {"prefix": prefix, "layer": layer}

    def __call__(self, model: Any, layer: int | None) -> Scores:
        """`model`'s scores, run from block `layer` (the lowest it changed; None: in full)."""
        metric, correct = per_example(model, self.heldout, **self._resume(self.heldout.clean, layer))
        others = {}
        for name, task in self.others.items():
            m, c = per_example(model, task, **self._resume(task.clean, layer))
            others[name] = {"metric": float(m.mean()), "accuracy": float(c.float().mean())}
        kl = math.nan if self.text is None else kl_from_base(model, self.text.tokens, self.base_text,
                                                             **self._resume(self.text.tokens, layer))
        return Scores(float(metric.mean()), float(correct.float().mean()), kl, others, correct.cpu())


@dataclass(frozen=True, eq=False)
class Trial:
    """One method trained once and scored."""

    setup: Setup
    result: FinetuneResult
    scores: Scores
    config: TrainConfig  # the run's own (its seed and learning rate)
    peak_bytes: int | None  # memory growth while training
    wall_s: float  # building, training and scoring


def run_trial(setup: Setup, model: Any, data: Data, config: TrainConfig, scorer: Scorer) -> Trial:
    """Train `setup` (a method built on `model`, `Method.build`) on `data` with `config` (the run's own,
    `Method.run_config`), score it, and put `model`'s trained entries back as they were."""
    start = time.perf_counter()
    shared = setup.model is model
    saved = _Saved(model, setup.masks) if shared else None
    try:
        tokens, last = tokens_of(data)
        device = next(model.parameters()).device
        prefix = scorer.prefix(tokens.to(device), None if last is None else last.to(device)) if shared else None
        with PeakMemory(next(setup.model.parameters()).device) as memory:
            result = train(setup.model, setup.masks, data, config, progress=False, sites=setup.sites, prefix=prefix)
        scores = scorer(setup.model, first_block(setup.model, setup.masks))
    finally:
        if saved is not None:
            saved.restore()
    return Trial(setup, result, scores, config, memory.peak_bytes, time.perf_counter() - start)


class _Saved:
    """The entries `masks` select in `model`, as they are now; `restore()` writes them back bit for bit."""

    def __init__(self, model: Any, masks: dict[str, Bool[Tensor, "..."]]):
        params = dict(model.named_parameters())
        self.entries = [(params[name], mask, params[name].detach()[mask].clone())
                        for name, mask in masks.items() if mask.any()]

    def restore(self) -> None:
        with torch.no_grad():
            for param, mask, values in self.entries:
                param[mask] = values

