"""Tasks whose prompts differ in length: every number is checked against each example run alone,
unpadded, with a hand-written TransformerLens hook."""

import json
import re

import pytest
import torch

import mechattr
from mechattr import Site, attribute, grid, patch
from mechattr.ablation import EdgeAblator
from mechattr.circuits import discover, edge_faithfulness, node_faithfulness
from mechattr.edges import attribute_edges, patch_edges
from mechattr.effects import Effects
from mechattr.forward import fast_path_verdict
from mechattr.graph import Edge
from mechattr.interventions import Denoise, Mean, Noise, Resample, Zero
from mechattr.tasks import Task, TaskError, from_jsonl, from_prompts, ioi
from mechattr.tasks.builtin import IOI_TEMPLATES, NAMES, OBJECTS, PLACES
from reference import hand_patch, logit_diff

LENGTHS = (7, 5, 9, 6)


class _WordTokenizer:
    """Words (each with its leading space) are one token each; other words one token per character."""

    def __init__(self, words):
        self.vocab = ["<s>"] + [w for word in words for w in (word, " " + word)]
        self.ids = {w: i for i, w in enumerate(self.vocab)}
        self.eos_token_id = 0

    def encode(self, text):
        ids = []
        for piece in re.findall(r" ?\w+| ?[^\w\s]", text):
            if piece in self.ids:
                ids.append(self.ids[piece])
                continue
            for ch in piece:  # a word outside the vocabulary: spelled out
                if ch not in self.ids:
                    self.ids[ch] = len(self.vocab)
                    self.vocab.append(ch)
                ids.append(self.ids[ch])
        return ids

    def decode(self, ids):
        return "".join(self.vocab[i] for i in ids)


class _WordModel:
    """Just what tokenization needs from a model: `to_tokens` (BOS first) and `tokenizer.decode`."""

    def __init__(self, words):
        self.tokenizer = _WordTokenizer(words)

    def to_tokens(self, text, prepend_bos=True):
        return torch.tensor([([0] if prepend_bos else []) + self.tokenizer.encode(text)])


IOI_WORDS = [*NAMES, *PLACES, *OBJECTS, *re.findall(r"\w+|,", " ".join(IOI_TEMPLATES)), "Then", "together"]


def _ragged_task(seed=0):
    """4 random prompts of LENGTHS tokens, right-padded with id 0; the corrupted ones differ at token 1
    and 3 tokens before the end. Named positions: "B" (token 1), "D" (3 before the end) and "END"."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(LENGTHS)
    clean = torch.randint(1, 50, (len(LENGTHS), max(LENGTHS)), generator=g)
    corrupt = clean.clone()
    corrupt[:, 1] = torch.randint(1, 50, (len(LENGTHS),), generator=g)
    corrupt[torch.arange(len(LENGTHS)), lengths - 3] = torch.randint(1, 50, (len(LENGTHS),), generator=g)
    for i, length in enumerate(LENGTHS):
        clean[i, length:] = corrupt[i, length:] = 0
    return Task(clean, corrupt, answer=torch.tensor([1, 2, 3, 4]), wrong=torch.tensor([5, 6, 7, 8]), name="ragged",
                lengths=lengths, named_positions={"B": torch.ones(4, dtype=torch.long), "D": lengths - 3,
                                                  "END": torch.full((4,), -1)})


def _alone(task, i):
    """Example i's clean and corrupted tokens without padding, [1, length]."""
    length = int(task.lengths[i])
    return task.clean[i:i + 1, :length], task.corrupt[i:i + 1, :length]


def _reference(model, task, i, hook, index, base="corrupt", value_fn=None):
    """Example i alone, unpadded: the base run with activation[:, *index] set from the other run."""
    clean, corrupt = _alone(task, i)
    base_tokens, source_tokens = (corrupt, clean) if base == "corrupt" else (clean, corrupt)
    return float(hand_patch(model, base_tokens, source_tokens, hook, index, task.answer[i:i + 1],
                            task.wrong[i:i + 1], value_fn)[0])


def test_padding_changes_no_real_position(tiny):
    task = _ragged_task()
    with torch.no_grad():
        padded = tiny(task.clean)
    for i in range(task.n_examples):
        alone, _ = _alone(task, i)
        with torch.no_grad():
            torch.testing.assert_close(padded[i, :alone.shape[1]], tiny(alone)[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("intervention", [Denoise(), Noise()])
def test_heads_layers_and_neurons_match_each_example_alone(tiny, intervention):
    task = _ragged_task()
    sites = [*grid(tiny, "z"), Site("attn_out", 0), Site("mlp_out", 1), Site("resid_post", 0),
             *(Site("neuron", 1, neuron=k) for k in (0, 17, 255))]
    effects = patch(tiny, task, sites, intervention, progress=False)
    for j, site in enumerate(sites):
        for i in range(task.n_examples):
            expected = _reference(tiny, task, i, site.hook, site.index, intervention.base_run)
            assert abs(float(effects.per_example[j, i]) - expected) < 1e-5, (site, i)
    for run in ("clean", "corrupt"):
        expected = [float(logit_diff(tiny, _alone(task, i)[run == "corrupt"], task.answer[i:i + 1],
                                     task.wrong[i:i + 1])[0]) for i in range(task.n_examples)]
        torch.testing.assert_close(getattr(effects, run), torch.tensor(expected), atol=1e-5, rtol=0)
    assert effects.per_example.abs().max() > 0.01


def test_every_layer_from_scratch_gives_the_same_numbers(tiny):
    task = _ragged_task(seed=1)
    sites = grid(tiny, "z")
    fast, full = patch(tiny, task, sites, progress=False), patch(tiny, task, sites, resume=False, progress=False)
    torch.testing.assert_close(fast.per_example, full.per_example, atol=1e-5, rtol=0)
    assert fast_path_verdict(tiny) is None  # the resumed path proved itself and ran


@pytest.mark.parametrize("kind", ["resid_pre", "attn_out", "z", "pattern"])
def test_named_positions_patch_each_example_at_its_own_index(tiny, kind):
    task = _ragged_task()
    assert task.positions == ("B", "D", "END")
    g = grid(tiny, kind, task.positions, per_position=True, layers=[1] if kind in ("z", "pattern") else None)
    effects = patch(tiny, task, g, progress=False)
    per_site = effects.per_example.reshape(len(g), -1)
    for j, site in enumerate(g):
        for i in range(task.n_examples):
            index = Site(kind, site.layer, pos=int(task.named_positions[site.pos][i]), head=site.head).index
            assert abs(float(per_site[j, i]) - _reference(tiny, task, i, site.hook, index)) < 1e-5, (site, i)
    assert per_site.abs().max() > 0.01


def test_mean_ablation_at_a_named_position_averages_aligned_tokens(tiny):
    task = _ragged_task()
    site = Site("resid_pre", 1, pos="D")
    effects = patch(tiny, task, [site], Mean(), progress=False)
    acts = {}
    for run in ("clean", "corrupt"):
        _, cache = tiny.run_with_cache(getattr(task, run), names_filter=site.hook)
        acts[run] = cache[site.hook][torch.arange(4), task.named_positions["D"]]  # (n, d_model)
    mean = torch.cat([acts["clean"], acts["corrupt"]]).mean(0)
    for i in range(task.n_examples):
        expected = _reference(tiny, task, i, site.hook, (int(task.named_positions["D"][i]),), "clean",
                              value_fn=lambda base, source: mean.expand_as(base))
        assert abs(float(effects.per_example[0, i]) - expected) < 1e-5
    with pytest.raises(ValueError, match=r"'mean' is not examplewise.*named positions \(B, D, END\)"):
        patch(tiny, task, [Site("resid_pre", 1)], Mean(), progress=False)


_EDGES = [Edge(Site("embed"), Site("q", 1, head=2)), Edge(Site("z", 0, head=1), Site("mlp_out", 1)),
          Edge(Site("mlp_out", 0), Site("resid_post", 1))]

# Every path that takes an intervention and reads every position: edges, joint edge ablation, circuits
# and verification, each called as a user would.
_SPANNING_PATHS = {
    "patch_edges": lambda m, t, a: patch_edges(m, t, _EDGES, a),
    "attribute_edges": lambda m, t, a: attribute_edges(m, t, _EDGES, intervention=a),
    "EdgeAblator": lambda m, t, a: EdgeAblator(m, t, a, _EDGES)([set()]),
    "edge_faithfulness": lambda m, t, a: edge_faithfulness(m, t, [set(_EDGES[:1])], a, _EDGES),
    "node_faithfulness": lambda m, t, a: node_faithfulness(m, t, [{Site("z", 0, head=1)}], a),
    "discover nodes": lambda m, t, a: discover(m, t, "node", ablation=a, prune=False),
    "discover edges": lambda m, t, a: discover(m, t, "edge", ablation=a, prune=False),
    "verify sites": lambda m, t, a: mechattr.verify(m, t, attribute(m, t, grid(m, "z")), 2, 2, intervention=a),
    "verify edges": lambda m, t, a: mechattr.verify(m, t, attribute_edges(m, t, _EDGES), 1, 1, intervention=a),
}


@pytest.mark.parametrize("path", _SPANNING_PATHS)
@pytest.mark.parametrize("intervention", [Mean(), Resample()])
def test_ablations_that_mix_examples_are_refused_on_every_path(tiny, path, intervention):
    """On prompts of different lengths, an intervention that combines examples would average (or swap)
    real tokens with padding at every position: each path refuses it, naming the site or edge."""
    task = _ragged_task()
    before = {name: p.clone() for name, p in tiny.named_parameters()}
    with pytest.raises(ValueError, match=rf"(site|edge) .*'{intervention.name}' is not examplewise, and task "
                                         r"'ragged' has prompts of different lengths.*padding.*examplewise "
                                         r"intervention \(denoise, noise, zero, steer\)"):
        _SPANNING_PATHS[path](tiny, task, intervention)
    assert all(torch.equal(p, before[name]) for name, p in tiny.named_parameters())
    cut = Task(task.clean[:, :5], task.corrupt[:, :5], task.answer, task.wrong)  # one length: the same call runs
    _SPANNING_PATHS[path](tiny, cut, intervention)


@pytest.mark.parametrize("intervention", [Noise(), Zero()])
def test_edges_on_prompts_of_different_lengths_match_each_example_alone(tiny, intervention):
    task = _ragged_task()
    exact, estimate = patch_edges(tiny, task, _EDGES, intervention), attribute_edges(tiny, task, _EDGES,
                                                                                       intervention=intervention)
    ablated = EdgeAblator(tiny, task, intervention, _EDGES)([set(_EDGES[1:]), set()])
    for i in range(task.n_examples):
        alone = Task(*_alone(task, i), task.answer[i:i + 1], task.wrong[i:i + 1])
        torch.testing.assert_close(exact.per_example[:, i], patch_edges(tiny, alone, _EDGES, intervention
                                                                        ).per_example[:, 0], atol=1e-5, rtol=0)
        torch.testing.assert_close(estimate.per_example[:, i], attribute_edges(
            tiny, alone, _EDGES, intervention=intervention).per_example[:, 0], atol=1e-5, rtol=0)
        torch.testing.assert_close(ablated[:, i], EdgeAblator(tiny, alone, intervention, _EDGES)(
            [set(_EDGES[1:]), set()])[:, 0], atol=1e-5, rtol=0)
    assert exact.effect.abs().max() > 0.01


def test_positions_every_example_lacks_are_refused(tiny):
    task = _ragged_task()
    patch(tiny, task, [Site("resid_pre", 1, pos=4)], progress=False)  # inside the shortest example
    with pytest.raises(TaskError, match=r"pos 5 is past the end of example 1, which has 5 tokens.*B, D, END"):
        patch(tiny, task, [Site("resid_pre", 1, pos=5)], progress=False)
    with pytest.raises(TaskError, match=r"no position named 'S9'; valid: B, D, END"):
        patch(tiny, task, [Site("resid_pre", 1, pos="S9")], progress=False)


def test_attribution_matches_each_example_estimated_alone(tiny):
    task = _ragged_task()
    sites = [*grid(tiny, "z"), *grid(tiny, "resid_pre", task.positions)]
    estimate = attribute(tiny, task, sites, "atp")
    for i in range(task.n_examples):
        clean, corrupt = _alone(task, i)
        alone = Task(clean, corrupt, task.answer[i:i + 1], task.wrong[i:i + 1])
        at_index = [s if not isinstance(s.pos, str) else Site(s.kind, s.layer, pos=int(task.named_positions[s.pos][i]))
                    for s in sites]
        expected = attribute(tiny, alone, at_index, "atp").per_example[:, 0]
        torch.testing.assert_close(estimate.per_example[:, i], expected, atol=1e-5, rtol=0)


def test_named_positions_label_saved_effects_tables_and_plots(tiny, tmp_path):
    from mechattr.plots.effects import heatmap

    task = _ragged_task()
    effects = patch(tiny, task, grid(tiny, "resid_pre", task.positions), progress=False)
    loaded = Effects.load(effects.save(tmp_path / "e"))
    assert [s.pos for s in loaded.sites] == ["B", "D", "END"] * 2
    torch.testing.assert_close(loaded.per_example, effects.per_example)
    assert effects.to_dataframe()["pos"].tolist() == ["B", "D", "END"] * 2
    labels = [t.get_text() for t in heatmap(loaded).get_xticklabels()]
    assert labels == ["B", "D", "END"]


def test_subsets_keep_positions_and_cut_padding():
    task = _ragged_task()
    part = task.subset([1, 3])
    assert part.n_pos == 6 and part.lengths.tolist() == [5, 6]
    assert part.named_positions["D"].tolist() == [2, 3] and part.named_positions["END"].tolist() == [4, 5]
    same = task.subset([0])
    assert not same.ragged and same.last is None and same.positions == tuple(range(7))


def test_prompts_of_different_lengths_pad_and_derive_positions_from_the_end():
    model = _WordModel(["the", "cat", "big", "sat", "dog", "ran", "a", "fast"])
    task = from_prompts(model, ["the cat sat", "the big cat sat"], ["the dog sat", "the big dog sat"],
                        [" ran"] * 2, [" a"] * 2)
    assert task.lengths.tolist() == [4, 5] and task.n_pos == 5
    assert task.positions == ("-4", "-3", "-2", "-1")
    decode = model.tokenizer.decode
    assert [decode([int(task.clean[i, task.named_positions["-2"][i]])]) for i in range(2)] == [" cat", " cat"]
    assert [decode([int(task.clean[i, task.last[i]])]) for i in range(2)] == [" sat", " sat"]


def test_a_task_file_with_many_bad_lines_reports_each(tmp_path):
    model = _WordModel(["the", "cat", "big", "sat", "dog", "ran", "a"])
    good = {"clean": "the cat sat", "corrupt": "the dog sat", "answer": " ran", "wrong": " a"}
    lines = [
        json.dumps(good),
        json.dumps({**good, "answer": " zebra"}),  # line 2: not one token
        json.dumps({**good, "corrupt": "the big dog sat"}),  # line 3: lengths differ
        json.dumps({"clean": "the cat", "corrupt": "the dog"}),  # line 4: missing fields
        "{not json",  # line 5
        json.dumps({**good, "clean": "the big cat sat", "corrupt": "the big dog sat"}),  # fine: a longer prompt
        json.dumps({**good, "positions": {"X": 1}}),  # line 7: names positions the others do not
    ]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(TaskError) as info:
        from_jsonl(model, path)
    message = str(info.value)
    assert message.startswith(f"task file {path} has 5 problems; fix each:")
    assert f"{path}:2: the answer ' zebra' is 6 tokens [' ', 'z', 'e', 'b', 'r', 'a']" in message
    assert (f"{path}:3: clean prompt is 4 tokens but corrupted prompt is 5" in message
            and "clean:   ['<s>', 'the', ' cat', ' sat']" in message
            and "corrupt: ['<s>', 'the', ' big', ' dog', ' sat']" in message)
    assert f"{path}:4: each line must be an object with string fields" in message
    assert "missing: answer, wrong" in message
    assert f"{path}:5: not valid JSON" in message
    assert f"{path}:7: names positions ['X'] but {path}:1 names []" in message
    order = [int(m) for m in re.findall(rf"^  {re.escape(str(path))}:(\d+):", message, re.M)]
    assert order == [2, 3, 4, 5, 7]
    path.write_text("\n".join([json.dumps({**good, "answer": " zebra"})] * 25))
    with pytest.raises(TaskError, match=r"(?s)has 25 problems.*\n  \.\.\. and 5 more$"):
        from_jsonl(model, path)


def test_positions_in_a_task_file_count_from_either_end(tmp_path):
    model = _WordModel(["the", "cat", "big", "sat", "dog", "ran", "a"])
    rows = [{"clean": "the cat sat", "corrupt": "the dog sat", "answer": " ran", "wrong": " a",
             "positions": {"N": 2, "END": -1}},
            {"clean": "the big cat sat", "corrupt": "the big dog sat", "answer": " ran", "wrong": " a",
             "positions": {"N": -2, "END": -1}}]
    path = tmp_path / "pets.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    task = from_jsonl(model, path)
    assert task.positions == ("N", "END")
    assert task.named_positions["N"].tolist() == [2, 3] and task.named_positions["END"].tolist() == [3, 4]
    rows[1]["positions"]["N"] = 7
    path.write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(TaskError, match=r"pets.jsonl:2: position 'N' = 7 is outside the prompt's 5 tokens "
                                        r"\(valid -5\.\.4.*\n    clean: \[0 '<s>', 1 'the', 2 ' big'"):
        from_jsonl(model, path)


def test_ioi_names_its_positions_on_prompts_of_different_lengths():
    model = _WordModel(IOI_WORDS)
    templates = (IOI_TEMPLATES[0], "Then {A} and {B} went to the {place} together, {S} gave a {object} to")
    task = ioi(model, n=12, seed=3, templates=templates)
    assert task.ragged and task.positions == ("IO", "S1", "S2", "END")
    decode = model.tokenizer.decode
    for i in range(task.n_examples):
        token = {name: decode([int(task.clean[i, index[i]])]) for name, index in task.named_positions.items()}
        corrupt_s2 = decode([int(task.corrupt[i, task.named_positions["S2"][i]])])
        answer, wrong = decode([int(task.answer[i])]), decode([int(task.wrong[i])])
        assert (token["IO"], token["S1"], token["S2"], token["END"]) == (answer, wrong, wrong, " to")
        assert corrupt_s2 == answer
        differs = (task.clean[i] != task.corrupt[i]).nonzero().flatten().tolist()
        assert differs == [int(task.named_positions["S2"][i])]


@pytest.mark.slow
def test_smollm2_ioi_of_two_lengths_matches_each_example_alone(smollm2):
    templates = (IOI_TEMPLATES[0], "When {A} and {B} went to the big {place} together, {S} gave a {object} to")
    task = ioi(smollm2, n=4, seed=0, templates=templates)  # two of each template: 15 and 17 tokens
    assert task.lengths.tolist() == [15, 17, 15, 17] and task.positions == ("IO", "S1", "S2", "END")
    for i in range(task.n_examples):
        tokens = mechattr.tasks.str_tokens(smollm2, task.clean[i])
        assert tokens[int(task.named_positions["S2"][i])] == tokens[int(task.named_positions["S1"][i])]
        assert tokens[int(task.named_positions["IO"][i])] == smollm2.tokenizer.decode([int(task.answer[i])])
        assert tokens[int(task.named_positions["END"][i])] == " to"
    sites = [Site("z", 29, head=4), Site("resid_pre", 20, pos="S2")]
    effects = patch(smollm2, task, sites, progress=False)
    for j, site in enumerate(sites):
        for i in range(task.n_examples):
            index = site.index if site.pos is None else (int(task.named_positions[site.pos][i]),)
            assert abs(float(effects.per_example[j, i]) - _reference(smollm2, task, i, site.hook, index)) < 1e-4
    assert float(effects.clean.mean() - effects.corrupt.mean()) > 2.0  # the behaviour survives the padding
