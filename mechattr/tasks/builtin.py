"""Built-in tasks: indirect object identification (IOI) and factual recall with counterfactual subjects."""

import random
import string
from typing import Any

from mechattr.tasks.task import Task, TaskError
from mechattr.tasks.tokens import from_prompts, largest_same_length, token_index

__all__ = ["ioi", "facts", "IOI_TEMPLATES", "IOI_POSITIONS", "NAMES", "LANDMARKS"]

# {S} is the second mention of the subject: B in the clean prompt, A in the corrupted one. Templates
# may tokenize to different lengths; the named positions (IOI_POSITIONS) align them.
IOI_TEMPLATES = (
    "When {A} and {B} went to the {place}, {S} gave a {object} to",
    "After {A} and {B} went to the {place}, {S} gave a {object} to",
    "While {A} and {B} were at the {place}, {S} handed a {object} to",
    "When {A} and {B} arrived at the {place}, {S} passed a {object} to",
)
NAMES = ("Mary", "John", "Tom", "James", "Sarah", "Anna", "Paul", "Mark", "Lisa", "Emma", "David", "Kate",
         "Peter", "Alice", "Jane", "Michael", "Laura", "Daniel", "Rachel", "Susan", "Robert", "Helen",
         "George", "Amy", "Adam", "Emily", "Jack", "Grace")
PLACES = ("store", "park", "school", "office", "garden", "kitchen", "station", "beach", "hospital",
          "restaurant", "market", "library", "church", "house")
OBJECTS = ("drink", "book", "ring", "bag", "snack", "necklace", "pen", "ball", "letter", "gift", "key", "cup")

LANDMARKS = (
    ("The Eiffel Tower", "Paris"), ("The Colosseum", "Rome"), ("The Brandenburg Gate", "Berlin"),
    ("The Space Needle", "Seattle"), ("The Forbidden City", "Beijing"), ("The Parthenon", "Athens"),
    ("The Sydney Opera House", "Sydney"), ("The Hagia Sophia", "Istanbul"), ("The Kremlin", "Moscow"),
    ("The Acropolis", "Athens"), ("Tokyo Tower", "Tokyo"), ("The Louvre", "Paris"),
    ("Buckingham Palace", "London"), ("The Blue Mosque", "Istanbul"), ("The Charles Bridge", "Prague"),
    ("The Atomium", "Brussels"), ("The CN Tower", "Toronto"), ("Big Ben", "London"), ("The Vatican", "Rome"),
    ("Red Square", "Moscow"),
)
FACT_TEMPLATE = "{subject} is located in the city of"


def _check_n(task: str, n: int) -> None:
    if n < 1:
        raise TaskError(f"{task}: n must be a positive number of examples, got {n}")


# Named positions of every IOI example: the token ending each name slot, and the last token.
IOI_POSITIONS = {"IO": "A", "S1": "B", "S2": "S", "END": None}
_MAX_DRAWS = 100  # name pairs tried per example for two names of one token length


def _slot_ends(template: str, **values: str) -> tuple[str, dict[str, int]]:
    """The formatted template and, per field, the character index just past its value."""
    text, ends = "", {}
    for literal, field, _, _ in string.Formatter().parse(template):
        text += literal
        if field is not None:
            text += values[field]
            ends[field] = len(text)
    return text, ends


def _name_pair(model: Any, rng: random.Random) -> tuple[str, str]:
    """Two names of one token length (so the clean and corrupted prompts have one length)."""
    size = lambda name: model.to_tokens(" " + name, prepend_bos=False).shape[1]  # noqa: E731
    for _ in range(_MAX_DRAWS):
        a, b = rng.sample(NAMES, 2)
        if size(a) == size(b):
            return a, b
    raise TaskError(f"ioi: no two names of one token length in {_MAX_DRAWS} draws from {', '.join(NAMES)}")


def ioi(model: Any, n: int = 8, seed: int = 0, templates: tuple[str, ...] = IOI_TEMPLATES) -> Task:
    """IOI: "When Mary and John went to the store, John gave a drink to" -> " Mary" (answer) vs " John".

    The corrupted prompt swaps the second subject mention to the other name ("..., Mary gave a drink
    to"), which flips the answer, so the clean-minus-corrupted logit difference is large. Each example
    names its positions IO, S1, S2 (the last token of each name) and END (the last token).
    """
    _check_n("ioi", n)
    rng = random.Random(seed)
    rows, positions = [], []
    for _ in range(n):
        a, b = _name_pair(model, rng)
        slots = {"place": rng.choice(PLACES), "object": rng.choice(OBJECTS)}
        template = rng.choice(templates)
        clean, ends = _slot_ends(template, A=a, B=b, S=b, **slots)
        corrupt = template.format(A=a, B=b, S=a, **slots)
        rows.append((clean, corrupt, " " + a, " " + b))
        positions.append({name: -1 if slot is None else token_index(model, clean, ends[slot])
                          for name, slot in IOI_POSITIONS.items()})
    clean, corrupt, answer, wrong = map(list, zip(*rows))
    return from_prompts(model, clean, corrupt, answer, wrong, name="ioi", positions=positions)


def facts(model: Any, n: int = 8, seed: int = 0) -> Task:
    """Factual recall: "The Eiffel Tower is located in the city of" -> " Paris", corrupted by a
    counterfactual subject of the same token length whose city differs ("The Colosseum ..." -> " Rome").

    Uses the largest group of landmarks whose prompts share one token length under the model's tokenizer.
    """
    _check_n("facts", n)
    group = largest_same_length(LANDMARKS, lambda row: model.to_tokens(FACT_TEMPLATE.format(subject=row[0])).shape[1])
    if len({city for _, city in group}) < 2:
        raise TaskError("facts: no two landmarks with different cities tokenize to the same length")
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        subject, city = group[i % len(group)] if i < len(group) else rng.choice(group)
        other, other_city = rng.choice([(s, c) for s, c in group if c != city])
        rows.append((FACT_TEMPLATE.format(subject=subject), FACT_TEMPLATE.format(subject=other),
                     " " + city, " " + other_city))
    clean, corrupt, answer, wrong = map(list, zip(*rows))
    return from_prompts(model, clean, corrupt, answer, wrong, name="facts")
