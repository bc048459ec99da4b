"""The architecture conformance matrix: every family in `mechattr.families`, built tiny and offline, loaded
with `load_model(folder)`, checked cell by cell against independent references. The README's support
matrix is `families.support_table()`, and each claim in it is asserted here (a claimed "no" must still
fail, so the table is updated when a family starts to work)."""

import re
import warnings
from pathlib import Path

import pytest
import torch

import mechattr
from mechattr import families
from mechattr.causal import scoring
from mechattr.edges import attribute_edges, patch_edges
from mechattr.finetune.evaluation import logits
from mechattr.finetune.prefix import Prefix
from mechattr.forward import FastPathWarning, Forward, fast_path_verdict
from mechattr.graph import Edge
from mechattr.interventions import Denoise, Noise
from mechattr.relevance import RelevanceError
from mechattr.sites import KINDS, Site, available_kinds
import tiny_families as tf
from tests.bridges import block_inputs, templated_task

ATOL = 1e-5
NAMES = [name for name, family in families.FAMILIES.items() if family.boots]


@pytest.fixture(scope="session")
def family_root(tmp_path_factory):
    return tmp_path_factory.mktemp("families")


@pytest.fixture(scope="module", params=NAMES)
def family(request, family_root):
    """(name, table entry, model) for one family, built once per session."""
    name = request.param
    return name, families.FAMILIES[name], mechattr.load_model(str(families.build(name, family_root / name)))


@pytest.fixture(scope="module")
def task():
    return tf.task()


def _max_error(a, b) -> float:
    return float((a - b).abs().max())


def test_fast_path_is_proved_on_every_family(family, task):
    name, entry, model = family
    forward = Forward(model, task.corrupt)
    forward.cache()
    assert fast_path_verdict(model) is None and forward.resumable == entry.fast_path, name
    assert forward.reuses_prefix == entry.prefix, name


def test_unavailable_kinds_are_the_listed_ones_and_raise_clear_errors(family, task):
    name, entry, model = family
    assert set(KINDS) - set(available_kinds(model)) == set(entry.missing)
    for kind in entry.missing:
        site = Site(kind, 1, pos=2) if KINDS[kind].heads is None else Site(kind, 1, head=0)
        with pytest.raises(ValueError, match=rf"{kind}.*{re.escape(str(model.cfg.model_name))}.*valid kinds.*resid_pre"):
            mechattr.patch(model, task, [site])


def _all_sites(model) -> list[Site]:
    return [site for kind in tf.kinds(model) for site in tf.sites(model, kind)]


def _by_kind(sites, errors) -> dict[str, float]:
    out: dict[str, float] = {}
    for site, error in zip(sites, errors.tolist()):
        out[site.kind] = max(out.get(site.kind, 0.0), error)
    return out


@pytest.mark.parametrize("intervention", [Denoise(), Noise()], ids=["denoise", "noise"])
def test_patch_equals_one_hook_per_forward(family, task, intervention):
    name, _, model = family
    sites = _all_sites(model)
    effects = mechattr.patch(model, task, sites, intervention)
    reference = tf.patch_reference(model, task, sites, intervention.base_run)
    errors = _by_kind(sites, (effects.per_example - reference).abs().amax(-1))
    assert max(errors.values()) <= ATOL, f"{name}: largest error per kind {errors}"
    base = effects.clean if intervention.base_run == "clean" else effects.corrupt
    moved = _by_kind(sites, (reference - base[None]).abs().amax(-1))
    assert min(moved.values()) > 1e-3, f"{name}: every kind's patches must move the metric: {moved}"


def test_atp_equals_hand_written_gradient(family, task):
    name, entry, model = family
    sites = _all_sites(model)
    estimate = mechattr.attribute(model, task, sites, "atp")
    reference = tf.atp_reference(model, task, sites, "corrupt")
    errors = _by_kind(sites, (estimate.per_example - reference).abs().amax(-1))
    exact = max(errors.values()) <= ATOL
    assert exact == entry.attribution, f"{name}: table says attribution={entry.attribution}, errors {errors}"


def test_relp_equals_hand_written_relevance_rules_or_is_refused(family, task):
    name, entry, model = family
    sites = _all_sites(model)
    if not entry.relp:
        with pytest.raises(RelevanceError, match=rf"relp: model {re.escape(str(model.cfg.model_name))} cannot carry"):
            mechattr.attribute(model, task, sites, "relp")
        return
    estimate = mechattr.attribute(model, task, sites, "relp")
    reference = tf.atp_reference(model, task, sites, "corrupt", rules=tf.relp_rules(model))
    errors = _by_kind(sites, (estimate.per_example - reference).abs().amax(-1))
    assert max(errors.values()) <= ATOL, f"{name}: relp errors {errors}"
    atp = tf.atp_reference(model, task, sites, "corrupt")
    assert (reference - atp).abs().max() > 0.1  # the rules change the estimate on every family


def test_question_logits_equal_whole_prompts(family):
    """Questions on a shared context, stems packed with their endings where the family allows it (and a
    warning where it does not), give the logits of each whole prompt run alone."""
    name, _, model = family
    g = torch.Generator().manual_seed(1)
    byte = lambda n: torch.randint(0, 256, (n,), generator=g)  # noqa: E731
    context = byte(12)[None]
    stems = [byte(3), byte(5)]
    asked = [(stems[i % 2], byte(1 + i % 3)) for i in range(7)]  # endings of 1-3 tokens, two stems
    scoring._PACKING.pop(model, None)  # prove packing afresh on this family
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = scoring.question_logits(model, context, asked, batch_size=3)
    with torch.no_grad():
        expected = torch.cat([model(torch.cat([context[0], s, e])[None])[:, -1] for s, e in asked])
    assert _max_error(got, expected) <= ATOL * max(1.0, float(expected.abs().max())), name
    refused = [w for w in caught if issubclass(w.category, FastPathWarning)]
    assert (scoring._PACKING[model] is None) == (not refused), name


def test_rows_that_begin_alike_score_as_each_row_alone(family):
    """Held-out scoring from a block (`Prefix`), where rows share their first tokens: each beginning runs
    once where the family reuses a prefix (or rows run whole, and a warning says why), and every row gets
    the logits of its prompt run alone."""
    name, entry, model = family
    task = templated_task(vocab=256)
    prefix = Prefix(task.clean, task.last).fill(model)
    prefix.logits(model, 1, torch.arange(2))  # records the block inputs, so the hook below sees only the reads
    shapes, handle = block_inputs(model, 1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = logits(model, task.clean, last=task.last, prefix=prefix, layer=1)
    handle.remove()
    with torch.no_grad():
        expected = torch.stack([model(task.clean[i:i + 1, :int(task.lengths[i])])[0, -1]
                                for i in range(task.n_examples)])
    assert _max_error(got, expected) <= ATOL * max(1.0, float(expected.abs().max())), name
    assert not [w for w in caught if issubclass(w.category, FastPathWarning)], name
    assert ((3, 5) in shapes) == (entry.fast_path and entry.prefix), name  # the 3 beginnings ran once


@pytest.mark.parametrize("receiver", [Site("q", 1, head=0), Site("k", 1, head=0), Site("v", 1, head=0),
                                      Site("mlp_out", 1)], ids=str)
def test_edges_equal_their_exact_reference(family, task, receiver):
    name, entry, model = family
    sender = Site("z", 0, head=1)
    supported = entry.edges and (entry.mlp_edges or receiver.kind != "mlp_out")
    if not supported:
        with pytest.raises(ValueError, match=f"edges into {receiver.kind}.* not supported on model"):
            patch_edges(model, task, [Edge(sender, receiver)])
        with pytest.raises(ValueError, match=f"edges into {receiver.kind}.* not supported on model"):
            attribute_edges(model, task, [Edge(sender, receiver)])
        return
    exact = patch_edges(model, task, [Edge(sender, receiver)])
    reference = tf.edge_reference(model, task, sender, receiver)
    assert _max_error(exact.per_example[0], reference) <= ATOL, name
    assert _max_error(reference, exact.corrupt) > 1e-4, f"{name}: the edge must move the metric"


def test_readme_support_matrix_is_the_table():
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert families.support_table() in readme


def test_unknown_family_is_named(tmp_path):
    with pytest.raises(ValueError, match="'gpt5'.*gpt2, gpt_neox"):
        families.build("gpt5", tmp_path)
