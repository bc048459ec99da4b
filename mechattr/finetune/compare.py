"""Comparing fine-tuning methods on the same data, steps and seeds.

Per method and seed: the held-out task metric and accuracy, collateral change (KL from the base model
on unrelated text, and the metric of a different task), trained parameters, wall time, peak memory and
optimizer state. `ComparisonTable` renders means and standard deviations over seeds as markdown or JSON.
"""

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from mechattr.finetune.data import Data, Text
from mechattr.finetune.evaluation import kl_from_base, log_probs, task_scores
from mechattr.finetune.masks import n_trained
from mechattr.finetune.memory import PeakMemory
from mechattr.finetune.methods import Method
from mechattr.finetune.trainer import TrainConfig, train
from mechattr.models import load_model
from mechattr.stats import mean_sd
from mechattr.storage import write_text
from mechattr.tasks import Task, ioi

__all__ = ["ComparisonTable", "Evaluation", "compare", "UNRELATED_TEXT"]

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


@dataclass(frozen=True, eq=False)
class Evaluation:
    """Everything a trained model is measured against, computed once on the base model."""

    heldout: Task
    other_task: Task
    text: Text
    base_text: Float[Tensor, "n pos vocab"]  # the base model's log-probs on `text`
    base: dict[str, float]  # base model's scores

    @classmethod
    def of(cls, model: Any, data: Data, heldout: Task, other_task: Task, text: Text) -> "Evaluation":
        scores = task_scores(model, heldout)
        base = {"heldout_metric": scores["metric"], "heldout_accuracy": scores["accuracy"],
                "other_metric": task_scores(model, other_task)["metric"]}
        if isinstance(data, Task):
            base["train_accuracy"] = task_scores(model, data)["accuracy"]
        return cls(heldout, other_task, text, log_probs(model, text.tokens), base)

    def __call__(self, model: Any, data: Data) -> dict[str, float]:
        scores = task_scores(model, self.heldout)
        return {"heldout_metric": scores["metric"], "heldout_accuracy": scores["accuracy"],
                "train_accuracy": task_scores(model, data)["accuracy"] if isinstance(data, Task) else float("nan"),
                "kl_unrelated": kl_from_base(model, self.text.tokens, self.base_text),
                "other_metric_change": task_scores(model, self.other_task)["metric"] - self.base["other_metric"]}


def _run(method: Method, model: Any, seed: int, target: int, data: Data, config: TrainConfig,
         evaluation: Evaluation) -> dict[str, Any]:
    setup = method.build(model, seed, target)
    run_config = replace(config, seed=seed, lr=config.lr if method.lr is None else method.lr)
    with PeakMemory(next(setup.model.parameters()).device) as memory:
        result = train(setup.model, setup.masks, data, run_config, progress=False, sites=setup.sites)
    return {"method": method.label, "seed": seed, "lr": run_config.lr, "n_trained": result.n_trained,
            **evaluation(setup.model, data), "wall_s": result.wall_s,
            "final_loss": result.losses[-1] if result.losses else float("nan"),
            "peak_mb": memory.peak_bytes / 2**20 if memory.peak_bytes is not None else float("nan"),
            "optimizer_mb": result.optimizer_bytes / 2**20, "sites": [str(s) for s in setup.sites]}


def compare(base: str | Callable[[], Any], data: Data, heldout: Task, methods: Sequence[Method],
            config: TrainConfig = TrainConfig(), seeds: Sequence[int] = (0, 1, 2), *,
            other_task: Task | None = None, text: Text | None = None, progress: bool = True) -> ComparisonTable:
    """Train every method on `data` with `config` (each seed sets the batch order and any random choice
    of the method) and evaluate it. `base` is a model name for `mechattr.load_model` or a function
    returning a fresh base model. The first method is the reference (it must not need a target): its
    trained-parameter count is the target of matched baselines (random sites, LoRA). `other_task`
    defaults to IOI, `text` to `UNRELATED_TEXT`.
    """
    if not methods:
        raise ValueError("compare needs at least one method")
    load = (lambda: load_model(base)) if isinstance(base, str) else base
    model = load()
    other_task = other_task if other_task is not None else ioi(model, n=8, seed=0)
    text = text if text is not None else Text.from_strings(model, UNRELATED_TEXT, seq_len=32, name="unrelated")
    evaluation = Evaluation.of(model, data, heldout, other_task, text)
    rows = []
    with tqdm(total=len(seeds) * len(methods), desc="comparing", disable=not progress) as bar:
        for seed in seeds:
            target = n_trained(methods[0].build(model, seed, None).masks)
            for method in methods:
                bar.set_postfix(method=method.label, seed=seed)
                rows.append(_run(method, load(), seed, target, data, config, evaluation))
                bar.update(1)
    meta = {"data": getattr(data, "name", "data"), "heldout": heldout.name, "other_task": other_task.name,
            "text": text.name, "config": asdict(config), "seeds": list(seeds), "reference": methods[0].label}
    return ComparisonTable(tuple(rows), evaluation.base, meta)
