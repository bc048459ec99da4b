"""The task registry, with a word-level tokenizer (fast: no model): every named task is built by
`by_name`, the command line accepts the same names, and `train_heldout` splits each task its own way."""

import re

import pytest
import torch

from mechattr.cli.common import task_of
from mechattr.tasks import (TASKS, Task, TaskError, by_name, cause_effect, facts, ioi, ioi_distractor, split_examples,
                            train_heldout)


class _Words:
    """A stand-in for a model's tokenizer: each word with its leading space is one token; BOS is 0."""

    def __init__(self):
        self.vocab = {"<bos>": 0}
        self.tokenizer = self

    def to_tokens(self, text: str, prepend_bos: bool = True) -> torch.Tensor:
        words = re.findall(r" ?[^ ]+", text)
        ids = [self.vocab.setdefault(w, len(self.vocab)) for w in words]
        return torch.tensor([([0] if prepend_bos else []) + ids])

    def decode(self, ids: list[int]) -> str:
        words = {i: w for w, i in self.vocab.items()}
        return "".join(words[i] for i in ids)


@pytest.fixture
def words():
    return _Words()


def test_every_registered_task_is_built_by_name_as_its_own_builder_builds_it(words):
    direct = {"ioi": ioi(words, n=6, seed=3), "facts": facts(words, n=6, seed=3),
              "cause_effect": cause_effect(words, "train", seed=3), "ioi_distractor": ioi_distractor(words, n=6, seed=3)}
    # greater_than needs a tokenizer that splits numbers into digits: tests/test_generated_tasks.py covers it.
    assert set(TASKS) == set(direct) | {"greater_than"}
    for name, want in direct.items():
        got = by_name(words, name, n=6, seed=3)
        assert got.name == want.name and torch.equal(got.clean, want.clean) and torch.equal(got.answer, want.answer)
        assert torch.equal(task_of(words, name, 6, 3).corrupt, want.corrupt)  # the command line's lookup
    with pytest.raises(TaskError, match="unknown task 'iou'; valid: ioi, facts, cause_effect, greater_than, ioi_distractor, or a path"):
        by_name(words, "iou")


def test_train_heldout_splits_cause_effect_by_pair_and_other_tasks_by_example(words):
    train, held = train_heldout(words, "cause_effect", n=0, seed=1, heldout=0.3)
    assert (train.name, held.name) == ("cause_effect_train", "cause_effect_heldout")
    pairs = lambda t: {frozenset(map(int, row)) for row in t.clean}  # noqa: E731  (a pair's two prompts share tokens)
    assert not pairs(train) & pairs(held)
    task = ioi(words, n=10, seed=4)  # what by_name(words, "ioi", 10, 4) builds
    train, held = train_heldout(words, "ioi", n=10, seed=4, heldout=0.3)
    assert (train.n_examples, held.n_examples) == (7, 3)
    rows = {tuple(r.tolist()) for r in task.clean}
    assert {tuple(r.tolist()) for r in torch.cat([train.clean, held.clean])} == rows
    order = torch.randperm(10, generator=torch.Generator().manual_seed(4)).tolist()
    assert torch.equal(held.clean, task.clean[sorted(order[:3])])  # the seeded split the CLI always made
    with pytest.raises(TaskError, match="leaves no training or no held-out example"):
        split_examples(task.subset([0, 1]), 0.1, seed=0)


def test_task_to_moves_every_tensor_and_keeps_the_rest():
    task = Task(torch.tensor([[1, 2]]), torch.tensor([[1, 3]]), torch.tensor([4]), torch.tensor([5]), name="t")
    moved = task.to("meta")
    assert all(t.device.type == "meta" for t in (moved.clean, moved.corrupt, moved.answer, moved.wrong))
    assert (moved.name, moved.metric, moved.str_tokens) == (task.name, task.metric, task.str_tokens)
    same = task.to(torch.device("cpu"))
    assert torch.equal(same.clean, task.clean) and torch.equal(same.wrong, task.wrong)
