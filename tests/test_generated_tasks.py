import re

import pytest
import torch

from mechattr.finetune.evaluation import task_scores
from mechattr.tasks import TASKS, by_name, train_heldout
from mechattr.tasks.generated import (SPLIT_SIZE, greater_than, greater_than_split, ioi_distractor,
                                      ioi_distractor_split)

pytestmark = pytest.mark.slow  # every test here tokenizes with SmolLM2's tokenizer

YEARS = re.compile(r"ended in the year (\d\d)(\d)(\d)\. It had begun in the year (\d\d)$")
PEOPLE = re.compile(r"^When (\w+), (\w+), (\w+) and (\w+) went to the \w+, (\w+), (\w+) and (\w+) gave a \w+ to$")


def _texts(model, task, run="clean"):
    # A task of one length holds no padding, so each row decodes to its prompt (after the BOS token).
    return [model.tokenizer.decode(row[1:].tolist()) for row in task.tokens(run)]


def _word(model, ids):
    return [model.tokenizer.decode([int(i)]) for i in ids]


def _same(a, b):
    return all(torch.equal(getattr(a, f), getattr(b, f)) for f in ("clean", "corrupt", "answer", "wrong"))


@pytest.mark.parametrize("build", [greater_than, ioi_distractor])
def test_seeded_and_deterministic(smollm2, build):
    assert _same(build(smollm2, n=16, seed=3), build(smollm2, n=16, seed=3))
    assert _same(by_name(smollm2, build.__name__, n=16, seed=3), build(smollm2, n=16, seed=3))
    assert not torch.equal(build(smollm2, n=16, seed=3).clean, build(smollm2, n=16, seed=4).clean)


@pytest.mark.parametrize("name,split", [("greater_than", greater_than_split), ("ioi_distractor", ioi_distractor_split)])
@pytest.mark.parametrize("heldout", [0.3, 0.5])
def test_splits_are_sized_seeded_and_registered(smollm2, name, split, heldout):
    train, held = train_heldout(smollm2, name, n=0, seed=1, heldout=heldout)
    assert TASKS[name].split is split
    assert train.n_examples == held.n_examples == SPLIT_SIZE >= 200
    assert all(_same(a, b) for a, b in zip((train, held), split(smollm2, 1, heldout)))
    for part in (train, held):  # distinct examples
        rows = {(tuple(c.tolist()), int(a), int(w)) for c, a, w in zip(part.clean, part.answer, part.wrong)}
        assert len(rows) == part.n_examples


def test_greater_than_answers_precede_the_end_year_and_centuries_are_disjoint(smollm2):
    train, held = greater_than_split(smollm2, seed=0, heldout=0.5)
    centuries = []
    for part in (train, held):
        clean, corrupt = _texts(smollm2, part), _texts(smollm2, part, "corrupt")
        answers, wrongs = _word(smollm2, part.answer), _word(smollm2, part.wrong)
        found = set()
        for c, k, a, w in zip(clean, corrupt, answers, wrongs):
            century, tens, units, begun = YEARS.search(c).groups()
            assert begun == century and c.startswith("The ")
            assert a.isdigit() and w.isdigit() and int(a) < int(tens) < int(w) <= int(tens) + 2
            assert k == c.replace(f"{century}{tens}{units}.", f"{century}99.")
            found.add(century)
        centuries.append(found)
    assert centuries[0].isdisjoint(centuries[1]) and len(centuries[0] | centuries[1]) == 9


def test_ioi_distractor_answer_is_the_name_left_out_and_names_are_disjoint(smollm2):
    train, held = ioi_distractor_split(smollm2, seed=0, heldout=0.5)
    names = []
    for part in (train, held):
        found = set()
        for c, k, a, w in zip(_texts(smollm2, part), _texts(smollm2, part, "corrupt"), _word(smollm2, part.answer),
                              _word(smollm2, part.wrong)):
            people = PEOPLE.match(c).groups()
            mentioned, givers = set(people[:4]), people[4:]
            assert len(mentioned) == 4 and set(givers) < mentioned
            assert a[0] == w[0] == " " and mentioned - set(givers) == {a[1:]} and w[1:] in givers
            corrupt_givers = PEOPLE.match(k).groups()[4:]
            assert mentioned - set(corrupt_givers) == {w[1:]}  # the corruption leaves out the wrong name
            found |= mentioned
        names.append(found)
    assert names[0].isdisjoint(names[1])


@pytest.mark.parametrize("name", ["greater_than", "ioi_distractor"])
def test_base_model_heldout_accuracy_leaves_room(smollm2, name):
    _, held = train_heldout(smollm2, name, n=0, seed=0, heldout=0.5)
    accuracy = task_scores(smollm2, held)["accuracy"]  # at the last position only: the vocabulary once per prompt
    assert 0.55 <= accuracy <= 0.85, f"{name}: held-out accuracy {accuracy:.3f}"
