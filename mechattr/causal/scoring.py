"""Reading a model's causal claims: Yes/No log-odds for a scored model, an edge-list parser for text.

A scored model is a `TransformerBridge` (from `mechattr.load_model`): the score of the ordered pair
(A, B) is log p(" Yes") - log p(" No") for the token after `context + question(A, B)`. A question is a
stem ("Question: Does A cause") and an ending (" B? Answer:"); the context runs once and the questions
run in batches on its keys and values, so each pair costs only its question's tokens.

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
from typing import Any, Sequence

import networkx as nx
import torch
from jaxtyping import Float
from torch import Tensor

from mechattr.forward import attention_reads_cache
from mechattr.tasks import single_token

__all__ = ["YES", "NO", "score_questions", "parse_edges", "predicted_graph"]

YES, NO = " Yes", " No"


def _last_logits(model: Any, prefix: Tensor, cache: Any | None, endings: list[Tensor]) -> Float[Tensor, "n vocab"]:
    """Next-token logits after prefix + ending, for each ending. With a cache (holding exactly `prefix`)
    only the endings run; logits are computed only at the positions some row ends at."""
    last = torch.tensor([len(e) - 1 for e in endings])
    # Right padding: causal attention keeps every real position blind to the padding after it.
    batch = torch.zeros(len(endings), int(last.max()) + 1, dtype=torch.long)
    for i, e in enumerate(endings):
        batch[i, :len(e)] = e
    if cache is None:
        batch, last = torch.cat([prefix.expand(len(endings), -1), batch], 1), last + prefix.shape[1]
    else:
        cache = copy.deepcopy(cache)  # the model extends the cache it is given
        cache.batch_repeat_interleave(len(endings))
    keep = last.unique()  # sorted
    logits = model(batch, cache=cache, logits_to_keep=keep)  # (B, len(keep), vocab)
    return logits[torch.arange(len(endings)), torch.searchsorted(keep, last)]


def score_questions(model: Any, context: str, questions: Sequence[tuple[str, str]],
                    batch_size: int = 32) -> Float[Tensor, " question"]:
    """log p(" Yes") - log p(" No") for the token after context + stem + ending, per (stem, ending).

    The context runs once; the questions (stem and ending) run on its keys and values, `batch_size` at a
    time. Deterministic: no sampling, and the result does not depend on `batch_size` beyond float rounding.
    """
    yes, no = single_token(model, YES), single_token(model, NO)
    ctx = model.to_tokens(context)  # (1, C), with BOS
    tokens = lambda text: model.to_tokens(text, prepend_bos=False)[0]  # noqa: E731
    stems = {stem: tokens(stem) for stem in dict.fromkeys(stem for stem, _ in questions)}
    asked = [torch.cat([stems[stem], tokens(ending)]) for stem, ending in questions]
    scores = torch.empty(len(questions))
    with torch.no_grad(), attention_reads_cache(model):
        _, cache = model(ctx, return_type="logits_and_cache", logits_to_keep=1)
        if cache is None or cache.get_seq_length() != ctx.shape[1]:
            cache = None  # the model keeps no usable cache: every question reruns its whole prompt
        # One call per batch, not one per stem: a model call costs far more than a stem's few tokens. Batches
        # of questions of similar length pad least.
        order = sorted(range(len(asked)), key=lambda i: len(asked[i]))
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            final = _last_logits(model, ctx, cache, [asked[i] for i in chunk])
            scores[chunk] = (final[:, yes] - final[:, no]).float()
    return scores


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
