"""The six settings of the causal attribution model: do-operators applied to the prompt.

Each setting decides which names the variables are shown under, which data (if any) the prompt holds,
and which graph the answer is scored against:

| key | setting                  | names     | data                             | scored against        |
| S1  | raw                      | real      | as sampled                       | true graph            |
| S2  | omit data                | real      | none                             | true graph            |
| S3  | omit knowledge           | made-up   | as sampled (bit-for-bit)         | true graph            |
| S4  | reversed                 | real      | relabelled in reversed topo order | relabelled graph      |
| S5  | reversed, original truth | real      | S4's prompt                      | true graph            |
| S6  | random                   | made-up   | none                             | true graph            |

In S4 the column shown under the name of variable π(v) holds the data of v, where π maps the i-th
variable of a topological order to the i-th from the end; the data then say π(u) -> π(v) for every true
edge u -> v, against what the names suggest. Predictions are always pairs of variable ids.
"""

from dataclasses import dataclass

import networkx as nx
import numpy as np
import pandas as pd

from mechattr.causal.problems import Problem

__all__ = ["Setting", "SETTINGS", "Condition", "conditions", "reversal", "made_up_words"]


@dataclass(frozen=True)
class Setting:
    """One do-operator on the prompt."""

    key: str  # "S1" .. "S6"
    label: str  # short description for tables
    made_up_names: bool  # variables shown under made-up words instead of their real names
    data: str | None  # None: no data in the prompt; "as_is"; or "reversed" (relabelled, see module doc)
    reversed_truth: bool  # scored against the graph relabelled like the data
    prompt_of: str | None = None  # reuse another setting's prompt (and its answer) instead of a new one


SETTINGS = {s.key: s for s in (
    Setting("S1", "raw", made_up_names=False, data="as_is", reversed_truth=False),
    Setting("S2", "omit data", made_up_names=False, data=None, reversed_truth=False),
    Setting("S3", "omit knowledge", made_up_names=True, data="as_is", reversed_truth=False),
    Setting("S4", "reversed", made_up_names=False, data="reversed", reversed_truth=True),
    Setting("S5", "reversed, original truth", made_up_names=False, data="reversed", reversed_truth=False,
            prompt_of="S4"),
    Setting("S6", "random", made_up_names=True, data=None, reversed_truth=False),
)}


@dataclass(frozen=True, eq=False)
class Condition:
    """A setting instantiated for one trial: what the prompt shows and what the answer is scored against."""

    setting: Setting
    labels: dict[str, str]  # variable id -> name shown in the prompt
    order: tuple[str, ...]  # variable ids in the order the prompt lists them
    data: pd.DataFrame | None  # rows to show, columns are labels in `order`; None when data are omitted
    truth: nx.DiGraph  # the graph over variable ids the answer is scored against

    @property
    def key(self) -> str:
        return self.setting.key

    @property
    def shown(self) -> list[str]:
        """The labels in prompt order."""
        return [self.labels[v] for v in self.order]


_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"


def made_up_words(n: int, rng: np.random.Generator, avoid: set[str] = frozenset(),
                  syllables: int | tuple[int, int] = 3, coda: float = 0.0) -> list[str]:
    """`n` distinct pronounceable non-words of consonant-vowel syllables ("kivaro"), none in `avoid` (in
    any case). `syllables` is a count, or an inclusive range drawn per word; `coda` is the chance that a
    syllable ends in a consonant too."""
    words: list[str] = []
    avoid = {a.lower() for a in avoid}
    while len(words) < n:
        count = syllables if isinstance(syllables, int) else int(rng.integers(syllables[0], syllables[1] + 1))
        word = ""
        for _ in range(count):
            word += rng.choice(list(_CONSONANTS)) + rng.choice(list(_VOWELS))
            if coda and rng.random() < coda:  # no draw at all when codas are off
                word += rng.choice(list(_CONSONANTS))
        if word not in avoid and word not in words:
            words.append(word)
    return words


def reversal(graph: nx.DiGraph) -> dict[str, str]:
    """π: the i-th variable of the (lexicographic) topological order -> the i-th from the end."""
    order = list(nx.lexicographical_topological_sort(graph))
    return dict(zip(order, reversed(order)))


def conditions(problem: Problem, seed: int | tuple[int, ...]) -> dict[str, Condition]:
    """The six settings for one trial. `seed` draws the column order, the row subsample (a random
    permutation; the prompt shows a prefix of it) and the made-up words; S1, S3 and S4 share all three."""
    rng = np.random.default_rng(seed)
    order = tuple(problem.variables[i] for i in rng.permutation(len(problem.variables)))
    rows = problem.data.iloc[rng.permutation(len(problem.data))].reset_index(drop=True)
    real = dict(problem.names)
    fake = dict(zip(problem.variables, made_up_words(len(order), rng, avoid=set(real.values()))))
    pi = reversal(problem.graph)
    data = {"as_is": {v: rows[v] for v in order},
            # The column labelled with v's name shows the data of π(v) (π is its own inverse).
            "reversed": {v: rows[pi[v]] for v in order}}
    truths = {False: problem.graph, True: nx.relabel_nodes(problem.graph, pi)}
    out = {}
    for key, s in SETTINGS.items():
        labels = fake if s.made_up_names else real
        frame = None if s.data is None else pd.DataFrame({labels[v]: data[s.data][v].to_numpy() for v in order})
        out[key] = Condition(s, labels, order, frame, truths[s.reversed_truth])
    return out
