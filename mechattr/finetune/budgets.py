"""Budget curves: at each trained-parameter budget, do attribution-selected sites beat chance?

    curves = budget_curves(load, train, heldout, rankings, BudgetPlan(heads=(1, 2, 4, 8, 16)))
    print(curves.to_markdown())            # per budget: accuracy intervals, precision - random, verdict

For every unit kind ("head", "neuron"), budget and seed, one run each of:

- `exact`: precision fine-tuning of the top-k sites by exact patching (`rankings[kind]["exact"]`);
- `atp`: the same with the top-k sites of an attribution estimate (`rankings[kind]["atp"]`);
- `random`: `draws` random site sets per seed from the estimate's whole grid, each drawn until its
  trained-parameter count is closest to the exact run's;
- `bottom-k`: the k sites of smallest estimated |effect|;
- `lora`: peft LoRA whose rank gives about the exact run's parameter count (skipped, and said so, when
  rank 1 is already more than twice the budget);

and once per seed `full` fine-tuning as the reference. Neuron budgets default to the parameter counts
of the head budgets (a head is ~74k parameters of SmolLM2, a neuron ~1.7k). A run that would repeat one
already made (exact and AtP choosing the same sites; one LoRA rank at both unit kinds) is not trained
again: its row names the first in `shared_with`. Every run trains the one base model, whose weights the
harness puts back after it (`mechattr.finetune.harness`).

Statistics: accuracies carry two-level percentile-bootstrap intervals over seeds and held-out examples
(always inside [0, 1]); precision - random is paired by seed (same batch order) and example, random
draws averaged per seed. A verdict per budget: "beats" or "loses" when the interval excludes 0, "ties"
when it lies within +-`tie_margin` ("ties at the ceiling" when both accuracies are at least `CEILING`),
else "undecided" (naming the end of the interval beyond the margin).
"""

import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from jaxtyping import Bool
from torch import Tensor
from tqdm.auto import tqdm

from mechattr.effects import Effects
from mechattr.finetune.data import Text
from mechattr.finetune.harness import Scorer, run_trial, unrelated_text
from mechattr.finetune.masks import n_trained
from mechattr.finetune.methods import BASELINES, FINETUNE_METHODS, Full, LoRA, Method, Setup, TopSites
from mechattr.finetune.ranking import matched_neurons
from mechattr.finetune.trainer import TrainConfig
from mechattr.stats import Interval, bootstrap_accuracy, bootstrap_paired
from mechattr.storage import write_json, write_text
from mechattr.tasks import Task

__all__ = ["BudgetPlan", "BudgetCurves", "budget_curves", "summary_markdown", "RANKINGS", "UNIT_KINDS"]

RANKINGS = ("exact", "atp")  # the precision methods, by the ranking that chose their sites
CEILING = 0.99  # held-out accuracy at which a tie says only that the task is learnt, not which sites are better
UNIT_KINDS = ("head", "neuron")


@dataclass(frozen=True)
class BudgetPlan:
    """What to train at which budgets."""

    heads: tuple[int, ...] = (1, 2, 4, 8, 16)  # head budgets (sites)
    neurons: tuple[int, ...] | None = None  # neuron budgets (sites); None: matched to the head budgets'
    # parameter counts; () for none
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)  # batch orders (and random draws)
    draws: int = 3  # random site sets per seed
    config: TrainConfig = TrainConfig(steps=20, batch_size=8)  # every run's hyperparameters (seed replaced)
    baselines: tuple[str, ...] = BASELINES  # which baselines to run
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")  # module names LoRA adapts
    full_lr: float = 3e-5  # full fine-tuning's learning rate (the sparse methods' lr diverges on every weight)
    tie_margin: float = 0.05  # |precision - random| interval within this counts as a tie

    def settings(self, name: str) -> dict[str, Any]:
        """The plan's own fields of baseline `name` (`Method.against`'s settings)."""
        return {"lora": {"targets": self.lora_targets}, "full": {"lr": self.full_lr}}.get(name, {})

    def __post_init__(self):
        unknown = set(self.baselines) - set(BASELINES)
        if unknown:
            raise ValueError(f"BudgetPlan.baselines: unknown {sorted(unknown)}; valid: {', '.join(BASELINES)}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"BudgetPlan.seeds: need distinct seeds, got {self.seeds}")
        if self.draws < 1:
            raise ValueError(f"BudgetPlan.draws: need at least one random draw per seed, got {self.draws}")
        if any(k < 1 for k in (*self.heads, *(self.neurons or ()))):
            raise ValueError(f"BudgetPlan: budgets are positive site counts, got heads={self.heads}, "
                             f"neurons={self.neurons}")


@dataclass(frozen=True, eq=False)
class BudgetCurves:
    """Every run of a budget comparison on one task: scores per run and per-example correctness."""

    rows: tuple[dict[str, Any], ...]  # one per run: kind, budget, method, seed, draw, n_trained, scores, wall_s
    correct: dict[tuple, Bool[Tensor, " n"]]  # (kind, budget, method, seed, draw) -> held-out correctness
    base: dict[str, Any]  # the untrained model's scores
    base_correct: Bool[Tensor, " n"]
    meta: dict[str, Any] = field(default_factory=dict)  # task names, plan, notes

    def _stack(self, kind: str, budget: int, method: str) -> np.ndarray:
        """Correctness [seeds, draws, examples] of one method at one budget."""
        keys = sorted(k for k in self.correct if k[:3] == (kind, budget, method))
        seeds = sorted({k[3] for k in keys})
        draws = sorted({k[4] for k in keys})
        return np.stack([np.stack([self.correct[(kind, budget, method, s, d)].numpy() for d in draws])
                         for s in seeds])

    def cells(self) -> list[tuple[str, int, str]]:
        """(kind, budget, method) of every trained cell, in run order."""
        return list(dict.fromkeys((r["kind"], r["budget"], r["method"]) for r in self.rows))

    def accuracy(self, kind: str, budget: int, method: str) -> Interval:
        """Held-out accuracy over seeds (draws averaged) and examples, with its bootstrap interval."""
        return bootstrap_accuracy(self._stack(kind, budget, method).mean(1))

    def versus_random(self, kind: str, budget: int, ranking: str = "exact") -> Interval:
        """Accuracy of precision (`ranking`) minus random sites, paired by seed and example."""
        return bootstrap_paired(self._stack(kind, budget, ranking)[:, 0], self._stack(kind, budget, "random"))

    def verdict(self, interval: Interval) -> str:
        margin = self.meta.get("tie_margin", 0.05)
        if interval.low > 0:
            return "beats"
        if interval.high < 0:
            return "loses"
        if -margin <= interval.low and interval.high <= margin:
            return "ties"
        edge = interval.low if -interval.low > interval.high else interval.high
        return f"undecided (the interval includes 0 and reaches {edge:+.3f}, beyond ±{margin:g})"

    def summary(self) -> list[dict[str, Any]]:
        """Per (kind, budget, method): trained parameters, accuracy interval, mean metric, KL, seconds per run;
        and for precision methods the paired difference with random sites and its verdict."""
        out = []
        for kind, budget, method in self.cells():
            rows = [r for r in self.rows if (r["kind"], r["budget"], r["method"]) == (kind, budget, method)]
            acc = self.accuracy(kind, budget, method)
            entry = {"kind": kind, "budget": budget, "method": method, "runs": len(rows),
                     "n_trained": float(np.mean([r["n_trained"] for r in rows])),
                     "accuracy": acc.estimate, "accuracy_low": acc.low, "accuracy_high": acc.high,
                     "heldout_metric": float(np.mean([r["heldout_metric"] for r in rows])),
                     "kl_unrelated": float(np.mean([r["kl_unrelated"] for r in rows])),
                     "other_accuracy": {name: float(np.mean([r["other_accuracy"][name] for r in rows]))
                                        for name in rows[0]["other_accuracy"]},
                     "wall_s": float(np.mean([r["wall_s"] for r in rows]))}
            if method in RANKINGS and (kind, budget, "random") in self.cells():
                diff = self.versus_random(kind, budget, method)
                verdict = self.verdict(diff)
                if verdict == "ties" and min(acc.estimate, self.accuracy(kind, budget, "random").estimate) >= CEILING:
                    verdict = (f"ties at the ceiling (both at least {CEILING:g} held-out accuracy: this budget is too "
                               "large to tell them apart; see the metric, or a smaller budget)")
                entry.update(minus_random=diff.estimate, minus_random_low=diff.low, minus_random_high=diff.high,
                             verdict=verdict)
            out.append(entry)
        return out

    def to_markdown(self) -> str:
        base = self.base
        lines = [f"Trained on {self.meta.get('task', '')} ({self.meta.get('n_train')} examples), scored on "
                 f"{self.meta.get('heldout', '')} (n = {len(self.base_correct)}); seeds {self.meta.get('seeds')}, "
                 f"{self.meta.get('draws')} random draw(s) per seed; base model held-out accuracy "
                 f"{base['heldout_accuracy']:.3f}.", "",
                 summary_markdown(self.summary())]
        for note in self.meta.get("notes", []):
            lines.append(f"\nNote: {note}")
        return "\n".join(lines)

    def verdicts(self) -> list[str]:
        """One plain sentence per (kind, budget, ranking): the verdict on held-out accuracy, and the
        collateral change (KL on unrelated text) of both."""
        summary = self.summary()
        kl = {(e["kind"], e["budget"], e["method"]): e["kl_unrelated"] for e in summary}
        out = []
        for e in summary:
            if "verdict" in e:
                out.append(f"{self.meta.get('task', '')}, {e['budget']} {e['kind']}(s), {e['method']}-selected vs "
                           f"random sites: {e['verdict']}, {e['minus_random']:+.3f} [{e['minus_random_low']:+.3f}, "
                           f"{e['minus_random_high']:+.3f}] in held-out accuracy; KL on unrelated text "
                           f"{e['kl_unrelated']:.3f} vs {kl[(e['kind'], e['budget'], 'random')]:.3f}")
        return out

    def to_json(self) -> dict[str, Any]:
        return {"meta": self.meta, "base": self.base, "summary": self.summary(), "rows": list(self.rows),
                "base_correct": self.base_correct.int().tolist(),
                "correct": [[*key, value.int().tolist()] for key, value in self.correct.items()]}

    def save(self, directory: str | Path) -> Path:
        """`curves.json` (every run and its per-example correctness) and `curves.md` in `directory`."""
        directory = Path(directory)
        write_json(directory / "curves.json", self.to_json())
        write_text(directory / "curves.md", self.to_markdown() + "\n")
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> "BudgetCurves":
        path = Path(directory) / "curves.json"
        if not path.is_file():
            raise FileNotFoundError(f"no budget curves at {path} (written by BudgetCurves.save)")
        data = json.loads(path.read_text())
        correct = {tuple(entry[:5]): torch.tensor(entry[5], dtype=torch.bool) for entry in data["correct"]}
        return cls(tuple(data["rows"]), correct, data["base"], torch.tensor(data["base_correct"], dtype=torch.bool),
                   data["meta"])

    @classmethod
    def combine(cls, *parts: "BudgetCurves") -> "BudgetCurves":
        """One comparison from parts run separately with other seeds (say, seeds 5-9 added to 0-4 to narrow
        the intervals): the parts must agree on everything but their seeds and budgets (task, splits, base
        model's held-out correctness, draws, training settings) and share no run. A part may run some
        budgets only (more seeds where the intervals are widest): each budget is then compared over the
        seeds that ran it (`runs` in its summary)."""
        if not parts:
            raise ValueError("BudgetCurves.combine needs at least one part")

        def plan(meta: dict[str, Any]) -> dict[str, Any]:  # what the parts must share: all but seeds and budgets
            kept = {key: value for key, value in meta.items() if key not in ("seeds", "notes", "budgets")}
            return {**kept, "config": {**meta.get("config", {}), "seed": None}}

        first, *rest = parts
        same = plan(first.meta)
        correct = dict(first.correct)
        for part in rest:
            other = plan(part.meta)
            differ = sorted(k for k in same.keys() | other.keys() if same.get(k) != other.get(k))
            if not torch.equal(part.base_correct, first.base_correct):
                differ.append("the base model's held-out correctness")
            if differ:
                raise ValueError(f"BudgetCurves.combine: the parts differ in {', '.join(differ)}; only runs of "
                                 "one plan on one task with other seeds combine")
            repeated = sorted(set(correct) & set(part.correct))
            if repeated:
                raise ValueError(f"BudgetCurves.combine: run {repeated[0]} (kind, budget, method, seed, draw) is in "
                                 f"two parts; give each part its own seeds")
            correct.update(part.correct)
        chosen: dict[tuple[str, int, str], list[str]] = {}
        for row in (r for part in parts for r in part.rows if r["method"] in RANKINGS):
            sites = chosen.setdefault((row["kind"], row["budget"], row["method"]), row["sites"])
            if sites != row["sites"]:
                raise ValueError(f"BudgetCurves.combine: the parts' {row['method']}-selected sites differ at "
                                 f"{row['budget']} {row['kind']}(s) ({sites[:3]}... vs {row['sites'][:3]}...): they "
                                 "ranked the units otherwise (other ranking examples, or another neuron shortlist); "
                                 "rank every part alike (`rank_units(shortlist=...)`, `mechattr curves --shortlist`)")
        seeds = sorted({s for part in parts for s in part.meta.get("seeds", ())})
        notes = list(dict.fromkeys(n for part in parts for n in part.meta.get("notes", ())))
        budgets: dict[str, set] = {}
        for part in parts:
            for kind, sizes in part.meta.get("budgets", {}).items():
                budgets.setdefault(kind, set()).update(sizes)
        return cls(tuple(r for part in parts for r in part.rows), correct, first.base, first.base_correct,
                   {**first.meta, "seeds": seeds, "notes": notes,
                    "budgets": {kind: tuple(sorted(sizes)) for kind, sizes in budgets.items()}})


def summary_markdown(summary: Sequence[dict[str, Any]]) -> str:
    """A markdown table of `BudgetCurves.summary()`: one row per (units, budget, method)."""
    lines = ["| units | budget | method | trained params | held-out acc [95% CI] | metric | KL unrelated | "
             "other tasks' acc | precision - random [95% CI] | verdict | s per run |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for e in summary:
        other = ", ".join(f"{k} {v:.3f}" for k, v in e["other_accuracy"].items())
        diff = (f"{e['minus_random']:+.3f} [{e['minus_random_low']:+.3f}, {e['minus_random_high']:+.3f}]"
                if "verdict" in e else "")
        lines.append(f"| {e['kind']} | {e['budget'] or 'all'} | {e['method']} | {e['n_trained']:,.0f} | "
                     f"{e['accuracy']:.3f} [{e['accuracy_low']:.3f}, {e['accuracy_high']:.3f}] | "
                     f"{e['heldout_metric']:+.3f} | {e['kl_unrelated']:.4f} | {other} | {diff} | "
                     f"{e.get('verdict', '')} | {e['wall_s']:.1f} |")
    return "\n".join(lines)


def _methods(rankings: dict[str, Effects], budget: int, plan: BudgetPlan) -> list[tuple[str, Method]]:
    """The precision methods (one per ranking) and the plan's baselines at one budget; full fine-tuning,
    which has no budget, runs once per seed apart."""
    methods: list[tuple[str, Method]] = [(r, TopSites(rankings[r], k=budget, tag=r)) for r in RANKINGS]
    return methods + [(name, FINETUNE_METHODS[name].against(rankings["atp"], budget, "any",
                                                             **plan.settings(name)))
                      for name in plan.baselines if name != "full"]


def _lora_fits(model: Any, lora: LoRA, target: int) -> bool:
    """Whether rank-1 LoRA (the smallest) is at most twice `target` parameters."""
    return n_trained(replace(lora, rank=1).build(model, 0, None).masks) <= 2 * target


def _same_run(label: str, setup: Setup, config: TrainConfig) -> tuple:
    """What makes two runs the same computation: what is trained (site methods: the sites, whichever
    ranking chose them; LoRA: its size, at any unit kind), the seed and the learning rate."""
    what = (label, n_trained(setup.masks)) if label in ("lora", "full") else tuple(sorted(map(str, setup.sites)))
    return what, config.seed, config.lr


def budget_curves(load: Callable[[], Any], train_task: Task, heldout: Task,
                  rankings: dict[str, dict[str, Effects]], plan: BudgetPlan = BudgetPlan(), *,
                  others: Sequence[Task] = (), text: Text | None = None, progress: bool = True) -> BudgetCurves:
    """Train every method of `plan` at every budget on `train_task` and score it on `heldout`, `others`
    (collateral accuracy) and `text` (KL from the base model; default `harness.UNRELATED_TEXT`).

    `load()` returns the base model; every run trains it and its weights are put back after
    (`harness.run_trial`). `rankings[kind]` holds an "exact" and an "atp" `Effects` over sites of that
    unit kind ("head": z sites, "neuron": neuron sites); the "atp" one must cover the whole grid, since
    random and bottom-k sites are drawn from it. Kinds absent from `rankings` are skipped. A run that
    would repeat one already made (exact and AtP choosing the same sites, one LoRA rank at two unit kinds)
    is not trained again: its row names the run in `shared_with`.
    """
    unknown = {k for k in rankings if k not in UNIT_KINDS} | {
        f"{k}.{r}" for k, v in rankings.items() for r in RANKINGS if r not in v}
    if unknown:
        raise ValueError(f"budget_curves: rankings need kinds among {UNIT_KINDS}, each with {RANKINGS}; "
                         f"missing or unknown: {sorted(unknown)}")
    model = load()
    scorer = Scorer(model, heldout, others, text if text is not None else unrelated_text(model))
    base = {"heldout_accuracy": scorer.base.heldout_accuracy, "heldout_metric": scorer.base.heldout_metric,
            "kl_unrelated": 0.0, "other_accuracy": scorer.base.other_accuracy()}
    budgets = {"head": plan.heads if "head" in rankings else ()}
    if "neuron" in rankings:
        budgets["neuron"] = plan.neurons if plan.neurons is not None else \
            matched_neurons(model, rankings["head"]["exact"], rankings["neuron"]["atp"], plan.heads) \
            if "head" in rankings else ()
    notes: list[str] = []
    jobs = []  # (kind, budget, label, method, seed, draw)
    for kind, sizes in budgets.items():
        for budget in sizes:
            for label, method in _methods(rankings[kind], budget, plan):
                for seed in plan.seeds:
                    for draw in range(plan.draws if label == "random" else 1):
                        jobs.append((kind, budget, label, method, seed, draw))
    if "full" in plan.baselines:
        jobs += [("all", 0, "full", Full(**plan.settings("full")), seed, 0) for seed in plan.seeds]

    rows, correct, targets, done = [], {}, {}, {}
    with tqdm(total=len(jobs), desc="budget curves", disable=not progress) as bar:
        for kind, budget, label, method, seed, draw in jobs:
            bar.set_postfix(units=kind, budget=budget, method=label, seed=seed)
            bar.update(1)
            target = targets.get((kind, budget))
            if label == "lora" and not _lora_fits(model, method, target):
                note = (f"no LoRA at {budget} {kind}(s): rank 1 already trains more than twice the "
                        f"{target:,} parameters of the budget")
                notes += [note] if note not in notes else []
                continue
            start = time.perf_counter()
            setup = method.build(model, seed * 1_000 + draw, target)
            if label == "exact":
                targets[(kind, budget)] = n_trained(setup.masks)
            config = method.run_config(plan.config, seed)
            key = (kind, budget, label, seed, draw)
            same = _same_run(label, setup, config)
            if same in done:
                row, first = done[same]
                rows.append({**row, "kind": kind, "budget": budget, "method": label, "draw": draw,
                             "shared_with": list(first)})
                correct[key] = correct[first]
                continue
            trial = run_trial(setup, model, train_task, config, scorer)
            rows.append({"kind": kind, "budget": budget, "method": label, "seed": seed, "draw": draw,
                         "lr": config.lr, "n_trained": trial.result.n_trained,
                         "heldout_accuracy": trial.scores.heldout_accuracy,
                         "heldout_metric": trial.scores.heldout_metric, "kl_unrelated": trial.scores.kl_unrelated,
                         "other_accuracy": trial.scores.other_accuracy(), "train_s": trial.result.wall_s,
                         "wall_s": time.perf_counter() - start,  # selection, training and scoring
                         "final_loss": trial.result.losses[-1] if trial.result.losses else math.nan,
                         "sites": [str(s) for s in setup.sites]})
            correct[key] = trial.scores.correct
            done[same] = rows[-1], key
    meta = {"task": train_task.name, "heldout": heldout.name, "n_train": train_task.n_examples,
            "n_heldout": heldout.n_examples, "others": [t.name for t in others], "budgets": budgets,
            "seeds": list(plan.seeds), "draws": plan.draws, "config": asdict(plan.config),
            "tie_margin": plan.tie_margin, "notes": notes}
    return BudgetCurves(tuple(rows), correct, base, scorer.base.correct, meta)
