"""Circuits: the smallest set of components (or edges) that carries a task, found by attribution and
checked by exact patching.

Convention (Wang et al. 2022; Conmy et al. 2023): a circuit is evaluated on the clean run with every
node (or edge) outside it ablated, that is set to its value in the corrupted run (`Noise`, the default;
`Mean` or `Zero` for other ablations). Its faithfulness is the fraction of the clean-minus-corrupted
metric gap it keeps: (metric(circuit) - corrupt) / (clean - corrupt), 1 for the whole model and 0 when
every node is ablated. Nodes are the token embedding, every attention head (its output `z` at all
positions) and every MLP (`mlp_out`), so ablating them all reproduces the corrupted run exactly.

`discover` ranks the components by an attribution estimate, measures the faithfulness of every top-n
prefix along a curve (one batched exact run per point), starts from the smallest prefix that reaches
`target`, then prunes greedily ACDC-style: in increasing order of score, a component is removed when
removing it moves the metric by less than `threshold` x |clean - corrupt| and the circuit still
reaches `target`.
"""

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from mechattr.ablation import EdgeAblator, NodeAblator
from mechattr.attribution import attribute
from mechattr.edges import attribute_edges
from mechattr.effects import normalize
from mechattr.faithfulness import faithfulness
from mechattr.graph import Edge, all_edges, nodes, unit_from_json
from mechattr.interventions import Intervention, Noise
from mechattr.models import model_shape
from mechattr.runs import Runs, setup
from mechattr.sites import Site
from mechattr.storage import write_json
from mechattr.tasks import Task

__all__ = ["Circuit", "discover", "node_faithfulness", "edge_faithfulness", "LEVELS", "DEFAULT_ABLATION"]

LEVELS = ("node", "edge")
DEFAULT_ABLATION = Noise()  # what a component outside a circuit gets when a call names no ablation


@dataclass(frozen=True, eq=False)
class Circuit:
    """A discovered circuit with the faithfulness curve of the attribution ranking it came from."""

    level: str  # "node" or "edge"
    nodes: tuple[Site, ...]  # the kept nodes (edge level: every endpoint of a kept edge)
    edges: tuple[Edge, ...]  # the kept edges (empty at node level)
    ranking: tuple[Site, ...] | tuple[Edge, ...]  # all candidates (nodes or edges), highest |attribution| first
    scores: tuple[float, ...]  # their attribution estimates of the ablation's effect, same order
    sizes: tuple[int, ...]  # n along the curve: the top-n candidates kept
    curve: tuple[float, ...]  # faithfulness with the top-n kept, per size
    faithfulness: float  # of the final circuit
    clean_metric: float
    corrupt_metric: float
    meta: dict[str, Any] = field(default_factory=dict)  # method, ablation, threshold, target, task, mib

    def __post_init__(self):
        if self.level not in LEVELS:
            raise ValueError(f"unknown circuit level {self.level!r}; valid: {', '.join(LEVELS)}")
        unit = Site if self.level == "node" else Edge
        wrong = [c for c in self.ranking if not isinstance(c, unit)]
        if wrong:
            raise ValueError(f"a {self.level}-level circuit ranks {unit.__name__}s, got {wrong[0]!r}")

    @property
    def auc(self) -> float:
        """Area under the faithfulness curve over the fraction of candidates kept (0..1)."""
        x = torch.tensor(self.sizes, dtype=torch.float64) / len(self.ranking)
        return float(torch.trapezoid(torch.tensor(self.curve, dtype=torch.float64), x))

    @property
    def size(self) -> int:
        return len(self.nodes) if self.level == "node" else len(self.edges)

    def heads(self) -> list[Site]:
        return [s for s in self.nodes if s.kind == "z"]

    def save(self, directory: str | Path) -> Path:
        """Write `circuit.json` into `directory` (atomically)."""
        directory = Path(directory)
        data = {"level": self.level, "nodes": [s.to_json() for s in self.nodes],
                "edges": [e.to_json() for e in self.edges], "ranking": [c.to_json() for c in self.ranking],
                "scores": list(self.scores), "sizes": list(self.sizes), "curve": list(self.curve),
                "faithfulness": self.faithfulness, "auc": self.auc, "clean_metric": self.clean_metric,
                "corrupt_metric": self.corrupt_metric, "meta": self.meta}
        write_json(directory / "circuit.json", data, indent=1)
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> "Circuit":
        path = Path(directory) / "circuit.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing; save a circuit there with Circuit.save()")
        data = json.loads(path.read_text())
        return cls(level=data["level"], nodes=tuple(map(Site.from_json, data["nodes"])),
                   edges=tuple(map(unit_from_json, data["edges"])), ranking=tuple(map(unit_from_json, data["ranking"])),
                   scores=tuple(data["scores"]), sizes=tuple(data["sizes"]), curve=tuple(data["curve"]),
                   faithfulness=data["faithfulness"], clean_metric=data["clean_metric"],
                   corrupt_metric=data["corrupt_metric"], meta=data["meta"])


# Exact evaluation --------------------------------------------------------------------------------

def _faithfulness(task: Task, metric: Tensor, runs: Runs) -> list[float]:
    """Per circuit [circuits, n] -> fraction of the mean clean-minus-corrupted gap kept."""
    return normalize(metric.mean(-1), runs.clean, runs.corrupt, f"task {task.name!r}").tolist()


def node_faithfulness(model: Any, task: Task, circuits: Sequence[set[Site]], ablation: Intervention = Noise(),
                      candidates: Sequence[Site] | None = None) -> list[float]:
    """Faithfulness of each node circuit: the base run with every candidate node outside it ablated."""
    evaluate = NodeAblator(model, task, list(candidates or nodes(model)), ablation)
    return _faithfulness(task, evaluate(circuits), evaluate.runs)


def edge_faithfulness(model: Any, task: Task, circuits: Sequence[set[Edge]], ablation: Intervention = Noise(),
                      edges: Sequence[Edge] | None = None) -> list[float]:
    """Faithfulness of each edge circuit: the base run with every edge outside it ablated."""
    ablator = EdgeAblator(model, task, ablation, edges)
    return _faithfulness(task, ablator(circuits), ablator.runs)


# Discovery ----------------------------------------------------------------------------------------

def _sizes(total: int, points: int) -> list[int]:
    """0, `total`, and about `points` sizes in between, log-spaced (dense where circuits are small)."""
    grid = torch.logspace(0, torch.log10(torch.tensor(float(total))), max(points, 2)).round().long()
    return sorted({0, total, *grid.tolist()})


def _prune(evaluate, kept: list, current: float, threshold: float, floor: float) -> tuple[list, float]:
    """ACDC-style: in increasing order of score (kept is best first), drop a component when dropping it
    changes the faithfulness by less than `threshold` and leaves it at least `floor`."""
    for candidate in reversed(list(kept)):
        trial = [c for c in kept if c != candidate]
        (value,) = evaluate([set(trial)])
        if abs(value - current) < threshold and value >= floor:
            kept, current = trial, value
    return kept, current


def discover(model: Any, task: Task | str | None = None, level: str = "node", *, method: str = "atp",
             ablation: Intervention | None = None, target: float = 0.8, threshold: float = 0.01, points: int = 24,
             prune: bool = True, mib: int = 0) -> Circuit:
    """Rank the nodes (or edges) by `method`'s estimate of ablating each, measure the faithfulness curve
    of the top-n prefixes, start from the smallest prefix with faithfulness >= `target` (all if none),
    and, with `prune`, drop components whose removal moves the metric by less than `threshold` x gap
    while the faithfulness stays >= `target`. With `mib` > 0, the ranking's MIB faithfulness (CPR and
    CMD with intervals, `mechattr.faithfulness`, against `mib` random rankings) goes into
    `meta["mib"]`.
    Exact evaluations: one batched run for the curve, one per pruning trial, and with `mib` one per
    MIB circuit.

    `discover(model, task, level, ablation=Noise())`, or `discover(runs, level)` on unpatched runs whose
    intervention is the ablation; the estimate and the exact evaluations share one pair of runs."""
    runs: Runs
    runs, named = setup(model, task, None, ablation, "discover", default=DEFAULT_ABLATION)
    level = named if isinstance(named, str) else level  # discover(runs, "edge")
    model, task, ablation = runs.model, runs.task, runs.intervention
    if level not in LEVELS:
        raise ValueError(f"unknown circuit level {level!r}; valid: {', '.join(LEVELS)}")
    if level == "node":
        candidates = nodes(model)
        estimate = attribute(runs, candidates, method)
        ablate = NodeAblator.of(runs, candidates)
    else:
        candidates = all_edges(model)
        estimate = attribute_edges(runs, candidates, method)
        ablate = EdgeAblator.of(runs, candidates)
    scores = estimate.effect.flatten()
    evaluate = lambda circuits: _faithfulness(task, ablate(circuits), runs)  # noqa: E731
    order = scores.abs().argsort(descending=True).tolist()
    ranking = [candidates[i] for i in order]
    sizes = _sizes(len(ranking), points)
    curve = evaluate([set(ranking[:n]) for n in sizes])
    start = next((n for n, f in zip(sizes, curve) if f >= target), len(ranking))
    kept, final = list(ranking[:start]), curve[sizes.index(start)]
    if prune:  # a start that reached the target keeps reaching it
        kept, final = _prune(evaluate, kept, final, threshold, min(target, final))
    meta = {"task": task.name, "method": method, "ablation": ablation.name, "target": target, "threshold": threshold,
            "n_layers": model_shape(model)["n_layers"], "n_heads": model_shape(model)["n_heads"]}
    if mib:
        measured = faithfulness(model, task, estimate, ablation, random=mib, ablator=ablate)
        meta["mib"] = {k: v for k, v in asdict(measured).items() if k != "meta"}
    kept_nodes = kept if level == "node" else list(dict.fromkeys(s for e in kept for s in (e.sender, e.receiver)))
    return Circuit(level=level, nodes=tuple(kept_nodes), edges=tuple(kept) if level == "edge" else (),
                   ranking=tuple(ranking), scores=tuple(scores[order].tolist()), sizes=tuple(sizes),
                   curve=tuple(curve), faithfulness=final, clean_metric=float(runs.clean.mean()),
                   corrupt_metric=float(runs.corrupt.mean()), meta=meta)
