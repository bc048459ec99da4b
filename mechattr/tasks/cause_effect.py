"""A task the base model is weak at but has the knowledge for: "Does A cause B?" -> " Yes" / " No".

SmolLM2-135M answers such Yes/No questions at chance while its sentence likelihoods rank the causal
direction of commonsense pairs mostly right, so fine-tuning has something to unlock. Every pair gives
two examples: the question in its causal direction (answer " Yes") and reversed (answer " No"); the
corrupted prompt is the other direction, which has the same tokens in another order. Train and
held-out examples are split by pair, so no held-out pair is seen in either direction during training.
"""

import random
from typing import Any

from mechattr.tasks.task import Task, TaskError
from mechattr.tasks.tokens import from_prompts, largest_same_length

__all__ = ["CAUSE_EFFECT_PAIRS", "CAUSE_EFFECT_TEMPLATE", "SPLITS", "cause_effect"]

# (cause, effect). Worded so that cause + effect is 3 tokens under SmolLM2's tokenizer: every prompt has
# one length and the corrupted (reversed) prompt aligns with the clean one.
CAUSE_EFFECT_PAIRS: tuple[tuple[str, str], ...] = (
    ("smoking", "lung cancer"), ("rain", "wet streets"), ("fire", "thick smoke"), ("exercise", "muscle growth"),
    ("overeating", "weight gain"), ("sunlight", "skin damage"), ("earthquakes", "tsunami waves"),
    ("viruses", "the flu"), ("drought", "crop failure"), ("speeding", "car crashes"), ("studying", "good grades"),
    ("heat", "melting ice"), ("stress", "tension headaches"), ("alcohol", "liver damage"),
    ("lightning", "forest fires"), ("wind", "ocean waves"), ("friction", "worn tires"), ("pollen", "hay fever"),
    ("bacteria", "food poisoning"), ("deforestation", "soil erosion"), ("coffee", "poor sleep"),
    ("sugar", "tooth decay"), ("vaccination", "fewer infections"), ("flooding", "property damage"),
    ("poverty", "child hunger"), ("cold", "frozen lakes"), ("gravity", "falling apples"),
    ("pollution", "dirty air"), ("mosquitoes", "malaria outbreaks"), ("inflation", "higher prices"),
    ("volcanoes", "ash clouds"), ("overfishing", "fish decline"), ("fertilizer", "plant growth"),
    ("insomnia", "daytime fatigue"), ("injury", "severe pain"), ("practice", "better skills"),
    ("storms", "power outages"), ("dehydration", "dry mouth"), ("wildfires", "burned forests"),
    ("snow", "school closures"), ("asbestos", "lung disease"), ("unemployment", "lower income"),
    ("germs", "the disease"), ("earthquakes", "collapsed buildings"), ("erosion", "muddy rivers"),
)
CAUSE_EFFECT_TEMPLATE = "Q: Does {a} cause {b}? Yes or no?\nA:"
SPLITS = ("train", "heldout", "all")  # which pairs `cause_effect` returns


def cause_effect(model: Any, split: str = "train", heldout: float = 0.3, seed: int = 0,
                 pairs: tuple[tuple[str, str], ...] = CAUSE_EFFECT_PAIRS) -> Task:
    """Yes/No causal-direction questions; `split` "train", "heldout" or "all" pairs, with a seeded
    split holding out a `heldout` share of the pairs. Two examples per pair (Yes, then No)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    # The largest group of pairs whose prompts share one token length under the model's tokenizer.
    usable = largest_same_length(
        pairs, lambda pair: model.to_tokens(CAUSE_EFFECT_TEMPLATE.format(a=pair[0], b=pair[1])).shape[1])
    if len(usable) < 4:
        raise TaskError(f"cause_effect: only {len(usable)} pairs share one prompt length under this tokenizer")
    order = list(range(len(usable)))
    random.Random(seed).shuffle(order)
    n_held = max(1, round(heldout * len(usable)))
    chosen = {"heldout": order[:n_held], "train": order[n_held:], "all": order}[split]
    rows = []
    for i in sorted(chosen):
        cause, effect = usable[i]
        forward = CAUSE_EFFECT_TEMPLATE.format(a=cause, b=effect)
        backward = CAUSE_EFFECT_TEMPLATE.format(a=effect, b=cause)
        rows += [(forward, backward, " Yes", " No"), (backward, forward, " No", " Yes")]
    clean, corrupt, answer, wrong = map(list, zip(*rows))
    return from_prompts(model, clean, corrupt, answer, wrong, name=f"cause_effect_{split}")
