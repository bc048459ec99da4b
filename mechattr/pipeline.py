"""The main job (`mechattr run`): attribute, precision fine-tune, re-attribute, report.

    metrics = run(RunConfig(), "runs/main")     # RunConfig.quick() for a smoke test

Stages, each recorded in `stages/<name>.json` (written last, atomically, after its output files); a
rerun into the same directory skips every stage whose record and files are complete:

1. `table_before_<network>`: the input-level causal attribution table of the base model (TDR per
   setting S1..S6; CAK, CAD, MAK, MAD with 95% t intervals over trials).
2. `knowledge_before`: component-level knowledge vs data on `component_network`: exact patching of
   each layer's attention and MLP output between S1 and S3 prompts (names replaced) and between S1 and
   S2 prompts (data values masked), see `causal.components`.
3. `sites`: the attention heads that carry the direction of a cause-effect question: AtP over every
   head on the training pairs of `finetune.cause_effect`, its top `candidates` verified by exact
   patching; the `top_k` of largest exact |effect| are the precision sites.
4. `finetune`: `finetune.compare` of precision fine-tuning on those heads, random heads with as many
   trained parameters and LoRA of about as many, on the same data, steps and seeds.
5. `delta`: the precision run of the first seed again, to keep its delta (the comparison keeps scores
   only); training is deterministic, so this is the comparison's run.
6. `heldout`: the saved delta applied to a fresh base model and scored on held-out pairs, with the
   precision heads' exact effects there before and after.
7. `knowledge_after`, `table_after_<network>`: stages 2 and 1 on the fine-tuned model.

`report.md`, `figures/` and `metrics.json` are then written from the stage records.
"""

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable

import torch

from mechattr import causal
from mechattr.attribution import attribute
from mechattr.causal.components import AGAINST, KnowledgeConfig, knowledge_task
from mechattr.causal.metrics import summarize
from mechattr.causal.prompts import context, question
from mechattr.effects import Effects, save_effects
from mechattr.finetune import (Checkpoint, Delta, Evaluate, LoRA, RandomSites, TopSites, TrainConfig, cause_effect,
                               compare, train)
from mechattr.finetune.evaluation import task_scores
from mechattr.models import load_model
from mechattr.patching import patch
from mechattr.run_report import render
from mechattr.selection import select
from mechattr.sites import KINDS, grid
from mechattr.tasks import Task

__all__ = ["RunConfig", "run", "STAGE_DIR", "DELTA_FILE"]

STAGE_DIR = "stages"  # stage records, relative to the run directory
DELTA_FILE = "delta.safetensors"  # the precision delta of the first seed
_EFFECTS = "effects"


@dataclass(frozen=True)
class RunConfig:
    """What `run` measures and trains; the defaults take about ten minutes on a 2-core CPU."""

    model: str = "smollm2-135m"  # name for mechattr.load_model
    networks: tuple[str, ...] = ("asia", "sachs")  # networks of the input-level attribution table
    trials: int = 3  # trials per table (column order, data rows and made-up names redrawn)
    data_tokens: int = 160  # tokens for the data table in each table prompt, beyond the prompt without data
    n_samples: int = 1000  # rows sampled from each network
    component_network: str = "asia"  # network of the component-level knowledge-vs-data patching
    component_kinds: tuple[str, ...] = ("attn_out", "mlp_out")  # patched per layer (all positions at once)
    component_layers: tuple[int, ...] | None = None  # layers patched there (None: every layer)
    component_rows: int = 3  # data rows in each component prompt
    component_examples: int = 8  # most examples per component task
    component_trials: int = 4  # row redraws per edge; more give more prompts of one token length to keep
    candidates: int = 16  # heads AtP shortlists for exact patching on the training pairs
    top_k: int = 8  # heads precision fine-tuning trains (the top by exact |effect|)
    steps: int = 20  # optimizer steps of every fine-tuning run (fewer leave precision near chance)
    batch_size: int = 8  # examples per step
    lr: float = 1e-3  # learning rate of every method
    seeds: tuple[int, ...] = (0, 1, 2)  # seeds of the comparison; the first one's delta is kept
    heldout: float = 0.3  # share of cause-effect pairs held out from training
    reattribute: tuple[str, ...] = ("asia",)  # networks whose table is recomputed on the fine-tuned model
    seed: int = 0  # draws data, prompts, made-up names and the train/held-out split
    threads: int | None = 1  # torch CPU threads during the run (None: torch's default); see `run`
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
                               ("component_trials", 1, "at least 1"),
                               ("data_tokens", 16, "at least 16 tokens"), ("n_samples", 10, "at least 10 rows")):
            if getattr(self, name) < low:
                bad(name, f"must be {why}, got {getattr(self, name)}")
        if self.component_layers is not None and (not self.component_layers or min(self.component_layers) < 0):
            bad("component_layers", f"need None (every layer) or layer indices >= 0, got {self.component_layers}")
        if self.candidates < self.top_k:
            bad("candidates", f"must be at least top_k={self.top_k}, got {self.candidates}")
        if self.threads is not None and self.threads < 1:
            bad("threads", f"must be None (torch's default) or at least 1, got {self.threads}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            bad("seeds", f"need one or more distinct seeds, got {self.seeds}")
        if not 0 < self.heldout < 1:
            bad("heldout", f"must be a share in (0, 1), got {self.heldout}")
        if not self.lr > 0:
            bad("lr", f"must be positive, got {self.lr}")

    @classmethod
    def quick(cls, **changes: Any) -> "RunConfig":
        """A small configuration for tests and CI: the 5-variable cancer network, short prompts, few layers,
        heads, steps and seeds."""
        small = dict(networks=("cancer",), trials=2, data_tokens=48, n_samples=200, component_network="cancer",
                     component_kinds=("attn_out",), component_layers=(0, 8, 16, 24), component_rows=2,
                     component_examples=4, component_trials=2, candidates=4, top_k=4, steps=4, seeds=(0,),
                     reattribute=("cancer",), fast=True)
        return cls(**{**small, **changes})

    @classmethod
    def from_json(cls, text: str) -> "RunConfig":
        values = json.loads(text)
        return cls(**{f.name: tuple(values[f.name]) if isinstance(values[f.name], list) else values[f.name]
                      for f in fields(cls) if f.name in values})


def _jsonable(value: Any) -> Any:
    """Strict JSON: non-finite floats become null, tuples lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to a temporary name beside `path`, then rename: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: Path, value: Any) -> None:
    write_atomic(path, json.dumps(_jsonable(value), indent=2, allow_nan=False) + "\n")


def _summary(values: list[float]) -> dict[str, float]:
    return vars(summarize(values))


def effects_summary(e: Effects, k: int = 5) -> dict[str, Any]:
    """Baselines and the k sites of largest |effect|, each with a 95% t interval of its per-example
    effect (patched minus unpatched metric) and its Benjamini-Hochberg significance."""
    significant = e.significant().flatten()
    index = {s: i for i, s in enumerate(e.sites)}
    per_example = (e.per_example - e.base).reshape(len(e.sites), -1)  # (sites, n)
    top = [{"site": str(s), **_summary(per_example[index[s]].tolist()), "significant": bool(significant[index[s]])}
           for s, _ in e.top(k)]
    return {"clean_metric": e.clean_metric, "corrupt_metric": e.corrupt_metric, "n_examples": e.n_examples,
            "n_sites": len(e.sites), "n_significant": int(significant.sum()),
            "max_abs_effect": float(e.effect.abs().max()), "top": top}


class _Run:
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
        if split not in self._tasks:
            self._tasks[split] = cause_effect(self.base, split, heldout=self.config.heldout, seed=self.config.seed)
        return self._tasks[split]

    def knowledge_task(self, against: str) -> Task:
        """The S1-vs-`against` prompts (built once per process: the aligned made-up names take a while)."""
        key = f"S1_vs_{against}"
        if key not in self._tasks:
            config = self.config
            problem = causal.load(config.component_network, n_samples=config.n_samples, seed=config.seed)
            self._tasks[key] = knowledge_task(self.base, problem, against, KnowledgeConfig(
                rows=config.component_rows, trials=config.component_trials, n=config.component_examples,
                seed=config.seed))
        return self._tasks[key]

    def effects(self, name: str) -> Effects:
        return Effects.load(self.out / _EFFECTS / name)

    def save_effects(self, name: str, effects: list[Effects], **meta: Any) -> list[str]:
        save_effects(self.out / _EFFECTS / name, effects, model=self.config.model, **meta)
        return [f"{_EFFECTS}/{name}/effects.json", f"{_EFFECTS}/{name}/effects.safetensors"]

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
        write_json(record_path, {"result": result, "files": files, "seconds": seconds})
        self.log[name] = {"status": "computed", "seconds": seconds}
        return json.loads(record_path.read_text())["result"]  # the same value whether computed or reused


def _budget(model: Any, problem: causal.Problem, config: RunConfig) -> int:
    """The table's prompt budget: its longest prompt without data over the trials (the made-up names
    differ per trial), plus `data_tokens`; so every network's prompts hold about as much data."""
    longest = 0
    for trial in range(config.trials):
        for c in causal.conditions(problem, seed=(config.seed, trial)).values():
            stem, ending = question(*sorted(c.shown, key=len)[-2:])  # the longest question, as the table sizes it
            longest = max(longest, model.to_tokens(context(c, 0) + stem + ending).shape[1])
    return longest + config.data_tokens


def _table(run: _Run, model: Any, network: str, when: str) -> tuple[dict[str, Any], list[str]]:
    config = run.config
    problem = causal.load(network, n_samples=config.n_samples, seed=config.seed)
    table = causal.attribution_table(model, problem, trials=config.trials, seed=config.seed,
                                     max_tokens=_budget(model, problem, config))
    files = [f"tables/{network}_{when}/trials.csv", f"tables/{network}_{when}/pairs.csv"]
    write_atomic(run.out / files[0], table.trials.to_csv(index=False))
    write_atomic(run.out / files[1], table.pairs.to_csv(index=False))
    n = len(problem.variables)
    wide = table.trials.pivot(index="trial", columns="setting", values="TDR")
    result = {"network": network, "n_variables": n, "n_edges": len(problem.edges),
              "chance_tdr": len(problem.edges) / (n * (n - 1)), "rows_per_trial": table.meta["rows_per_trial"],
              "max_tokens": table.meta["max_tokens"],
              "settings": {key: {m: vars(table.summary(key, m)) for m in ("TDR", "FDR", "F1", "SHD", "AUROC")}
                           for key in causal.SETTINGS},
              "attributions": {name: vars(table.attribution(name)) for name in causal.ATTRIBUTIONS},
              "tdr_per_trial": {key: wide[key].tolist() for key in causal.SETTINGS}}
    return result, files


def _knowledge(run: _Run, model: Any, when: str) -> tuple[dict[str, Any], list[str]]:
    config = run.config
    result, files, decode = {}, [], model.tokenizer.decode
    for against in AGAINST:
        task = run.knowledge_task(against)  # the same prompts before and after fine-tuning
        effects = [patch(model, task, grid(model, kind, task.n_pos, per_position=False, layers=config.component_layers),
                         progress=run.progress) for kind in config.component_kinds]
        files += run.save_effects(f"knowledge_{against}_{when}", effects, task=task.name, against=against,
                                  problem=config.component_network, stage=when)
        result[against] = {"task": task.name, "n_pos": task.n_pos, "clean_prompt": decode(task.clean[0, 1:]),
                           "corrupt_prompt": decode(task.corrupt[0, 1:]),
                           "kinds": {e.kind: effects_summary(e) for e in effects}}
    return result, files


def _sites(run: _Run) -> tuple[dict[str, Any], list[str]]:
    config, model, task = run.config, run.base, run.task("train")
    estimate = attribute(model, task, grid(model, "z"), "atp")
    shortlist = [site for site, _ in estimate.top(config.candidates)]
    exact = patch(model, task, shortlist, progress=run.progress)
    files = run.save_effects("sites_atp", [estimate], task=task.name) + run.save_effects("sites_exact", [exact],
                                                                                         task=task.name)
    chosen = select(exact, top_k=config.top_k, significant_only=False)
    per_example = (exact.per_example - exact.base).tolist()  # (candidates, n)
    atp = dict(zip(estimate.sites, estimate.effect.flatten().tolist()))
    candidates = [{"site": str(s), "atp": atp[s], **_summary(per_example[i]), "chosen": s in chosen}
                  for i, s in enumerate(exact.sites)]
    heldout = run.task("heldout")
    return {"task": task.name, "n_train": task.n_examples, "n_heldout": heldout.n_examples, "n_pos": task.n_pos,
            "clean_prompt": model.tokenizer.decode(task.clean[0, 1:]),
            "corrupt_prompt": model.tokenizer.decode(task.corrupt[0, 1:]),
            "clean_metric": exact.clean_metric, "corrupt_metric": exact.corrupt_metric,
            "candidates": candidates, "sites": [str(s) for s in chosen]}, files


def _train_config(config: RunConfig) -> TrainConfig:
    return TrainConfig(lr=config.lr, steps=config.steps, batch_size=config.batch_size, seed=config.seeds[0])


def _finetune(run: _Run) -> tuple[dict[str, Any], list[str]]:
    config = run.config
    exact, estimate = run.effects("sites_exact"), run.effects("sites_atp")
    methods = [TopSites(exact, k=config.top_k), RandomSites(estimate), LoRA()]
    table = compare(lambda: load_model(config.model), run.task("train"), run.task("heldout"), methods,
                    _train_config(config), config.seeds, progress=run.progress)
    write_atomic(run.out / "finetune" / "comparison.md", table.to_markdown() + "\n")
    write_atomic(run.out / "finetune" / "comparison.json", table.to_json() + "\n")
    accuracy = {(r["method"], r["seed"]): r["heldout_accuracy"] for r in table.rows}
    reference = table.meta["reference"]
    per_method = {m.label: [accuracy[(m.label, seed)] for seed in config.seeds] for m in methods}
    # Paired by seed: both methods saw the same batches.
    versus = {m: _summary([a - b for a, b in zip(per_method[reference], v)]) for m, v in per_method.items()
              if m != reference}
    return ({"base": table.base, "summary": table.summary(), "rows": list(table.rows), "reference": reference,
             "heldout_accuracy": {m: _summary(v) for m, v in per_method.items()}, "reference_minus": versus},
            ["finetune/comparison.md", "finetune/comparison.json"])


def _delta(run: _Run) -> tuple[dict[str, Any], list[str]]:
    config = run.config
    model = load_model(config.model)
    setup = TopSites(run.effects("sites_exact"), k=config.top_k).build(model, config.seeds[0], None)
    history = Evaluate(run.task("heldout"), every=max(1, config.steps // 4))
    checkpoint = run.out / "finetune" / "precision.ckpt"  # an interrupted run resumes from here
    result = train(setup.model, setup.masks, run.task("train"), _train_config(config),
                   [history, Checkpoint(checkpoint, every=max(1, config.steps // 4))],
                   resume=checkpoint if checkpoint.is_file() else None, progress=run.progress,
                   sites=setup.sites, base_model=config.model)
    result.delta.save(run.out / DELTA_FILE)
    checkpoint.unlink()
    return {"seed": config.seeds[0], "n_trained": result.n_trained, "losses": list(result.losses),
            "sites": [str(s) for s in setup.sites], "history": [[step, s] for step, s in history.history],
            "heldout": task_scores(model, run.task("heldout"))}, [DELTA_FILE]


def _heldout(run: _Run) -> tuple[dict[str, Any], list[str]]:
    heldout, train_task = run.task("heldout"), run.task("train")
    sites = list(Delta.load(run.out / DELTA_FILE).sites)
    before, after = (patch(m, heldout, sites, progress=run.progress) for m in (run.base, run.tuned))
    files = run.save_effects("heldout_sites_before", [before], task=heldout.name)
    files += run.save_effects("heldout_sites_after", [after], task=heldout.name)
    return {"task": heldout.name, "base": task_scores(run.base, heldout), "tuned": task_scores(run.tuned, heldout),
            "base_train": task_scores(run.base, train_task), "tuned_train": task_scores(run.tuned, train_task),
            "sites_before": effects_summary(before, k=len(sites)),
            "sites_after": effects_summary(after, k=len(sites))}, files


def run(config: RunConfig, out: str | Path, progress: bool = True, model: Any | None = None) -> dict[str, Any]:
    """Run every stage not already complete in `out`, then write report.md, figures/ and metrics.json.

    `model` is an already loaded `mechattr.load_model(config.model)` (saves loading it again; it is not
    changed). Returns the metrics written to metrics.json. A directory holding a run of another
    configuration is refused. `config.threads` applies for the call only. One thread is the default
    because on a CPU shared with other jobs the threads of one process wait on each other: on a 2-core
    machine running one other job, a SmolLM2 forward pass of [8, 14] tokens took 1.7 s with one thread
    and 12-26 s with two (0.33 s and 0.20 s when the machine was idle).
    """
    threads = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    try:
        return _run_all(config, Path(out), progress, model)
    finally:
        torch.set_num_threads(threads)


def _run_all(config: RunConfig, out: Path, progress: bool, model: Any | None) -> dict[str, Any]:
    start = time.perf_counter()
    saved = out / "config.json"
    if saved.is_file() and RunConfig.from_json(saved.read_text()) != config:
        other = RunConfig.from_json(saved.read_text())
        differ = {f.name: (getattr(other, f.name), getattr(config, f.name)) for f in fields(RunConfig)
                  if getattr(other, f.name) != getattr(config, f.name)}
        raise ValueError(f"{out} holds a run of another configuration (saved vs given: {differ}); "
                         "choose another output directory or delete it")
    write_json(saved, asdict(config))
    r = _Run(config, out, progress, model)
    metrics: dict[str, Any] = {"config": asdict(config), "tables": {"before": {}, "after": {}}, "knowledge": {}}
    for network in config.networks:
        metrics["tables"]["before"][network] = r.stage(f"table_before_{network}",
                                                       lambda n=network: _table(r, r.base, n, "before"))
    metrics["knowledge"]["before"] = r.stage("knowledge_before", lambda: _knowledge(r, r.base, "before"))
    metrics["sites"] = r.stage("sites", lambda: _sites(r))
    metrics["finetune"] = r.stage("finetune", lambda: _finetune(r))
    metrics["delta"] = r.stage("delta", lambda: _delta(r))
    metrics["heldout"] = r.stage("heldout", lambda: _heldout(r))
    metrics["knowledge"]["after"] = r.stage("knowledge_after", lambda: _knowledge(r, r.tuned, "after"))
    for network in config.reattribute:
        metrics["tables"]["after"][network] = r.stage(f"table_after_{network}",
                                                      lambda n=network: _table(r, r.tuned, n, "after"))
    metrics["stages"] = r.log
    write_atomic(out / "report.md", render(out, metrics))
    metrics["wall_s"] = time.perf_counter() - start  # this call, report included; each stage's time is in `stages`
    write_json(out / "metrics.json", metrics)
    return json.loads((out / "metrics.json").read_text())
