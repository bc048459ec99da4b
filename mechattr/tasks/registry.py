"""The task registry: every named task in one table, read by `by_name` and the command line."""

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from mechattr.tasks.builtin import facts, ioi
from mechattr.tasks.cause_effect import cause_effect
from mechattr.tasks.generated import (greater_than, greater_than_split, ioi_distractor,
                                      ioi_distractor_split)
from mechattr.tasks.jsonl import from_jsonl
from mechattr.tasks.task import Task, TaskError

__all__ = ["TaskEntry", "TASKS", "by_name", "train_heldout", "split_examples"]


@dataclass(frozen=True)
class TaskEntry:
    """A named task: how to build it and, when it has its own, how to split it for fine-tuning."""

    build: Callable[[Any, int, int], Task]  # (model, n, seed) -> the task
    help: str  # one line for the command line's help
    split: Callable[[Any, int, float], tuple[Task, Task]] | None = None  # (model, seed, heldout); None: by example


def _cause_effect_split(model: Any, seed: int, heldout: float) -> tuple[Task, Task]:
    return tuple(cause_effect(model, s, heldout=heldout, seed=seed) for s in ("train", "heldout"))


TASKS: dict[str, TaskEntry] = {
    "ioi": TaskEntry(lambda model, n, seed: ioi(model, n=n, seed=seed), "indirect object identification"),
    "facts": TaskEntry(lambda model, n, seed: facts(model, n=n, seed=seed), "factual recall, counterfactual subjects"),
    # The analysis commands study the pairs fine-tuning trains on; the held-out pairs stay unseen.
    "cause_effect": TaskEntry(lambda model, n, seed: cause_effect(model, "train", seed=seed),
                              "Yes/No causal-direction questions (training pairs; n unused)",
                              split=_cause_effect_split),
    # Split by item (centuries, names) into SPLIT_SIZE examples a side, whatever n the command gives.
    "greater_than": TaskEntry(lambda model, n, seed: greater_than(model, n=n, seed=seed),
                              "years backwards, the begin year's tens digit (train/held-out by century)",
                              split=greater_than_split),
    "ioi_distractor": TaskEntry(lambda model, n, seed: ioi_distractor(model, n=n, seed=seed),
                                "IOI with four names, three givers (train/held-out by name)",
                                split=ioi_distractor_split),
}


def _is_file_spec(name: str) -> bool:
    return name.endswith(".jsonl") or Path(name).exists()


def by_name(model: Any, name: str, n: int = 8, seed: int = 0) -> Task:
    """A task of `TASKS` (n examples drawn with `seed`), or a path to a JSONL task file."""
    if name in TASKS:
        return TASKS[name].build(model, n, seed)
    if _is_file_spec(name):
        return from_jsonl(model, name)
    raise TaskError(f"unknown task {name!r}; valid: {', '.join(TASKS)}, or a path to a .jsonl file")


def split_examples(task: Task, heldout: float, seed: int) -> tuple[Task, Task]:
    """(training, held-out) parts of `task`: a seeded random `heldout` share of its examples held out."""
    if not 0 < heldout < 1:
        raise TaskError(f"the held-out share must be between 0 and 1, got {heldout}")
    n_held = round(heldout * task.n_examples)
    if not 0 < n_held < task.n_examples:
        raise TaskError(f"a held-out share of {heldout} of {task.n_examples} examples leaves no training or no "
                        "held-out example; use more examples")
    order = torch.randperm(task.n_examples, generator=torch.Generator().manual_seed(seed)).tolist()
    return task.subset(sorted(order[n_held:])), task.subset(sorted(order[:n_held]))


def train_heldout(model: Any, name: str, n: int, seed: int, heldout: float) -> tuple[Task, Task]:
    """The (training, held-out) tasks of `by_name(model, name, n, seed)`: split the task's own way
    (cause_effect by pair, so no held-out pair is trained on) or else by example."""
    entry = TASKS.get(name)
    if entry is not None and entry.split is not None:
        return entry.split(model, seed, heldout)
    return split_examples(by_name(model, name, n, seed), heldout, seed)
