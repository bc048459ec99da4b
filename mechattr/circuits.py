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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from mechattr.attribution import attribute, gradient_pass
from mechattr.edges import Edge, EdgeAblator, all_edges, attribute_edges
from mechattr.interventions import Intervention, Noise
from mechattr.patching import Forward, metric_readout, run_cells
from mechattr.sites import Site, model_shape
from mechattr.tasks import Task

__all__ = ["Circuit", "discover", "nodes", "node_faithfulness", "edge_faithfulness"]

LEVELS = ("node", "edge")


def nodes(model: Any) -> list[Site]:
    """The node graph: the embedding, then per layer every head's output and the MLP."""
    shape = model_shape(model)
    out = [Site("embed")]
    for layer in range(shape["n_layers"]):
        out += [Site("z", layer, head=h) for h in range(shape["n_heads"])] + [Site("mlp_out", layer)]
    return out


def _site_json(site: Site) -> list:
    return [site.kind, site.layer, site.pos, site.head, site.neuron]


@dataclass(frozen=True, eq=False)
class Circuit:
    """A discovered circuit with the faithfulness curve of the attribution ranking it came from."""

    level: str  # "node" or "edge"
    nodes: tuple[Site, ...]  # the kept nodes (edge level: every endpoint of a kept edge)
    edges: tuple[Edge, ...]  # the kept edges (empty at node level)
    ranking: tuple  # all candidates (Sites or Edges), highest |attribution| first
    scores: tuple[float, ...]  # their attribution estimates of the ablation's effect, same order
    sizes: tuple[int, ...]  # n along the curve: the top-n candidates kept
    curve: tuple[float, ...]  # faithfulness with the top-n kept, per size
    faithfulness: float  # of the final circuit
    clean_metric: float
    corrupt_metric: float
    meta: dict[str, Any] = field(default_factory=dict)  # method, ablation, threshold, target, task

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
        """Write `circuit.json` into `directory`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        encode = (lambda c: _site_json(c)) if self.level == "node" else (
            lambda e: [_site_json(e.sender), _site_json(e.receiver)])
        data = {"level": self.level, "nodes": [_site_json(s) for s in self.nodes],
                "edges": [[_site_json(e.sender), _site_json(e.receiver)] for e in self.edges],
                "ranking": [encode(c) for c in self.ranking], "scores": list(self.scores), "sizes": list(self.sizes),
                "curve": list(self.curve), "faithfulness": self.faithfulness, "auc": self.auc,
                "clean_metric": self.clean_metric, "corrupt_metric": self.corrupt_metric, "meta": self.meta}
        (directory / "circuit.json").write_text(json.dumps(data, indent=1))
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> "Circuit":
        path = Path(directory) / "circuit.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing; save a circuit there with Circuit.save()")
        data = json.loads(path.read_text())
        site = lambda v: Site(*v)  # noqa: E731
        edge = lambda v: Edge(site(v[0]), site(v[1]))  # noqa: E731
        decode = site if data["level"] == "node" else edge
        return cls(level=data["level"], nodes=tuple(map(site, data["nodes"])), edges=tuple(map(edge, data["edges"])),
                   ranking=tuple(map(decode, data["ranking"])), scores=tuple(data["scores"]),
                   sizes=tuple(data["sizes"]), curve=tuple(data["curve"]), faithfulness=data["faithfulness"],
                   clean_metric=data["clean_metric"], corrupt_metric=data["corrupt_metric"], meta=data["meta"])


# Exact evaluation --------------------------------------------------------------------------------

@dataclass
class _NodeRuns:
    """The base run's forward and caches, and every node's ablated value."""

    forward: Forward
    resid: dict[str, Tensor]
    values: dict[Site, Tensor]
    reference: Tensor
    base: Tensor  # per-example metric of the base run
    clean: Tensor
    corrupt: Tensor


def _node_runs(model: Any, task: Task, candidates: Sequence[Site], ablation: Intervention) -> _NodeRuns:
    base_run = ablation.base_run
    source_run = "clean" if base_run == "corrupt" else "corrupt"
    resid = [f"blocks.{layer}.hook_resid_pre" for layer in range(model_shape(model)["n_layers"])]
    names = sorted({s.hook for s in candidates} | set(resid))
    base = gradient_pass(model, task.tokens(base_run), names, None)
    source = gradient_pass(model, task.tokens(source_run), names, None)
    logits = {base_run: base.logits, source_run: source.logits}
    reference = logits["clean"].log_softmax(-1)
    metric = {run: task.metric(lg, task.answer, task.wrong, reference) for run, lg in logits.items()}
    values = {}
    for s in candidates:
        where = (slice(None),) + s.index
        values[s] = ablation(base.acts[s.hook][where], source.acts[s.hook][where])
    # Cells never resume at block 0: the embedding runs before it, so an embed patch needs the full forward.
    return _NodeRuns(Forward(model, task.tokens(base_run)), {h: base.acts[h] for h in resid[1:]}, values, reference,
                     metric[base_run], metric["clean"], metric["corrupt"])


def _faithfulness(task: Task, metric: Tensor, clean: Tensor, corrupt: Tensor) -> list[float]:
    """Per circuit [circuits, n] -> fraction of the mean clean-minus-corrupted gap kept."""
    gap = float(clean.mean() - corrupt.mean())
    if abs(gap) < 1e-12:
        raise ValueError(f"task {task.name!r}: clean and corrupted metrics are equal; faithfulness is undefined")
    return ((metric.mean(-1) - corrupt.mean()) / gap).tolist()


def _node_metric(task: Task, runs: _NodeRuns, circuits: Sequence[set[Site]]) -> Tensor:
    """Metric [circuits, n] of the base run with every node outside each circuit ablated."""
    cells = [[(s, v) for s, v in runs.values.items() if s not in circuit] for circuit in circuits]
    out = torch.empty(len(circuits), task.n_examples)
    todo = [i for i, c in enumerate(cells) if c]
    out[[i for i, c in enumerate(cells) if not c]] = runs.base  # nothing ablated: the base run itself
    if todo:
        out[todo] = run_cells(runs.forward, [cells[i] for i in todo], runs.resid,
                              metric_readout(task, runs.reference), desc="circuits")
    return out


def _baselines(model: Any, task: Task) -> tuple[Tensor, Tensor]:
    """Per-example metric of the clean and the corrupted run."""
    clean = gradient_pass(model, task.clean, [], None).logits
    corrupt = gradient_pass(model, task.corrupt, [], None).logits
    reference = clean.log_softmax(-1)
    return tuple(task.metric(lg, task.answer, task.wrong, reference) for lg in (clean, corrupt))


def node_faithfulness(model: Any, task: Task, circuits: Sequence[set[Site]], ablation: Intervention = Noise(),
                      candidates: Sequence[Site] | None = None) -> list[float]:
    """Faithfulness of each node circuit: the base run with every candidate node outside it ablated."""
    runs = _node_runs(model, task, list(candidates or nodes(model)), ablation)
    return _faithfulness(task, _node_metric(task, runs, circuits), runs.clean, runs.corrupt)


def edge_faithfulness(model: Any, task: Task, circuits: Sequence[set[Edge]], ablation: Intervention = Noise(),
                      edges: Sequence[Edge] | None = None) -> list[float]:
    """Faithfulness of each edge circuit: the base run with every edge outside it ablated."""
    clean, corrupt = _baselines(model, task)
    return _faithfulness(task, EdgeAblator(model, task, ablation, edges)(circuits), clean, corrupt)


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


def discover(model: Any, task: Task, level: str = "node", *, method: str = "atp", ablation: Intervention = Noise(),
             target: float = 0.8, threshold: float = 0.01, points: int = 24, prune: bool = True) -> Circuit:
    """Rank the nodes (or edges) by `method`'s estimate of ablating each, measure the faithfulness curve
    of the top-n prefixes, start from the smallest prefix with faithfulness >= `target` (all if none),
    and, with `prune`, drop components whose removal moves the metric by less than `threshold` x gap
    while the faithfulness stays >= `target`.
    Exact evaluations: one batched run for the curve, one per pruning trial."""
    if level not in LEVELS:
        raise ValueError(f"unknown circuit level {level!r}; valid: {', '.join(LEVELS)}")
    if level == "node":
        candidates = nodes(model)
        scores = attribute(model, task, candidates, method, intervention=ablation).effect
        runs = _node_runs(model, task, candidates, ablation)
        clean, corrupt = runs.clean, runs.corrupt
        evaluate = lambda circuits: _faithfulness(task, _node_metric(task, runs, circuits), clean, corrupt)  # noqa: E731
    else:
        candidates = all_edges(model)
        scores = attribute_edges(model, task, candidates, method, intervention=ablation).effect
        ablator = EdgeAblator(model, task, ablation, candidates)
        clean, corrupt = _baselines(model, task)
        evaluate = lambda circuits: _faithfulness(task, ablator(circuits), clean, corrupt)  # noqa: E731
    order = scores.abs().argsort(descending=True).tolist()
    ranking = [candidates[i] for i in order]
    sizes = _sizes(len(ranking), points)
    curve = evaluate([set(ranking[:n]) for n in sizes])
    start = next((n for n, f in zip(sizes, curve) if f >= target), len(ranking))
    kept, final = list(ranking[:start]), curve[sizes.index(start)]
    if prune:  # a start that reached the target keeps reaching it
        kept, final = _prune(evaluate, kept, final, threshold, min(target, final))
    kept_nodes = kept if level == "node" else list(dict.fromkeys(s for e in kept for s in (e.sender, e.receiver)))
    return Circuit(level=level, nodes=tuple(kept_nodes), edges=tuple(kept) if level == "edge" else (),
                   ranking=tuple(ranking), scores=tuple(scores[order].tolist()), sizes=tuple(sizes),
                   curve=tuple(curve), faithfulness=final, clean_metric=float(clean.mean()),
                   corrupt_metric=float(corrupt.mean()),
                   meta={"task": task.name, "method": method, "ablation": ablation.name, "target": target,
                         "threshold": threshold, "n_layers": model_shape(model)["n_layers"],
                         "n_heads": model_shape(model)["n_heads"]})
