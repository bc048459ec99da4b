"""Knowledge vs data inside the model: the input-level do-operators as clean/corrupted patching tasks.

The clean prompt is an S1 prompt (real names, data); the corrupted one is the same prompt under another
setting, so patching a site from the clean run into the corrupted one measures how much of the answer
that site carries of what the do-operator removed:

- against S3 (knowledge removed): every variable name is replaced by a made-up word with the same token
  count in every place it appears; the data tokens are identical. A site that restores the answer carries
  the knowledge behind the names.
- against S2 (data removed): S2 drops the table, which would shift every later position. Here the table
  stays, but every data-value token is replaced by the token "?" (commas and line breaks kept), so the
  corrupted prompt shows the table's shape and none of its values, position by position.

Prompts are short: each shows only the two variables of its question (their names, `rows` data rows)
and asks "Does A cause B?"; a true edge A -> B gives two examples, (A, B) answered " Yes" and (B, A)
answered " No", over `trials` redraws of the rows. The metric is logit(answer) - logit(other answer).
Examples must share one token length, so a task keeps the largest group of equally long ones; edges
whose names no made-up word can match (token by token, data rows in place) are left out.
"""

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from mechattr.causal.problems import Problem
from mechattr.causal.prompts import csv_rows, describe, question
from mechattr.causal.scoring import NO, YES
from mechattr.causal.settings import made_up_words
from mechattr.effects import Effects
from mechattr.patching import patch
from mechattr.sites import grid
from mechattr.tasks import Task, TaskError, largest_same_length, single_token, str_tokens

__all__ = ["KnowledgeConfig", "AGAINST", "knowledge_task", "knowledge_effects", "prompt_parts"]

AGAINST = ("S3", "S2")  # settings a corrupted prompt can come from
_PLACEHOLDER = "?"  # stands in for every data-value token in the S2 prompt
_KEEP = {",", "\n"}  # table punctuation kept in the S2 prompt


@dataclass(frozen=True)
class KnowledgeConfig:
    """How the clean/corrupted prompts are drawn."""

    rows: int = 3  # data rows in each prompt
    trials: int = 2  # redraws of the rows (and made-up words) per edge
    n: int = 8  # most examples per task
    seed: int = 0  # draws rows, column order and made-up words
    tries: int = 500  # made-up words searched per name for one of the same token count


def prompt_parts(labels: tuple[str, str], frame: Any, rows: int, pair: tuple[str, str]) -> tuple[str, str]:
    """(context up to and including the CSV header line, the data rows and question); the prompt is
    their concatenation. `labels` are the two names in column order, `pair` the (cause, effect) names;
    `frame` is the data (columns named `labels`) or its rows written by `prompts.csv_rows`."""
    full = describe(list(labels), frame, rows)
    header_end = full.index(",".join(labels) + "\n") + len(",".join(labels) + "\n")
    return full[:header_end], full[header_end:] + "".join(question(*pair))


def _count(model: Any, text: str) -> int:
    return model.to_tokens(text, prepend_bos=False).shape[1]


def _s2_tokens(model: Any, head: str, body: str, tokens: Tensor) -> Tensor:
    """`tokens` (head + body, with BOS) with every data-value token of body's table replaced by '?'."""
    n_head = model.to_tokens(head).shape[1]
    table = body[:body.rindex("\n") + 1] if "\n" in body else ""
    n_table = _count(model, table)
    if not torch.equal(model.to_tokens(head + table)[0], tokens[:n_head + n_table]):
        raise TaskError("the data rows do not tokenize on their own as inside the prompt; cannot mask them")
    placeholder = single_token(model, _PLACEHOLDER, "placeholder")
    out = tokens.clone()
    for p in range(n_head, n_head + n_table):
        if model.tokenizer.decode([int(tokens[p])]).strip(" ") not in _KEEP:
            out[p] = placeholder
    return out


def _prompts(lines: list[str], cols: list[str], names: dict[str, str], pair: tuple[str, str]) -> tuple[str, str]:
    """`prompt_parts` under `names` for the data rows `lines` (written once per example: only names change)."""
    return prompt_parts(tuple(names[v] for v in cols), lines, len(lines), (names[pair[0]], names[pair[1]]))


def _example(model: Any, problem: Problem, edge: tuple[str, str], trial: int, against: str,
             config: KnowledgeConfig) -> list[tuple[Tensor, Tensor, str, str]]:
    """(clean tokens, corrupt tokens, answer, wrong) for (A, B) -> Yes and (B, A) -> No of one edge."""
    rng = np.random.default_rng((config.seed, trial, *map(problem.variables.index, edge)))
    cols = list(edge) if rng.random() < 0.5 else list(edge[::-1])
    rows = problem.data.iloc[rng.permutation(len(problem.data))[:config.rows]]
    real = {v: problem.names[v] for v in cols}
    lines = csv_rows(rows[cols], config.rows)
    questions = ((edge, YES), (edge[::-1], NO))
    clean = {pair: _prompts(lines, cols, real, pair) for pair, _ in questions}
    clean_ids = {pair: model.to_tokens("".join(text))[0] for pair, text in clean.items()}
    if against == "S2":
        return [(clean_ids[pair], _s2_tokens(model, *clean[pair], clean_ids[pair]), answer,
                 NO if answer == YES else YES) for pair, answer in questions]
    # The data rows (the body up to its last line break) hold no name, so their token count is the clean
    # prompts'; a candidate is tokenized whole first, and its header only if the lengths agree.
    n_head = {pair: model.to_tokens(head).shape[1] for pair, (head, _) in clean.items()}
    table = {pair: slice(n_head[pair], n_head[pair] + _count(model, body[:body.rindex("\n") + 1]))
             for pair, (_, body) in clean.items()}

    # A name's token count depends on its neighbours (",name", "name?"), so each made-up name is checked
    # in the whole prompts, one variable at a time (the others keep their names meanwhile).
    def aligned(names: dict[str, str]) -> bool:
        """Same length, same header length, and the data rows on the same positions with the same tokens."""
        for pair, _ in questions:
            head, body = _prompts(lines, cols, names, pair)
            ids = model.to_tokens(head + body)[0]
            if (len(ids) != len(clean_ids[pair]) or model.to_tokens(head).shape[1] != n_head[pair]
                    or not torch.equal(ids[table[pair]], clean_ids[pair][table[pair]])):
                return False
        return True

    fake = dict(real)
    for v in cols:
        words = made_up_words(config.tries, rng, set(problem.names.values()), syllables=(1, 4), coda=0.3)
        words += [f"{x} {y}" for x, y in zip(words[::2], words[1::2])]  # for names of several words
        word = next((w for w in words if aligned({**fake, v: w})), None)
        if word is None:
            raise TaskError(f"edge {edge}, trial {trial}: no made-up word among {len(words)} tokenizes like "
                            f"{real[v]!r} in the prompt; raise KnowledgeConfig.tries")
        fake[v] = word
    return [(clean_ids[pair], model.to_tokens("".join(_prompts(lines, cols, fake, pair)))[0],
             answer, NO if answer == YES else YES) for pair, answer in questions]


def knowledge_task(model: Any, problem: Problem, against: str = "S3",
                   config: KnowledgeConfig = KnowledgeConfig()) -> Task:
    """S1 prompts (clean) vs `against` prompts (corrupted) about the problem's true edges; see the
    module doc. Clean and corrupt tokens are [n, pos], aligned position by position."""
    if against not in AGAINST:
        raise ValueError(f"against must be one of {AGAINST}, got {against!r}")
    examples: list = []
    failures: list[str] = []
    for trial in range(config.trials):
        for edge in problem.edges:
            try:
                pair = _example(model, problem, edge, trial, against, config)
            except TaskError as error:  # a name no made-up word matches: this edge cannot be aligned
                failures.append(str(error))
                continue
            examples.append(pair)
    if not examples:
        raise TaskError(f"{problem.name}: no edge gives aligned S1/{against} prompts: " + "; ".join(failures))
    pairs = largest_same_length(examples, lambda pair: len(pair[0][0]))[: max(1, config.n // 2)]
    rows = [example for pair in pairs for example in pair]
    ids = {t: single_token(model, t) for t in (YES, NO)}
    clean = torch.stack([r[0] for r in rows])
    return Task(clean=clean, corrupt=torch.stack([r[1] for r in rows]),
                answer=torch.tensor([ids[r[2]] for r in rows]), wrong=torch.tensor([ids[r[3]] for r in rows]),
                name=f"{problem.name}_S1_vs_{against}",
                str_tokens=tuple(str_tokens(model, clean[0])))


def knowledge_effects(model: Any, problem: Problem, kinds: Sequence[str] = ("resid_pre", "z"),
                      against: str = "S3", config: KnowledgeConfig = KnowledgeConfig(),
                      layers: Sequence[int] | None = None, progress: bool | None = None,
                      per_position: bool | None = None, task: Task | None = None) -> list[Effects]:
    """Exact patching (clean S1 into the corrupted `against` run) over each kind's grid: layer x pos for
    block kinds, layer x head for heads (`per_position` as `grid` takes it). `layers` restricts the layer
    axis (default: every layer). `task` is `knowledge_task(model, problem, against, config)` when the
    caller already built it (the search for aligned made-up words takes a while)."""
    task = knowledge_task(model, problem, against, config) if task is None else task
    out = []
    for kind in kinds:
        effects = patch(model, task, grid(model, kind, task.n_pos, per_position=per_position, layers=layers),
                        progress=progress)
        effects.meta.update({"problem": problem.name, "against": against, "rows": config.rows})
        out.append(effects)
    return out
