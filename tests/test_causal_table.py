"""The attribution table on text models whose answers come from the names only or from the data only."""

import itertools

import networkx as nx
import numpy as np
import pandas as pd
import pytest

from mechattr import causal

CHAIN = {"x0": "rainfall", "x1": "river level", "x2": "flooding", "x3": "insurance claims"}


@pytest.fixture(scope="module")
def chain():
    """x0 -> x1 -> x2 -> x3, each child exactly its parent plus one: the data alone give the graph away."""
    x0 = np.random.default_rng(0).integers(0, 50, size=80)
    data = pd.DataFrame({f"x{i}": x0 + i for i in range(4)})
    return causal.Problem("chain", nx.DiGraph([("x0", "x1"), ("x1", "x2"), ("x2", "x3")]), data, CHAIN)


def _listed(prompt: str) -> list[str]:
    return prompt.split("measured: ")[1].split(".\n")[0].split(", ")


def names_only(prompt: str) -> str:
    """Claims every true edge whose two real names appear in the prompt; never reads the data."""
    listed = _listed(prompt)
    return "\n".join(f"{CHAIN[a]} -> {CHAIN[b]}" for a, b in [("x0", "x1"), ("x1", "x2"), ("x2", "x3")]
                     if CHAIN[a] in listed and CHAIN[b] in listed)


def data_only(prompt: str) -> str:
    """Claims u -> v wherever column v is column u plus one in every shown row; ignores what names mean."""
    if "(CSV):\n" not in prompt:
        return "I cannot tell without data."
    lines = prompt.split("(CSV):\n")[1].split("\nList")[0].strip().split("\n")
    table = pd.DataFrame([r.split(",") for r in lines[1:]], columns=lines[0].split(",")).astype(int)
    return "; ".join(f"{u} -> {v}" for u, v in itertools.permutations(table.columns, 2)
                     if (table[v] == table[u] + 1).all())


def _tdr(table: causal.AttributionTable) -> dict[str, float]:
    return {k: table.summary(k).mean for k in causal.SETTINGS}


def test_names_only_model_is_all_knowledge(chain):
    table = causal.attribution_table(names_only, chain, trials=3, seed=0)
    assert _tdr(table) == {"S1": 1.0, "S2": 1.0, "S3": 0.0, "S4": 0.0, "S5": 1.0, "S6": 0.0}
    got = {name: table.attribution(name).mean for name in causal.ATTRIBUTIONS}
    assert got == {"CAK": 1.0, "CAD": 0.0, "MAK": 1.0, "MAD": 0.0}


def test_data_only_model_is_all_data(chain):
    table = causal.attribution_table(data_only, chain, trials=3, seed=0, max_tokens=300)
    assert _tdr(table) == {"S1": 1.0, "S2": 0.0, "S3": 1.0, "S4": 1.0, "S5": 0.0, "S6": 0.0}
    got = {name: table.attribution(name).mean for name in causal.ATTRIBUTIONS}
    assert got == {"CAK": 0.0, "CAD": 1.0, "MAK": 0.0, "MAD": 1.0}
    assert 0 < table.meta["rows"] < 80  # the 300-token budget cut the rows
    assert table.summary("S1", "SHD").mean == 0.0 and table.summary("S5", "SHD").mean == 3.0


def test_table_outputs(chain):
    table = causal.attribution_table(names_only, chain, trials=2, seed=1)
    frame = table.to_dataframe()
    assert list(frame.columns) == ["row", "label", "metric", "mean", "sd", "ci_low", "ci_high", "n", "level"]
    assert set(frame.row) == set(causal.SETTINGS) | set(causal.ATTRIBUTIONS)
    assert frame.loc[(frame.row == "S1") & (frame.metric == "TDR"), "mean"].item() == 1.0
    text = table.to_markdown()
    assert "| S3 omit knowledge |" in text and "| MAK | TDR(S2) - TDR(S6) | 1.000 |" in text
    assert len(table.trials) == 2 * 6 and table.pairs is None
