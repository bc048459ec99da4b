"""Comparing fine-tuning methods on the same data, steps and seeds.

Per method and seed: the held-out task metric and accuracy, collateral change (KL from the base model
on unrelated text, and the metric of a different task), trained parameters, wall time, peak memory and
optimizer state. `ComparisonTable` renders means and standard deviations over seeds as markdown or JSON.
"""

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from tqdm.auto import tqdm

from mechattr.finetune.data import Data, Text
from mechattr.finetune.harness import Scorer, Scores, run_trial, unrelated_text
from mechattr.finetune.masks import n_trained
from mechattr.finetune.methods import Method
from mechattr.finetune.trainer import TrainConfig
from mechattr.models import load_model
from mechattr.stats import mean_sd
from mechattr.storage import write_text
from mechattr.tasks import Task, ioi

__all__ = ["ComparisonTable", "Evaluation", "compare"]

_COLUMNS = (  # (key, header, format)
    ("lr", "lr", "{:g}"),
    ("n_trained", "trained params", "{:,.0f}"),
    ("heldout_metric", "held-out metric", "{:+.3f}"),
    ("heldout_accuracy", "held-out acc", "{:.3f}"),
    ("train_accuracy", "train acc", "{:.3f}"),
    ("kl_unrelated", "KL unrelated (nats)", "{:.4f}"),
    ("other_metric_change", "other-task metric change", "{:+.3f}"),
    ("wall_s", "wall s", "{:.1f}"),
    ("peak_mb", "peak MB", "{:.0f}"),
    ("optimizer_mb", "optimizer MB", "{:.2f}"),
)


def _cell(mean: float, sd: float, fmt: str) -> str:
    if math.isnan(mean):
        return "n/a"
    return fmt.format(mean) if sd == 0 else f"{fmt.format(mean)} ± {fmt.format(sd).lstrip('+')}"


@dataclass(frozen=True)
class ComparisonTable:
    """One row per (method, seed) and the base model's scores."""

    rows: tuple[dict[str, Any], ...]
    base: dict[str, float]  # the untrained model: heldout_metric, heldout_accuracy, train_accuracy, other_metric
    meta: dict[str, Any] = field(default_factory=dict)  # task names, config, seeds, device

    def summary(self) -> list[dict[str, Any]]:
        """Per method: mean and standard deviation over seeds of every column."""
        methods = list(dict.fromkeys(r["method"] for r in self.rows))
        out = []
        for method in methods:
            rows = [r for r in self.rows if r["method"] == method]
            entry: dict[str, Any] = {"method": method, "seeds": len(rows)}
            for key, _, _ in _COLUMNS:
                entry[key], entry[f"{key}_sd"] = mean_sd([r[key] for r in rows])
            out.append(entry)
        return out

    def to_markdown(self) -> str:
        header = "| method | " + " | ".join(h for _, h, _ in _COLUMNS) + " |"
        lines = [header, "|" + "---|" * (len(_COLUMNS) + 1)]
        base = {"n_trained": 0, "kl_unrelated": 0.0, "other_metric_change": 0.0, **self.base}  # untrained
        cells = [fmt.format(base[k]) if k in base else "" for k, _, fmt in _COLUMNS]
        lines.append("| base model | " + " | ".join(cells) + " |")
        for entry in self.summary():
            cells = [_cell(entry[key], entry[f"{key}_sd"], fmt) for key, _, fmt in _COLUMNS]
            lines.append(f"| {entry['method']} | " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def to_json(self) -> str:
        return json.dumps({"meta": self.meta, "base": self.base, "summary": self.summary(), "rows": list(self.rows)},
                          indent=2, default=str)

    def save(self, directory: str | Path) -> Path:
        """`comparison.md` and `comparison.json` in `directory`."""
        directory = Path(directory)
        write_text(directory / "comparison.md", self.to_markdown() + "\n")
        write_text(directory / "comparison.json", self.to_json() + "\n")
        return directory


class Evaluation:
    """What `compare` (and `mechattr finetune`) measure a trained model on: held-out metric and accuracy,
    training accuracy (for a task), KL from the base model on `text`, and the change of `other_task`'s
    metric, all against the base model's values (`base`), computed once."""

    def __init__(self, model: Any, data: Data, heldout: Task, other_task: Task, text: Text):
        self.data, self.heldout, self.other_task, self.text = data, heldout, other_task, text
        others = {"other": other_task, **({"train": data} if isinstance(data, Task) else {})}
        self.scorer = Scorer(model, heldout, others, text)
        base = self.scorer.base
        self.base = {"heldout_metric": base.heldout_metric, "heldout_accuracy": base.heldout_accuracy,
                     "other_metric": base.others["other"]["metric"],
                     **({"train_accuracy": base.others["train"]["accuracy"]} if "train" in base.others else {})}

    def row(self, scores: Scores) -> dict[str, float]:
        """The comparison's columns from a trained model's scores."""
        return {"heldout_metric": scores.heldout_metric, "heldout_accuracy": scores.heldout_accuracy,
                "train_accuracy": scores.others["train"]["accuracy"] if "train" in scores.others else math.nan,
                "kl_unrelated": scores.kl_unrelated,
                "other_metric_change": scores.others["other"]["metric"] - self.base["other_metric"]}

    def __call__(self, model: Any, layer: int | None = None) -> dict[str, float]:
        """`model`'s columns; `layer`: the lowest block it changed (see `Scorer`), None to run it in full."""
        return self.row(self.scorer(model, layer))


def compare(base: str | Callable[[], Any], data: Data, heldout: Task, methods: Sequence[Method],
            config: TrainConfig = TrainConfig(), seeds: Sequence[int] = (0, 1, 2), *,
            other_task: Task | None = None, text: Text | None = None, evaluation: Evaluation | None = None,
            progress: bool = True) -> ComparisonTable:
    """Train every method on `data` with `config` (each seed sets the batch order and any random choice
    of the method) and evaluate it. `base` is a model name for `mechattr.load_model` or a function
    returning a fresh base model; every run trains that one model and its weights are put back after
    (`harness.run_trial`). The first method is the reference (it must not need a target): its
    trained-parameter count is the target of matched baselines (random sites, LoRA). `other_task`
    defaults to IOI, `text` to `harness.UNRELATED_TEXT`. `evaluation`: the caller's `Evaluation` of this
    base model on `data` and `heldout` (and its own other task and text), whose base scores are then not
    computed again (every trained model is still checked before it resumes from them).
    """
    if not methods:
        raise ValueError("compare needs at least one method")
    model = load_model(base) if isinstance(base, str) else base()
    if evaluation is None:
        other_task = other_task if other_task is not None else ioi(model, n=8, seed=0)
        text = text if text is not None else unrelated_text(model)
        evaluation = Evaluation(model, data, heldout, other_task, text)
    else:
        given = {"data": data, "heldout": heldout,
                 "other_task": evaluation.other_task if other_task is None else other_task,
                 "text": evaluation.text if text is None else text}
        differ = [name for name, value in given.items() if value is not getattr(evaluation, name)]
        if differ:
            raise ValueError(f"compare: the evaluation was computed on other {', '.join(differ)} than the ones "
                             "given; pass the same objects, or no evaluation")
        other_task, text = evaluation.other_task, evaluation.text
    rows = []
    with tqdm(total=len(seeds) * len(methods), desc="comparing", disable=not progress) as bar:
        for seed in seeds:
            target = n_trained(methods[0].build(model, seed, None).masks)
            for method in methods:
                bar.set_postfix(method=method.label, seed=seed)
                setup = method.build(model, seed, target)
                trial = run_trial(setup, model, data, method.run_config(config, seed), evaluation.scorer)
                rows.append({"method": method.label, "seed": seed, "lr": trial.config.lr,
                             "n_trained": trial.result.n_trained, **evaluation.row(trial.scores),
                             "wall_s": trial.result.wall_s,
                             "final_loss": trial.result.losses[-1] if trial.result.losses else math.nan,
                             "peak_mb": math.nan if trial.peak_bytes is None else trial.peak_bytes / 2**20,
                             "optimizer_mb": trial.result.optimizer_bytes / 2**20,
                             "sites": [str(s) for s in trial.setup.sites]})
                bar.update(1)
    meta = {"data": getattr(data, "name", "data"), "heldout": heldout.name, "other_task": other_task.name,
            "text": text.name, "config": asdict(config), "seeds": list(seeds), "reference": methods[0].label}
    return ComparisonTable(tuple(rows), evaluation.base, meta)
