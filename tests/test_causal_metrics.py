import math

import networkx as nx
import pandas as pd
import pytest
import torch

from mechattr import causal
from mechattr.causal.table import AttributionTable

TRUTH = nx.DiGraph([("a", "b"), ("b", "c"), ("c", "d")])


def test_found_reversed_extra_and_missing_edges():
    # a->b found; c->b is b->c reversed; a->d is extra; c->d is missing.
    pred = [("a", "b"), ("c", "b"), ("a", "d")]
    assert causal.tdr(pred, TRUTH) == pytest.approx(1 / 3)
    assert causal.fdr(pred, TRUTH) == pytest.approx(2 / 3)
    assert causal.f1(pred, TRUTH) == pytest.approx(1 / 3)  # 2 * (1/3) * (1/3) / (2/3)
    assert causal.shd(pred, TRUTH) == 3  # reversed, extra and missing count one each


def test_both_directions_and_empty_predictions():
    both = [("a", "b"), ("b", "a"), ("b", "c"), ("c", "d")]
    assert causal.tdr(both, TRUTH) == 1.0 and causal.fdr(both, TRUTH) == 0.25
    assert causal.shd(both, TRUTH) == 1
    assert causal.f1(both, TRUTH) == pytest.approx(2 * 0.75 / 1.75)
    empty = (causal.tdr([], TRUTH), causal.fdr([], TRUTH), causal.f1([], TRUTH), causal.shd([], TRUTH))
    assert empty == (0, 0, 0, 3)
    assert causal.shd(TRUTH, TRUTH) == 0 and causal.f1(TRUTH, TRUTH) == 1.0
    metrics = causal.graph_metrics(nx.DiGraph([("d", "c")]), TRUTH)
    assert metrics == {"TDR": 0.0, "FDR": 1.0, "F1": 0.0, "SHD": 3.0, "n_pred": 1.0}


def test_auroc_by_hand():
    scores = torch.tensor([0.9, 0.8, 0.7, 0.1])
    labels = torch.tensor([True, False, True, False])
    assert causal.auroc(scores, labels) == pytest.approx(3 / 4)  # 0.7 < 0.8 is the one lost comparison
    assert causal.auroc(torch.tensor([0.5, 0.5]), torch.tensor([True, False])) == 0.5
    assert causal.auroc(-scores, labels) == pytest.approx(1 / 4)
    assert math.isnan(causal.auroc(scores, torch.ones(4, dtype=torch.bool)))


def test_summary_mean_sd_and_t_interval():
    s = causal.summarize([1.0, 2.0, 3.0])
    half = 4.302652729911275 / math.sqrt(3)  # t_{0.975, 2} * sd / sqrt(n), sd = 1
    assert (s.mean, s.sd, s.n) == (2.0, 1.0, 3)
    assert s.ci_low == pytest.approx(2 - half) and s.ci_high == pytest.approx(2 + half)
    one = causal.summarize([0.4])
    assert one.mean == 0.4 and math.isnan(one.sd) and math.isnan(one.ci_low)


def test_attributions_are_paired_tdr_differences():
    tdr = {"S1": [0.6, 0.5, 0.7], "S2": [0.4, 0.5, 0.3], "S3": [0.2, 0.1, 0.3], "S4": [0.0] * 3, "S5": [0.0] * 3,
           "S6": [0.1, 0.1, 0.0]}
    rows = [{"trial": t, "setting": k, "TDR": v[t], "FDR": 0.0, "F1": 0.0, "SHD": 0.0, "AUROC": float("nan")}
            for k, v in tdr.items() for t in range(3)]
    table = AttributionTable("toy", pd.DataFrame(rows), None, {"trials": 3})
    expected = {"CAK": [0.4, 0.4, 0.4], "CAD": [0.2, 0.0, 0.4], "MAK": [0.3, 0.4, 0.3], "MAD": [0.1, 0.0, 0.3]}
    for name, diffs in expected.items():
        got, want = table.attribution(name), causal.summarize(diffs)
        assert got.mean == pytest.approx(want.mean) and got.sd == pytest.approx(want.sd, abs=1e-12)
        assert got.ci_high == pytest.approx(want.ci_high)
    cad = table.attribution("CAD")
    assert cad.mean == pytest.approx(0.2) and cad.sd == pytest.approx(0.2)
    frame = table.to_dataframe()
    assert frame.loc[frame.row == "MAK", "mean"].item() == pytest.approx(1 / 3)
    assert "| CAK | TDR(S1) - TDR(S3) | 0.400 |" in table.to_markdown()
    with pytest.raises(KeyError, match="valid"):
        table.attribution("CKA")
