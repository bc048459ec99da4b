"""Generated tasks with room to improve: a base model of SmolLM2-135M's size gets most, not all, right.

Each task draws its examples from a grid of items and splits the items, not the examples, between
training and held-out: held-out accuracy then measures generalisation to items never trained on.

- `greater_than`: the years task of Hanna et al. (2023), "How does GPT-2 compute greater-than?", asked
  from the later year: "The war ended in the year 1732. It had begun in the year 17" -> a tens digit
  below 3 (answer) vs one just above (wrong). Items are centuries. SmolLM2 gets the forward form ("from
  the year 1732 to the year 17") almost always right; backwards it errs on about a quarter of prompts.
- `ioi_distractor`: IOI with four names, three of them givers: "When Mary, John, Tom and Anna went to
  the store, Tom, Anna and John gave a drink to" -> " Mary" vs one of the givers. Items are names.
  SmolLM2 gets the usual two-name IOI nearly always right, and about nine in ten with two givers.

Tokenizers that split numbers into digits (SmolLM2's does) make every digit its own token, so the
year's tens digit is a single-token answer; words are kept to those that are one token after a space,
so every example of a task has one token length.
"""

import random
from typing import Any, Callable, Hashable, Sequence

from mechattr.tasks.builtin import NAMES, OBJECTS, PLACES
from mechattr.tasks.task import Task, TaskError
from mechattr.tasks.tokens import from_prompts

__all__ = ["greater_than", "ioi_distractor", "greater_than_split", "ioi_distractor_split", "SPLIT_SIZE",
           "CENTURIES", "EVENTS", "GREATER_THAN_TEMPLATE", "IOI_DISTRACTOR_TEMPLATE"]

SPLIT_SIZE = 256  # examples on each side of a train/held-out split

GREATER_THAN_TEMPLATE = "The {event} ended in the year {century}{tens}{units}. It had begun in the year {century}"
CENTURIES = tuple(range(11, 20))  # the years 1100-1999
EVENTS = ("war", "reign", "drought", "famine", "project", "dynasty", "expedition", "strike", "siege", "journey")
NEAR = 2  # the wrong digit lies at most this far above the given tens digit
# The corrupted end year: every begin year of the century precedes it, so no tens digit is ruled out
# (the mirror of the "01" years that Hanna et al. corrupt with).
CORRUPT_YEAR_END = (9, 9)

IOI_DISTRACTOR_TEMPLATE = ("When {m0}, {m1}, {m2} and {m3} went to the {place}, {s0}, {s1} and {s2} gave a "
                           "{object} to")

Row = tuple[str, str, str, str]  # (clean, corrupt, answer, wrong)


def _one_token_words(model: Any, words: Sequence[str], what: str, at_least: int) -> tuple[str, ...]:
    """The words that are one token after a space, so that swapping them keeps a prompt's length."""
    kept = tuple(w for w in words if model.to_tokens(" " + w, prepend_bos=False).shape[1] == 1)
    if len(kept) < at_least:
        raise TaskError(f"only {len(kept)} of the {what} {list(words)} are one token after a space under this "
                        f"tokenizer; need at least {at_least}")
    return kept


def _check_digits(model: Any) -> None:
    """Digits as answers need a tokenizer that gives every digit of a number its own token."""
    merged = [d for d in range(10) if model.to_tokens(f"{d}{d}", prepend_bos=False).shape[1] != 2]
    if merged:
        raise TaskError(f"greater_than needs a tokenizer that splits numbers into single digits; it does not "
                        f"split {', '.join(f'{d}{d}' for d in merged)}")


def _draw(rng: random.Random, n: int, row: Callable[[random.Random], tuple[Hashable, Row]], task: str) -> list[Row]:
    """n distinct examples (by key) drawn with `row`; the error says how many distinct ones there are."""
    rows: dict[Hashable, Row] = {}
    for _ in range(50 * n):
        key, example = row(rng)
        rows.setdefault(key, example)
        if len(rows) == n:
            return list(rows.values())
    raise TaskError(f"{task}: drew only {len(rows)} distinct examples of the {n} asked for; use more items or "
                    "fewer examples")


def _build(model: Any, rows: list[Row], name: str) -> Task:
    clean, corrupt, answer, wrong = map(list, zip(*rows))
    lengths = {model.to_tokens(p).shape[1] for p in clean}
    if len(lengths) != 1:
        raise TaskError(f"{name}: prompts tokenize to {sorted(lengths)} tokens; every example needs one length")
    return from_prompts(model, clean, corrupt, answer, wrong, name=name)


def _check_n(task: str, n: int) -> None:
    if n < 1:
        raise TaskError(f"{task}: n must be a positive number of examples, got {n}")


def greater_than(model: Any, n: int = 8, seed: int = 0, centuries: Sequence[int] = CENTURIES,
                 name: str = "greater_than") -> Task:
    """Years backwards: "The war ended in the year 1732. It had begun in the year 17" -> a tens digit
    below 3 (answer) vs 4 or 5 (wrong), both drawn at random. The corrupted prompt ends in "1799"."""
    _check_n(name, n)
    _check_digits(model)
    events = _one_token_words(model, EVENTS, "events", 1)

    def row(rng: random.Random) -> tuple[Hashable, Row]:
        century, event = rng.choice(centuries), rng.choice(events)
        tens, units = rng.randint(1, 8), rng.randint(0, 9)  # 1-8: some digit lies on either side
        # The wrong digit lies just above the given one: SmolLM2 leans to digits near the given one, and a
        # wrong digit far above would let that lean alone rule it out.
        answer, wrong = rng.randint(0, tens - 1), rng.randint(tens + 1, min(9, tens + NEAR))
        clean = GREATER_THAN_TEMPLATE.format(event=event, century=century, tens=tens, units=units)
        corrupt = GREATER_THAN_TEMPLATE.format(event=event, century=century, tens=CORRUPT_YEAR_END[0],
                                               units=CORRUPT_YEAR_END[1])
        return (clean, answer, wrong), (clean, corrupt, str(answer), str(wrong))

    return _build(model, _draw(random.Random(seed), n, row, name), name)


def ioi_distractor(model: Any, n: int = 8, seed: int = 0, names: Sequence[str] = NAMES,
                   name: str = "ioi_distractor") -> Task:
    """IOI with four people, three of whom give: "When Mary, John, Tom and Anna went to the store, Tom,
    Anna and John gave a drink to" -> " Mary" (answer) vs one of the givers (wrong). The four names come
    in a random order, the givers too. The corrupted prompt names the answer among the givers in the
    wrong name's place, which makes the wrong name the one left out."""
    _check_n(name, n)
    names = _one_token_words(model, names, "names", 4)

    def row(rng: random.Random) -> tuple[Hashable, Row]:
        answer, *givers = rng.sample(names, 4)
        mentioned = rng.sample([answer, *givers], 4)
        rng.shuffle(givers)
        wrong = rng.choice(givers)
        slots = {"place": rng.choice(PLACES), "object": rng.choice(OBJECTS)}
        people = {f"m{i}": m for i, m in enumerate(mentioned)}
        swapped = [answer if g == wrong else g for g in givers]
        clean = IOI_DISTRACTOR_TEMPLATE.format(**people, **{f"s{i}": g for i, g in enumerate(givers)}, **slots)
        corrupt = IOI_DISTRACTOR_TEMPLATE.format(**people, **{f"s{i}": g for i, g in enumerate(swapped)}, **slots)
        return (clean, wrong), (clean, corrupt, " " + answer, " " + wrong)

    return _build(model, _draw(random.Random(seed), n, row, name), name)


def _split_items(items: Sequence[Any], heldout: float, seed: int, task: str,
                 at_least: int = 1) -> tuple[list[Any], list[Any]]:
    """(training, held-out) items: a seeded `heldout` share of them held out, `at_least` each side."""
    if not 0 < heldout < 1:
        raise TaskError(f"{task}: the held-out share must be between 0 and 1, got {heldout}")
    order = list(items)
    random.Random(seed).shuffle(order)
    n_held = min(max(at_least, round(heldout * len(order))), len(order) - at_least)
    return sorted(order[n_held:]), sorted(order[:n_held])


def greater_than_split(model: Any, seed: int, heldout: float, n: int = SPLIT_SIZE) -> tuple[Task, Task]:
    """`n` training and `n` held-out examples of `greater_than`, the centuries split between them."""
    train, held = _split_items(CENTURIES, heldout, seed, "greater_than")
    return (greater_than(model, n, seed, train, "greater_than_train"),
            greater_than(model, n, seed + 1, held, "greater_than_heldout"))


def ioi_distractor_split(model: Any, seed: int, heldout: float, n: int = SPLIT_SIZE) -> tuple[Task, Task]:
    """`n` training and `n` held-out examples of `ioi_distractor`, the names split between them."""
    names = _one_token_words(model, NAMES, "names", 8)
    train, held = _split_items(names, heldout, seed, "ioi_distractor", at_least=4)  # four names a prompt
    return (ioi_distractor(model, n, seed, train, "ioi_distractor_train"),
            ioi_distractor(model, n, seed + 1, held, "ioi_distractor_heldout"))
