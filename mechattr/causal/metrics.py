"""Scores of a predicted causal graph against the truth (summaries over trials: `mechattr.stats`).

Definitions (those of the seed paper's causal attribution model, with E the true and Ê the predicted
directed edges; its F1 is the harmonic mean of 1 - FDR and TDR, which makes TDR the share of true edges
found rather than 1 - FDR):

- TDR, true discovery rate = |Ê ∩ E| / |E|; a reversed edge is not a discovery.
- FDR, false discovery rate = |Ê \\ E| / |Ê|, and 0 when nothing is predicted.
- F1 = 2 (1 - FDR) TDR / ((1 - FDR) + TDR), and 0 when both terms are 0.
- SHD, structural Hamming distance = the number of unordered variable pairs whose edge state (none,
  u -> v, v -> u, both) differs between Ê and E: a missing, an extra and a reversed edge count 1 each.
- AUROC of pair scores against "the ordered pair is a true edge", ties counted as half.
"""

from typing import Iterable

import networkx as nx
from jaxtyping import Bool, Float
from scipy import stats
from torch import Tensor

__all__ = ["tdr", "fdr", "f1", "shd", "auroc", "graph_metrics"]

Edges = nx.DiGraph | Iterable[tuple[str, str]]


def _edges(graph: Edges) -> set[tuple[str, str]]:
    return set(graph.edges) if isinstance(graph, nx.DiGraph) else set(graph)


def tdr(pred: Edges, truth: Edges) -> float:
    """|Ê ∩ E| / |E|; NaN when the truth has no edges."""
    p, t = _edges(pred), _edges(truth)
    return len(p & t) / len(t) if t else float("nan")


def fdr(pred: Edges, truth: Edges) -> float:
    """|Ê \\ E| / |Ê|; 0 for an empty prediction."""
    p, t = _edges(pred), _edges(truth)
    return len(p - t) / len(p) if p else 0.0


def f1(pred: Edges, truth: Edges) -> float:
    precision, recall = 1.0 - fdr(pred, truth), tdr(pred, truth)
    return 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


def shd(pred: Edges, truth: Edges) -> int:
    """Unordered pairs whose edge state differs; a reversed edge counts once."""
    p, t = _edges(pred), _edges(truth)
    pairs = {frozenset(e) for e in p | t if e[0] != e[1]}
    return sum(((u, v) in p, (v, u) in p) != ((u, v) in t, (v, u) in t) for u, v in map(sorted, pairs))


def auroc(scores: Float[Tensor, " pair"], labels: Bool[Tensor, " pair"]) -> float:
    """Probability that a random true pair outscores a random false one (Mann-Whitney U / (n+ n-))."""
    s, y = scores.double().numpy(), labels.numpy().astype(bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = stats.rankdata(s)  # midranks: ties count half
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def graph_metrics(pred: Edges, truth: Edges) -> dict[str, float]:
    """TDR, FDR, F1, SHD and the number of predicted edges."""
    return {"TDR": tdr(pred, truth), "FDR": fdr(pred, truth), "F1": f1(pred, truth),
            "SHD": float(shd(pred, truth)), "n_pred": float(len(_edges(pred)))}
