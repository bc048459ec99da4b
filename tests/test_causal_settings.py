import re

import networkx as nx
import numpy as np
import pytest

from mechattr import causal
from mechattr.causal.prompts import INSTRUCTION, RowBudgetError, context, fit_rows
from mechattr.causal.settings import made_up_words, reversal


@pytest.fixture(scope="module")
def asia():
    return causal.load("asia", n_samples=200, seed=0)


@pytest.fixture(scope="module")
def conds(asia):
    return causal.conditions(asia, seed=(0, 0))


def _rows(prompt: str) -> tuple[str, list[str]]:
    """The CSV header and data lines of a prompt."""
    lines = prompt.split("(CSV):\n")[1].strip().split("\n")
    return lines[0], lines[1:]


def test_omit_knowledge_keeps_the_data_bit_for_bit(asia, conds):
    raw, blind = context(conds["S1"], 40), context(conds["S3"], 40)
    (head_raw, rows_raw), (head_blind, rows_blind) = _rows(raw), _rows(blind)
    assert rows_raw == rows_blind and len(rows_raw) == 40
    assert head_raw != head_blind
    assert conds["S1"].data.to_numpy().tolist() == conds["S3"].data.to_numpy().tolist()


@pytest.mark.parametrize("key", ["S3", "S6"])
def test_made_up_names_replace_every_real_name(asia, conds, key):
    prompt = context(conds[key], 40).lower()
    for name in asia.names.values():
        assert name.lower() not in prompt, name
    for word in conds[key].labels.values():
        assert re.fullmatch(r"[a-z]{6}", word) and word in prompt


def test_omitted_data_leaves_only_names(asia, conds):
    for key in ("S2", "S6"):
        assert conds[key].data is None
        assert "CSV" not in context(conds[key], 40)
    assert "smoking" in context(conds["S2"], 40)


def test_reversed_setting_relabels_data_and_truth(asia, conds):
    pi = reversal(asia.graph)
    order = list(nx.lexicographical_topological_sort(asia.graph))
    assert [pi[v] for v in order] == order[::-1]
    s1, s4 = conds["S1"], conds["S4"]
    for v in asia.variables:
        # The column shown under v's name holds the data of pi(v).
        assert list(s4.data[asia.names[v]]) == list(s1.data[asia.names[pi[v]]])
    assert set(s4.truth.edges) == {(pi[u], pi[v]) for u, v in asia.edges}
    # Every relabelled edge points backwards along the original topological order.
    assert all(order.index(u) > order.index(v) for u, v in s4.truth.edges)
    assert set(conds["S5"].truth.edges) == set(asia.edges)
    assert conds["S5"].setting.prompt_of == "S4" and context(conds["S5"], 9) == context(s4, 9)


def test_trials_are_seeded(asia, conds):
    again = causal.conditions(asia, seed=(0, 0))
    other = causal.conditions(asia, seed=(0, 1))
    assert context(again["S3"], 30) == context(conds["S3"], 30)
    assert conds["S1"].order != other["S1"].order
    assert not conds["S1"].data.equals(other["S1"].data)
    assert conds["S3"].labels != other["S3"].labels


def test_made_up_words_are_distinct_and_avoid_names():
    rng = np.random.default_rng(0)
    words = made_up_words(50, rng)
    assert len(set(words)) == 50
    avoided = made_up_words(5, np.random.default_rng(0), avoid={words[0].upper()})
    assert words[0] not in avoided


def test_fit_rows_takes_the_most_rows_that_fit(asia, conds):
    count = lambda text: len(text.split())  # noqa: E731
    prompted = [c for c in conds.values() if c.setting.prompt_of is None]
    budget = 150
    n = fit_rows(prompted, count, budget, suffix=lambda c: INSTRUCTION)
    with_data = [c for c in prompted if c.data is not None]
    assert 0 < n < 200
    assert all(count(context(c, n) + INSTRUCTION) <= budget for c in with_data)
    assert any(count(context(c, n + 1) + INSTRUCTION) > budget for c in with_data)
    with pytest.raises(RowBudgetError, match="budget is 5"):
        fit_rows(prompted, count, 5, suffix=lambda c: INSTRUCTION)
