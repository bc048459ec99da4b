import numpy as np
import pandas as pd
import pytest

from mechattr import causal
from mechattr.causal.pairwise import PAIRWISE_METHODS, lingam_direction, overwrite_cause


def test_lingam_finds_a_known_direction():
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, 800)
    frame = pd.DataFrame({"x": x, "y": 2 * x + rng.chisquare(3, 800)})
    assert lingam_direction(frame) == ("x", "y")
    assert lingam_direction(frame[["y", "x"]]) == ("x", "y")


def test_overwrite_makes_the_data_say_b_causes_a():
    rng = np.random.default_rng(1)
    data = pd.DataFrame({"a": rng.normal(size=4000), "b": rng.integers(0, 3, 4000).astype(float)})
    out = overwrite_cause(data, "a", "b", coefficient=2.0, df=3.0, rng=rng)
    noise = out["a"] - 2.0 * out["b"]
    assert list(out.columns) == ["b", "a"] and out["b"].equals(data["b"])
    assert (noise > 0).all() and noise.mean() == pytest.approx(3.0, abs=0.15)  # chi-square(3) has mean 3
    assert lingam_direction(out) == ("b", "a")


@pytest.fixture(scope="module")
def sachs():
    return causal.load("sachs", n_samples=600)


def knowledge_of(problem: causal.Problem):
    """A model that answers with the true edge's direction between the two variables shown, whatever the
    data say."""
    ids = {name: v for v, name in problem.names.items()}

    def predict(prompt: str) -> str:
        a, b = (ids[n] for n in prompt.split("measured: ")[1].split(".\n")[0].split(", "))
        cause, effect = (a, b) if (a, b) in problem.edges else (b, a)
        return f"{problem.names[cause]} -> {problem.names[effect]}"
    return predict


def lingam_reader(prompt: str) -> str:
    """Reads the shown rows and answers with ICA-LiNGAM's direction."""
    lines = prompt.split("(CSV):\n")[1].split("\n\n")[0].strip().split("\n")
    header = lines[0].split(",")
    rows = [r.split(",") for r in lines[1:] if r.count(",") == 1 and r[0].isdigit()]
    cause, effect = lingam_direction(pd.DataFrame(rows, columns=header).astype(float))
    return f"{cause} -> {effect}"


def test_knowledge_loses_and_the_data_win(sachs):
    told = causal.pairwise_discovery(knowledge_of(sachs), sachs, coefficient=1.0, df=3, trials=6, seed=0)
    assert told.trials[PAIRWISE_METHODS[0]].all()  # ICA-LiNGAM on all rows
    assert not told.trials[PAIRWISE_METHODS[1]].any() and not told.trials[PAIRWISE_METHODS[2]].any()
    read = causal.pairwise_discovery(lingam_reader, sachs, coefficient=1.0, df=3, trials=6, seed=0,
                                     max_tokens=2000)
    assert read.accuracy(PAIRWISE_METHODS[2]).mean >= 5 / 6
    assert (read.trials[["cause", "effect"]].to_numpy() == told.trials[["cause", "effect"]].to_numpy()).all()
    reversed_edges = {(b, a) for a, b in sachs.edges}
    assert all(tuple(e) in reversed_edges for e in told.trials[["cause", "effect"]].to_numpy())
    frame = read.to_dataframe()
    assert list(frame.method) == list(PAIRWISE_METHODS) and "| ICA-LiNGAM | 1.000 |" in read.to_markdown()
