"""The seed paper's causal attribution model at the input level (arXiv 2401.00139, Cai, Liu & Song).

Do-operators on the prompt of a causal-discovery task (replace the variables' names by made-up words,
omit or relabel the data) measure how much a language model's answer rests on knowledge and how much on
the data:

    problem = causal.load("asia")
    table = causal.attribution_table(mechattr.load_model(), problem, trials=3)
    print(table.to_markdown())

Modules: `problems` (networks and data), `settings` (the six do-operators, made-up words), `prompts`,
`scoring` (Yes/No log-odds, edge-list parsing), `metrics` (TDR, FDR, F1, SHD, AUROC), `table` (the
attribution table), `pairwise` (pairwise discovery against knowledge), `components` (knowledge vs data
inside the model). `Summary` and `summarize` (over trials) live in `mechattr.stats`.
"""

from mechattr.causal.metrics import auroc, f1, fdr, graph_metrics, shd, tdr
from mechattr.causal.pairwise import PairwiseResult, pairwise_discovery
from mechattr.causal.problems import NETWORKS, Problem, from_csv, load
from mechattr.causal.scoring import parse_edges, predicted_graph, score_questions
from mechattr.causal.settings import SETTINGS, conditions
from mechattr.causal.table import ATTRIBUTIONS, AttributionTable, attribution_table
from mechattr.moved import moved_names
from mechattr.stats import Summary, summarize

__all__ = ["Problem", "NETWORKS", "load", "from_csv", "SETTINGS", "conditions", "parse_edges",
           "score_questions", "predicted_graph", "tdr", "fdr", "f1", "shd", "auroc", "graph_metrics", "Summary",
           "summarize", "ATTRIBUTIONS", "AttributionTable", "attribution_table", "PairwiseResult",
           "pairwise_discovery"]

# `select` was this package's name for `predicted_graph`, beside `mechattr.select` (sites from effects).
__getattr__ = moved_names(__name__, {"select": "mechattr.causal.scoring.predicted_graph"})
