import networkx as nx
import pandas as pd
import pytest

from mechattr import causal
from mechattr.causal.problems import readable

ASIA_EDGES = {("asia", "tub"), ("tub", "either"), ("smoke", "lung"), ("smoke", "bronc"), ("lung", "either"),
              ("either", "xray"), ("either", "dysp"), ("bronc", "dysp")}


@pytest.fixture(scope="module")
def asia():
    return causal.load("asia", n_samples=300, seed=0)


def test_asia_graph_names_and_data(asia):
    assert set(asia.edges) == ASIA_EDGES
    assert asia.names["smoke"] == "smoking" and asia.names["either"] == "tuberculosis or lung cancer"
    assert asia.data.shape == (300, 8) and set(asia.data.columns) == set(asia.graph.nodes)
    # States keep the network's order, so numeric() codes "yes" as 0 and "no" as 1.
    assert list(asia.data["smoke"].cat.categories) == ["yes", "no"]
    codes = asia.numeric()["smoke"]
    assert ((codes == 0) == (asia.data["smoke"] == "yes")).all() and set(codes.unique()) <= {0.0, 1.0}


def test_sampling_is_seeded(asia):
    again = causal.load("asia", n_samples=300, seed=0)
    other = causal.load("asia", n_samples=300, seed=1)
    assert asia.data.equals(again.data)
    assert not asia.data.equals(other.data)


def test_sachs_pins_pgmpy_edges():
    sachs = causal.load("sachs", n_samples=20)
    assert sachs.graph.number_of_edges() == 17 and sachs.graph.number_of_nodes() == 11
    assert ("Plcg", "PIP3") in sachs.edges and ("Raf", "Mek") in sachs.edges and ("Mek", "Erk") in sachs.edges
    assert sachs.names["PIP3"] == "PIP3 (phosphatidylinositol trisphosphate)"
    assert sachs.names["Plcg"] == "PLC-gamma"


@pytest.mark.parametrize("name,nodes,edges", [("cancer", 5, 4), ("earthquake", 5, 4), ("survey", 6, 6),
                                              ("child", 20, 25), ("insurance", 27, 52), ("alarm", 37, 46)])
def test_every_network_loads_with_distinct_names(name, nodes, edges):
    problem = causal.load(name, n_samples=5)
    assert (problem.graph.number_of_nodes(), problem.graph.number_of_edges()) == (nodes, edges)
    shown = [problem.names[v].lower() for v in problem.variables]
    assert len(set(shown)) == nodes


def test_readable_splits_identifiers():
    assert readable("HypDistrib") == "hyp distrib"
    assert readable("CO2Report") == "CO2 report"
    assert readable("SAO2") == "SAO2" and readable("HYPOVOLEMIA") == "hypovolemia"
    assert readable("birth_weight") == "birth weight"


def test_from_csv_with_edge_file(tmp_path):
    pd.DataFrame({"rain": [1.0, 2.0, 3.0], "wet": ["y", "n", "y"], "slip": [0, 1, 1]}).to_csv(
        tmp_path / "d.csv", index=False)
    (tmp_path / "edges.txt").write_text("rain -> wet\n* wet → slip.\n")
    names = {"rain": "rainfall", "wet": "wet road", "slip": "slipping"}
    problem = causal.from_csv(tmp_path / "d.csv", tmp_path / "edges.txt", names=names)
    assert set(problem.edges) == {("rain", "wet"), ("wet", "slip")}
    assert problem.name == "d" and problem.names["wet"] == "wet road"
    assert list(problem.numeric()["wet"]) == [1.0, 0.0, 1.0]  # text states sorted: n=0, y=1
    with pytest.raises(ValueError, match="not columns"):
        causal.from_csv(tmp_path / "d.csv", [("rain", "snow")])


def test_invalid_problems_are_refused():
    with pytest.raises(ValueError, match="valid options"):
        causal.load("asai")
    data = pd.DataFrame({"a": [0], "b": [1]})
    with pytest.raises(ValueError, match="cycle"):
        causal.Problem("p", nx.DiGraph([("a", "b"), ("b", "a")]), data, {"a": "x", "b": "y"})
    with pytest.raises(ValueError, match="contains"):
        causal.Problem("p", nx.DiGraph([("a", "b")]), data, {"a": "x, y", "b": "z"})
    with pytest.raises(ValueError, match="ignoring case"):
        causal.Problem("p", nx.DiGraph([("a", "b")]), data, {"a": "Rain", "b": "rain"})
