"""A run directory: strict JSON records, the stage cache, and the models and tasks the stages share.

Each stage's record `stages/<name>.json` is written last, atomically, after its output files; a rerun
into the same directory reuses every stage whose record and files are complete.
"""

import functools
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from mechattr import causal
from mechattr.app.config import RunConfig
from mechattr.causal.components import KnowledgeConfig, knowledge_task
from mechattr.effects import Effects, save_effects
from mechattr.finetune import Delta
from mechattr.finetune.delta import DELTA_FILE
from mechattr.models import load_model
from mechattr.storage import write_json
from mechattr.tasks import Task, cause_effect

__all__ = ["STAGE_DIR", "DELTA_FILE", "EXPORT_DIR", "EFFECTS_DIR", "RunDirectory"]

STAGE_DIR = "stages"  # stage records, relative to the run directory
EXPORT_DIR = "export"  # that run on the checkpoint's weights, as a Hugging Face model folder
EFFECTS_DIR = "effects"  # saved effects, one directory each


class RunDirectory:
    """One run directory: the stage records, and the models and tasks the stages share (loaded lazily)."""

    def __init__(self, config: RunConfig, out: Path, progress: bool, model: Any | None):
        self.config, self.out, self.progress = config, out, progress
        self._base, self._tuned, self._tasks = model, None, {}
        self.log: dict[str, dict[str, Any]] = {}

    @property
    def base(self) -> Any:
        if self._base is None:
            self._base = load_model(self.config.model)
        return self._base

    @property
    def tuned(self) -> Any:
        """A fresh base model with the saved precision delta applied."""
        if self._tuned is None:
            self._tuned = Delta.load(self.out / DELTA_FILE).apply(load_model(self.config.model))
        return self._tuned

    def task(self, split: str) -> Task:
        """The cause-effect pairs of `split` ("train" or "heldout"), the first `config.examples` of them."""
        if split not in self._tasks:
            task = cause_effect(self.base, split, heldout=self.config.heldout, seed=self.config.seed)
            cap = self.config.examples
            self._tasks[split] = task if cap is None else task.subset(slice(0, cap))
        return self._tasks[split]

    @property
    def knowledge_config(self) -> KnowledgeConfig:
        config = self.config
        return KnowledgeConfig(rows=config.component_rows, trials=config.component_trials,
                               n=config.component_examples, seed=config.seed)

    @functools.cached_property
    def component_problem(self) -> causal.Problem:
        """The network of the component-level knowledge-vs-data patching, with its sampled data."""
        config = self.config
        return causal.load(config.component_network, n_samples=config.n_samples, seed=config.seed)

    def knowledge_task(self, against: str) -> Task:
        """The S1-vs-`against` prompts (built once per process: the aligned made-up names take a while)."""
        key = f"S1_vs_{against}"
        if key not in self._tasks:
            self._tasks[key] = knowledge_task(self.base, self.component_problem, against, self.knowledge_config)
        return self._tasks[key]

    def effects(self, name: str) -> Effects:
        return Effects.load(self.out / EFFECTS_DIR / name)

    def save_effects(self, name: str, effects: list[Effects], **meta: Any) -> list[str]:
        save_effects(self.out / EFFECTS_DIR / name, effects, model=self.config.model, **meta)
        return [f"{EFFECTS_DIR}/{name}/effects.json", f"{EFFECTS_DIR}/{name}/effects.safetensors"]

    def stage(self, name: str, compute: Callable[[], tuple[dict[str, Any], list[str]]]) -> dict[str, Any]:
        """The stage's result: from its record when it and the files it lists exist, else computed and
        recorded. `compute` returns (result, files written, relative to the run directory)."""
        record_path = self.out / STAGE_DIR / f"{name}.json"
        if record_path.is_file():
            record = json.loads(record_path.read_text())
            if all((self.out / f).is_file() for f in record["files"]):
                self.log[name] = {"status": "reused", "seconds": record["seconds"]}
                return record["result"]
        if self.progress:
            print(f"mechattr run: {name} ...", file=sys.stderr, flush=True)
        torch.manual_seed(self.config.seed)  # a stage never depends on what ran before it in this process
        start = time.perf_counter()
        result, files = compute()
        seconds = time.perf_counter() - start
        write_json(record_path, {"result": result, "files": files, "seconds": seconds}, strict=True)
        self.log[name] = {"status": "computed", "seconds": seconds}
        return json.loads(record_path.read_text())["result"]  # the same value whether computed or reused
