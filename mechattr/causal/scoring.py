"""Reading a model's causal claims: Yes/No log-odds for a scored model, an edge-list parser for text.

A scored model is a `TransformerBridge` (from `mechattr.load_model`): the score of the ordered pair
(A, B) is log p(" Yes") - log p(" No") for the token after `context + question(A, B)`. A question is a
stem ("Question: Does A cause") and an ending (" B? Answer:"); the context runs once and the questions
run in batches on its keys and values, each stem once with its endings packed after it, so each pair costs
about its ending's tokens.

A text model is any `predict(prompt) -> str`. Its answer is parsed by `parse_edges`, deterministically:

1. The text is cut into statements at newlines, ";" and ",".
2. A statement is cut at connectives: arrows ("->", "-->", "=>", "→", "⟶") and the word "causes".
   Consecutive pieces p, q give the claim (cause at the end of p, effect at the start of q), so chains
   "A -> B -> C" and "A -> B and C -> D" give A->B, B->C and A->B, C->D.
3. A piece's end (cause) or start (effect) is matched, ignoring case, surrounding punctuation and extra
   spaces, to the longest variable name that sits there on word boundaries. A name "X (Y)" also
   matches "X". Pieces that match no name, self-loops and repeats are dropped; all other text is ignored.
"""

import copy
import re
import warnings
import weakref
from typing import Any, Sequence

import networkx as nx
import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechattr.forward import FastPathWarning, attention_reads_cache, final_logits, logit_miss
from mechattr.models import model_name
from mechattr.sites import hook_name
from mechattr.tasks import single_token

__all__ = ["YES", "NO", "score_questions", "question_logits", "parse_edges", "predicted_graph"]

YES, NO = " Yes", " No"

# Per model: None when packed questions reproduced whole-prompt logits, else what differed.
_PACKING: "weakref.WeakKeyDictionary[Any, str | None]" = weakref.WeakKeyDictionary()


def _padded_logits(model: Any, prefix: Tensor, cache: Any | None, asked: list[Tensor]) -> Float[Tensor, "n vocab"]:
    """Next-token logits after prefix + each of `asked`, one row each. With a cache (holding exactly
    `prefix`) only the questions run; logits are computed only at the positions some row ends at."""
    last = torch.tensor([len(e) - 1 for e in asked])
    # Right padding: causal attention keeps every real position blind to the padding after it.
    batch = torch.zeros(len(asked), int(last.max()) + 1, dtype=torch.long)
    for i, e in enumerate(asked):
        batch[i, :len(e)] = e
    if cache is None:
        batch, last = torch.cat([prefix.expand(len(asked), -1), batch], 1), last + prefix.shape[1]
    else:
        cache = copy.deepcopy(cache)  # the model extends the cache it is given
        cache.batch_repeat_interleave(len(asked))
    keep = last.unique()  # sorted
    logits = model(batch, cache=cache, logits_to_keep=keep)  # (B, len(keep), vocab)
    return logits[torch.arange(len(asked)), torch.searchsorted(keep, last)]


def _segments(asked: Sequence[tuple[Tensor, Tensor]], most: int) -> list[tuple[Tensor, list[int]]]:
    """(stem, indices of its questions) with at most `most` questions each, stems in first-seen order."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (stem, _) in enumerate(asked):
        groups.setdefault(tuple(stem.tolist()), []).append(i)
    return [(asked[ids[0]][0], ids[start:start + most]) for ids in groups.values()
            for start in range(0, len(ids), most)]


def _calls(segments: list[tuple[Tensor, list[int]]], most: int) -> list[list[tuple[Tensor, list[int]]]]:
    """`segments` grouped into calls of whole segments and at most `most` questions (a segment alone may
    reach it): fewer, fuller rows, since each row costs a copy of the context's keys and values."""
    calls: list[list[tuple[Tensor, list[int]]]] = [[]]
    count = 0
    for segment in segments:
        if calls[-1] and count + len(segment[1]) > most:
            calls.append([])
            count = 0
        calls[-1].append(segment)
        count += len(segment[1])
    return calls


def _packed_logits(model: Any, context: Tensor, cache: Any, asked: Sequence[tuple[Tensor, Tensor]],
                   segments: list[tuple[Tensor, list[int]]]) -> Float[Tensor, "n vocab"]:
    """Next-token logits of the questions of `segments`, one row per segment: its stem once, then each of
    its endings, each ending attending to the context (in `cache`), the stem and itself only, at the
    positions it has in its own prompt. Result rows: the segments' questions in order."""
    rows = [torch.cat([stem] + [asked[i][1] for i in ids]) for stem, ids in segments]
    c, n = context.shape[1], max(len(r) for r in rows)
    tokens = torch.zeros(len(rows), n, dtype=torch.long)
    positions = torch.full((len(rows), n), c)
    # Keys: the context, then the row. Padding after a row's last question sees the context only.
    sees = torch.zeros(len(rows), n, c + n, dtype=torch.bool)
    sees[..., :c] = True
    ends = []
    for r, ((stem, ids), row) in enumerate(zip(segments, rows)):
        tokens[r, :len(row)] = row.cpu()
        s = len(stem)
        positions[r, :s] = torch.arange(c, c + s)
        sees[r, :s, c:c + s] = torch.ones(s, s, dtype=torch.bool).tril()
        start = s
        for i in ids:
            e = len(asked[i][1])
            positions[r, start:start + e] = torch.arange(c + s, c + s + e)
            sees[r, start:start + e, c:c + s] = True
            sees[r, start:start + e, c + start:c + start + e] = torch.ones(e, e, dtype=torch.bool).tril()
            start += e
            ends.append((r, start - 1))
    dtype = next(model.parameters()).dtype
    mask = torch.zeros(sees.shape, dtype=dtype).masked_fill_(~sees, torch.finfo(dtype).min)[:, None]
    cache = copy.deepcopy(cache)  # the model extends the cache it is given
    cache.batch_repeat_interleave(len(rows))
    # The rows end their questions at different positions: unembed those only, from the last block's output.
    kept = {}

    def keep(resid, hook):
        kept["resid"] = resid

    device = context.device
    with model.hooks(fwd_hooks=[(hook_name("resid_post", len(model.blocks) - 1), keep)]):
        model(tokens.to(device), cache=cache, attention_mask=mask.to(device), position_ids=positions.to(device),
              logits_to_keep=1)
    row, end = torch.tensor(ends, device=device).T
    return final_logits(model, kept["resid"][row, end][:, None])[:, 0]


def _prove_packing(model: Any, context: Tensor, cache: Any, asked: Sequence[tuple[Tensor, Tensor]]) -> str | None:
    """None if packed rows reproduce whole-prompt logits for two questions of one stem (or the first two
    questions), else what differed."""
    _, ids = max(_segments(asked, len(asked)), key=lambda segment: len(segment[1]))
    probe = [asked[i] for i in (ids[:2] if len(ids) > 1 else range(min(2, len(asked))))]
    try:
        got = _packed_logits(model, context, cache, probe, _segments(probe, 2))
        expected = torch.cat([model(torch.cat([context[0], s, e])[None])[:, -1] for s, e in probe])
    except Exception as error:  # noqa: BLE001  (any failure of the shortcut means: use the exact path)
        return f"fails to run: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    miss = logit_miss(model, got, expected)
    return None if miss is None else f"misses whole-prompt logits {miss}"


def question_logits(model: Any, context: Int[Tensor, "1 ctx"], asked: Sequence[tuple[Tensor, Tensor]],
                    batch_size: int = 64) -> Float[Tensor, "question vocab"]:
    """Next-token logits (float32) after context + stem + ending, per (stem tokens, ending tokens).

    The context runs once. Where the model keeps a cache, the questions run on its keys and values, each
    stem once with its endings packed after it in one row (an attention mask keeps every ending blind to
    the others; positions are those of its own prompt), at most `batch_size` questions per call. Packing
    proves itself once per model against whole prompts; where it fails, each question runs in its own row
    on the cache, and a `FastPathWarning` says so. Without a cache every question reruns its whole prompt.
    """
    if not asked:
        raise ValueError("question_logits: no questions given (need one or more (stem, ending) token pairs)")
    with torch.no_grad(), attention_reads_cache(model):
        _, cache = model(context, return_type="logits_and_cache", logits_to_keep=1)
        if cache is None or cache.get_seq_length() != context.shape[1]:
            cache = None  # the model keeps no usable cache: every question reruns its whole prompt
        if cache is not None and model not in _PACKING:
            _PACKING[model] = _prove_packing(model, context, cache, asked)
            if _PACKING[model] is not None:
                warnings.warn(f"model {model_name(model)}: packed question scoring {_PACKING[model]}; mechattr "
                              "runs each question in its own row instead", FastPathWarning, stacklevel=2)
        if cache is not None and _PACKING[model] is None:
            calls = _calls(_segments(asked, batch_size), batch_size)
            parts = [_packed_logits(model, context, cache, asked, call) for call in calls]
            order = [i for call in calls for _, ids in call for i in ids]
        else:
            whole = [torch.cat([stem, ending]) for stem, ending in asked]
            # One call per batch, not one per question; batches of questions of similar length pad least.
            order = sorted(range(len(whole)), key=lambda i: len(whole[i]))
            parts = [_padded_logits(model, context, cache, [whole[i] for i in order[start:start + batch_size]])
                     for start in range(0, len(order), batch_size)]
    logits = torch.cat(parts).float()
    return logits[torch.tensor(order).argsort().to(logits.device)]


def score_questions(model: Any, context: str, questions: Sequence[tuple[str, str]],
                    batch_size: int = 64) -> Float[Tensor, " question"]:
    """log p(" Yes") - log p(" No") for the token after context + stem + ending, per (stem, ending).

    The context runs once; the questions run on its keys and values, each stem once (see
    `question_logits`). Deterministic: no sampling, and the result does not depend on `batch_size`
    beyond float rounding.
    """
    yes, no = single_token(model, YES), single_token(model, NO)
    if not questions:
        return torch.empty(0)
    tokens = lambda text: model.to_tokens(text, prepend_bos=False)[0]  # noqa: E731
    stems = {stem: tokens(stem) for stem in dict.fromkeys(stem for stem, _ in questions)}
    asked = [(stems[stem], tokens(ending)) for stem, ending in questions]
    logits = question_logits(model, model.to_tokens(context), asked, batch_size)  # context with BOS
    return (logits[:, yes] - logits[:, no]).cpu()


_CONNECTIVE = re.compile(r"\s*(?:-+>|=+>|→|⟶|\bcauses\b)\s*", re.IGNORECASE)
_STATEMENT = re.compile(r"[\n;,]")


def _norm(text: str) -> str:
    """Lower case, single spaces, no punctuation at either end (names are normalised the same way)."""
    return re.sub(r"^\W+|\W+$", "", re.sub(r"\s+", " ", text.lower()))


def _aliases(labels: dict[str, str]) -> list[tuple[str, str]]:
    """(normalised name, id) for every name and every "X" of a name "X (Y)", longest first."""
    out = []
    for v, name in labels.items():
        out.append((_norm(name), v))
        short = re.match(r"^(.+?)\s*\(.*\)\s*$", name)
        if short:
            out.append((_norm(short.group(1)), v))
    return sorted(out, key=lambda a: -len(a[0]))


def _find(piece: str, aliases: list[tuple[str, str]], at_end: bool) -> str | None:
    text = _norm(piece)
    for name, v in aliases:
        if not name:
            continue
        if at_end and text.endswith(name):
            before = len(text) - len(name) - 1
            if before < 0 or not text[before].isalnum():
                return v
        if not at_end and text.startswith(name):
            if len(text) == len(name) or not text[len(name)].isalnum():
                return v
    return None


def parse_edges(text: str, labels: dict[str, str]) -> list[tuple[str, str]]:
    """The (cause id, effect id) claims in `text`, names matched to `labels` (id -> shown name); see the
    module docstring for the grammar."""
    aliases = _aliases(labels)
    edges: list[tuple[str, str]] = []
    for statement in _STATEMENT.split(text):
        pieces = _CONNECTIVE.split(statement)
        for left, right in zip(pieces, pieces[1:]):
            cause, effect = _find(left, aliases, at_end=True), _find(right, aliases, at_end=False)
            if cause is not None and effect is not None and cause != effect and (cause, effect) not in edges:
                edges.append((cause, effect))
    return edges


def predicted_graph(pairs: Sequence[tuple[str, str]], scores: Float[Tensor, " pair"], k: int | None = None,
           threshold: float | None = None) -> nx.DiGraph:
    """The predicted graph: the `k` highest-scoring pairs (ties keep pair order), or every pair scoring
    above `threshold`. Give exactly one of the two."""
    if (k is None) == (threshold is None):
        raise ValueError(f"give exactly one of k and threshold, got k={k}, threshold={threshold}")
    if len(pairs) != len(scores):
        raise ValueError(f"{len(pairs)} pairs but {len(scores)} scores")
    if k is not None:
        order = sorted(range(len(pairs)), key=lambda i: (-float(scores[i]), i))[:k]
    else:
        order = [i for i in range(len(pairs)) if float(scores[i]) > threshold]
    graph = nx.DiGraph()
    graph.add_edges_from(pairs[i] for i in order)
    return graph
