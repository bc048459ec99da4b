import warnings

import pytest
import torch

from mechattr import causal
from mechattr.causal import scoring
from mechattr.causal.prompts import context, question
from mechattr.forward import FastPathWarning

ASIA = {"asia": "visit to Asia", "tub": "tuberculosis", "smoke": "smoking", "lung": "lung cancer",
        "bronc": "bronchitis", "either": "tuberculosis or lung cancer", "xray": "positive X-ray",
        "dysp": "dyspnoea"}


def test_parse_edges_on_messy_text():
    text = """Sure! Here are the causal pairs:
    1. Smoking -> Lung cancer
    2) **tuberculosis** → tuberculosis or lung cancer; bronchitis causes dyspnoea.
    - visit to asia --> tuberculosis -> TUBERCULOSIS OR LUNG CANCER
    Lung  Cancer => tuberculosis or lung cancer, unknown thing -> smoking, smoking -> smoking
    smoking -> bronchitis and lung cancer -> dyspnoea
    I believe positive X-ray depends on dyspnoea (no arrow: ignored).
    "positive x-ray" -> nothing we know
    """
    assert causal.parse_edges(text, ASIA) == [
        ("smoke", "lung"), ("tub", "either"), ("bronc", "dysp"), ("asia", "tub"), ("lung", "either"),
        ("smoke", "bronc"), ("lung", "dysp")]


def test_parse_edges_matches_short_forms_of_parenthesised_names():
    labels = {"PIP3": "PIP3 (phosphatidylinositol trisphosphate)", "Akt": "Akt (protein kinase B)",
              "PIP2": "PIP2 (phosphatidylinositol bisphosphate)"}
    text = "pip3 -> Akt (protein kinase B)\nPIP3 (phosphatidylinositol trisphosphate) -> PIP2."
    assert causal.parse_edges(text, labels) == [("PIP3", "Akt"), ("PIP3", "PIP2")]
    assert causal.parse_edges("PIP -> Akt, Akt -> Akt", labels) == []


def test_select_top_k_and_threshold():
    pairs = [("a", "b"), ("b", "a"), ("a", "c"), ("c", "a")]
    scores = torch.tensor([0.5, 2.0, 0.5, -1.0])
    assert list(causal.predicted_graph(pairs, scores, k=2).edges) == [("b", "a"), ("a", "b")]  # tie kept in pair order
    assert set(causal.predicted_graph(pairs, scores, threshold=0.0).edges) == {("a", "b"), ("b", "a"), ("a", "c")}
    with pytest.raises(ValueError, match="exactly one"):
        causal.predicted_graph(pairs, scores)


@pytest.mark.slow
def test_shared_prefix_scores_match_full_forwards(smollm2):
    """Scores reusing the context's keys and values equal log-odds from whole-prompt runs, with stems and
    endings packed in rows or each question in its own row, and a short attribution run on SmolLM2 keeps
    its invariants."""
    problem = causal.load("cancer", n_samples=100)
    cond = causal.conditions(problem, seed=0)["S1"]
    ctx = context(cond, 6)
    names = ["smoking", "lung cancer", "dyspnoea", "X-ray"]  # questions of several token lengths
    asked = [question(a, b) for a in names for b in names if a != b]
    yes, no = smollm2.to_tokens(" Yes", prepend_bos=False)[0, 0], smollm2.to_tokens(" No", prepend_bos=False)[0, 0]
    with torch.no_grad():
        expected = []
        for stem, ending in asked:
            tokens = torch.cat([smollm2.to_tokens(ctx), smollm2.to_tokens(stem, prepend_bos=False),
                                smollm2.to_tokens(ending, prepend_bos=False)], 1)
            logits = smollm2(tokens)[0, -1]
            expected.append(float(logits[yes] - logits[no]))
    scoring._PACKING.pop(smollm2, None)  # prove packing afresh: it must hold on SmolLM2
    with warnings.catch_warnings():
        warnings.simplefilter("error", FastPathWarning)
        for batch_size in (1, 5):  # one question per row; then each stem with its three endings in one row
            scores = causal.score_questions(smollm2, ctx, asked, batch_size=batch_size)
            assert scores.tolist() == pytest.approx(expected, abs=1e-3)
    assert scoring._PACKING[smollm2] is None
    assert torch.allclose(causal.score_questions(smollm2, ctx, asked, batch_size=8), scores, atol=1e-4)
    assert causal.score_questions(smollm2, ctx, []).shape == (0,)
    with pytest.raises(ValueError, match="no questions given"):
        scoring.question_logits(smollm2, smollm2.to_tokens(ctx), [])
    scoring._PACKING[smollm2] = "refused for this test"  # each question in its own row
    try:
        assert causal.score_questions(smollm2, ctx, asked, batch_size=5).tolist() == pytest.approx(expected, abs=1e-3)
    finally:
        scoring._PACKING[smollm2] = None

    keep = ["Smoker", "Cancer", "Dyspnoea"]  # 6 ordered pairs keep the run short
    small = causal.Problem("small", problem.graph.subgraph(keep).copy(), problem.data[keep],
                           {v: problem.names[v] for v in keep})
    table = causal.attribution_table(smollm2, small, trials=1, max_tokens=80)
    pairs = table.pairs.set_index(["setting", "cause", "effect"]).score
    assert pairs["S4"].equals(pairs["S5"])  # S5 scores S4's prompt against another truth
    assert not pairs["S1"].equals(pairs["S3"])  # the names changed the scores
    top = table.trials.set_index("setting")
    assert (top.n_pred == 2).all() and ((top.TDR + top.FDR - 1).abs() < 1e-9).all()  # top-|E| predictions
