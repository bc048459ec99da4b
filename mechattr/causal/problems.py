"""Causal-discovery problems: a true graph over named variables, data sampled from it, readable names.

The benchmark networks are the bnlearn Bayesian networks that pgmpy 1.1.2 ships as files inside its wheel
(`pgmpy/utils/example_models/<name>.bif.gz`), read with `pgmpy.readwrite.BIFReader`, so nothing is
downloaded. The ground truth is the edge set of that file; sources disagree for some networks (Sachs has
17 edges in pgmpy's file, 18 or 20 elsewhere), and these problems pin pgmpy's.
"""

import functools
import gzip
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import networkx as nx
import pandas as pd

__all__ = ["Problem", "NETWORKS", "load", "from_csv", "readable"]

NETWORKS = ("asia", "cancer", "earthquake", "survey", "sachs", "child", "insurance", "alarm")

# Readable names, the "knowledge" a language model may hold about each variable. Networks without a table
# (child, insurance, alarm) fall back to `readable`, which splits CamelCase identifiers into words.
_NAMES = {
    "asia": {"asia": "visit to Asia", "tub": "tuberculosis", "smoke": "smoking", "lung": "lung cancer",
             "bronc": "bronchitis", "either": "tuberculosis or lung cancer", "xray": "positive X-ray",
             "dysp": "dyspnoea"},
    "cancer": {"Pollution": "air pollution", "Smoker": "smoking", "Cancer": "lung cancer",
               "Xray": "positive X-ray", "Dyspnoea": "dyspnoea"},
    "earthquake": {"Burglary": "burglary", "Earthquake": "earthquake", "Alarm": "burglar alarm sounds",
                   "JohnCalls": "John calls", "MaryCalls": "Mary calls"},
    "survey": {"A": "age", "S": "sex", "E": "education level", "O": "occupation",
               "R": "size of city of residence", "T": "means of transport"},
    "sachs": {"Raf": "Raf kinase", "Mek": "Mek (MAP kinase kinase)", "Plcg": "PLC-gamma",
              "PIP2": "PIP2 (phosphatidylinositol bisphosphate)",
              "PIP3": "PIP3 (phosphatidylinositol trisphosphate)", "Erk": "Erk (p44/42 MAP kinase)",
              "Akt": "Akt (protein kinase B)", "PKA": "PKA (protein kinase A)",
              "PKC": "PKC (protein kinase C)", "P38": "p38 MAP kinase", "Jnk": "Jnk (c-Jun N-terminal kinase)"},
}

# Characters that would make a name ambiguous inside a CSV header or an "A -> B" answer.
_FORBIDDEN_IN_NAMES = (",", "\n", "->", "→", ";")


@dataclass(frozen=True, eq=False)
class Problem:
    """A true DAG over variable ids, data with one column per id, and a readable name per id.

    Categorical columns keep their states in the network's order, so `numeric()` codes them 0, 1, ...
    """

    name: str
    graph: nx.DiGraph  # ground truth over variable ids
    data: pd.DataFrame  # samples; one column per node of `graph`
    names: dict[str, str]  # variable id -> readable name shown to a model
    source: str = ""  # where the graph and data came from
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        nodes, columns = set(self.graph.nodes), set(self.data.columns)
        if nodes != columns:
            raise ValueError(f"problem {self.name!r}: graph nodes and data columns differ; only in the graph: "
                             f"{sorted(nodes - columns)}, only in the data: {sorted(columns - nodes)}")
        if not nx.is_directed_acyclic_graph(self.graph):
            raise ValueError(f"problem {self.name!r}: the graph has a cycle: {nx.find_cycle(self.graph)}")
        missing = sorted(nodes - set(self.names))
        if missing:
            raise ValueError(f"problem {self.name!r}: no readable name for {missing}")
        _check_names(self.name, [self.names[v] for v in self.variables])

    @property
    def variables(self) -> tuple[str, ...]:
        """Variable ids in the data's column order."""
        return tuple(self.data.columns)

    @property
    def edges(self) -> tuple[tuple[str, str], ...]:
        return tuple(self.graph.edges)

    def numeric(self) -> pd.DataFrame:
        """The data as floats: numeric columns unchanged, categorical ones as their state index."""
        return pd.DataFrame({v: self.data[v].cat.codes.astype(float) if isinstance(self.data[v].dtype,
                             pd.CategoricalDtype) else self.data[v].astype(float) for v in self.variables})

    def __repr__(self) -> str:
        return (f"Problem({self.name!r}, {self.graph.number_of_nodes()} variables, "
                f"{self.graph.number_of_edges()} edges, {len(self.data)} rows)")


def _check_names(problem: str, names: list[str]) -> None:
    for name in names:
        bad = [c for c in _FORBIDDEN_IN_NAMES if c in name]
        if bad or not name.strip():
            raise ValueError(f"problem {problem!r}: variable name {name!r} is empty or contains {bad}; "
                             f"names may not contain any of {list(_FORBIDDEN_IN_NAMES)}")
    folded = [n.strip().lower() for n in names]
    clashes = sorted({n for n in folded if folded.count(n) > 1})
    if clashes:
        raise ValueError(f"problem {problem!r}: names must differ ignoring case; repeated: {clashes}")


def readable(identifier: str) -> str:
    """A readable name from an identifier: "HypDistrib" -> "hyp distrib", "CO2Report" -> "CO2 report".

    All-capital words of at most four letters are kept as acronyms ("CVP", "SAO2"); others are lower-cased.
    """
    words = re.findall(r"[A-Z0-9]+(?![a-z])|[A-Z]?[a-z]+[0-9]*|[0-9]+", identifier.replace("_", " "))
    def acronym(w: str) -> bool:
        return w.isupper() and sum(c.isalpha() for c in w) <= 4

    return " ".join(w if acronym(w) else w.lower() for w in words) or identifier


@functools.lru_cache(maxsize=None)
def _network(name: str):
    """pgmpy's bundled network `name` (read once per process: BIFReader takes 1-2 s)."""
    import pgmpy
    from pgmpy.readwrite import BIFReader

    if name not in NETWORKS:
        raise ValueError(f"unknown network {name!r}; valid options: {list(NETWORKS)}")
    path = Path(pgmpy.__file__).parent / "utils" / "example_models" / f"{name}.bif.gz"
    with gzip.open(path, "rt") as f:
        return BIFReader(string=f.read()).get_model()


def load(name: str, n_samples: int = 1000, seed: int = 0) -> Problem:
    """Network `name` (one of `NETWORKS`) with `n_samples` rows forward-sampled from it under `seed`."""
    network = _network(name)
    log = logging.getLogger("pgmpy")
    level = log.level
    log.setLevel(logging.ERROR)  # pgmpy warns for every CPD column that sums to 1 only within 1e-16
    try:
        sampled = network.simulate(n_samples=n_samples, seed=seed, show_progress=False)
    finally:
        log.setLevel(level)
    nodes = list(network.nodes())
    # simulate() sorts categories alphabetically; the network's own state order makes numeric() meaningful.
    data = pd.DataFrame({v: pd.Categorical(sampled[v].astype(str),
                                           categories=network.get_cpds(v).state_names[v]) for v in nodes})
    names = _NAMES.get(name) or {v: readable(v) for v in nodes}
    return Problem(name, nx.DiGraph(network.edges()), data, dict(names),
                   source=f"pgmpy 1.1.2 bundled {name}.bif.gz", meta={"n_samples": n_samples, "seed": seed})


def from_csv(path: str | Path, edges: Iterable[tuple[str, str]] | str | Path,
             names: dict[str, str] | None = None, name: str | None = None) -> Problem:
    """A problem from a CSV file (a header row of variable ids) and the true edges.

    `edges` is a list of (cause, effect) ids or a text file with one "cause -> effect" per line (parsed by
    `scoring.parse_edges` against the column ids). `names` maps ids to readable names (default: the ids).
    Text columns become categorical with their values sorted.
    """
    from mechattr.causal.scoring import parse_edges

    path = Path(path)
    data = pd.read_csv(path)
    data.columns = [str(c).strip() for c in data.columns]
    for column in data.columns:
        if not pd.api.types.is_numeric_dtype(data[column]):
            data[column] = pd.Categorical(data[column].astype(str))
    ids = {v: v for v in data.columns}
    pairs = parse_edges(Path(edges).read_text(), ids) if isinstance(edges, (str, Path)) else list(edges)
    unknown = sorted({v for pair in pairs for v in pair} - set(data.columns))
    if unknown:
        raise ValueError(f"edges name variables {unknown} that are not columns of {path}; columns: "
                         f"{list(data.columns)}")
    graph = nx.DiGraph()
    graph.add_nodes_from(data.columns)
    graph.add_edges_from(pairs)
    return Problem(name or path.stem, graph, data, dict(names or ids), source=str(path))
