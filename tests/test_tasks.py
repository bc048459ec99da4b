import json

import pytest
import torch

from mechattr import tasks
from mechattr.tasks import AnswerProb, KLToClean, LogitDiff, TaskError
from mechattr.tasks.builtin import IOI_TEMPLATES

pytestmark = pytest.mark.slow  # every test here tokenizes with SmolLM2's tokenizer


def test_metrics_against_hand_computation():
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.0, 3.0, 1.0]])
    answer, wrong = torch.tensor([0, 2]), torch.tensor([1, 1])
    reference = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]]).log_softmax(-1)
    torch.testing.assert_close(LogitDiff()(logits, answer, wrong, reference), torch.tensor([1.5, -2.0]))
    p = logits.softmax(-1)
    torch.testing.assert_close(AnswerProb()(logits, answer, wrong, reference), torch.stack([p[0, 0], p[1, 2]]))
    kl = KLToClean()(logits, answer, wrong, reference)
    expected = [(1 / 3 * (torch.log(torch.tensor(1 / 3)) - logits[i].log_softmax(-1))).sum() for i in range(2)]
    torch.testing.assert_close(kl, torch.stack(expected))
    assert float(KLToClean()(reference, answer, wrong, reference).abs().max()) < 1e-6


def test_ioi_prompts_are_aligned_and_answers_are_the_names(smollm2):
    task = tasks.ioi(smollm2, n=12, seed=1)
    assert task.clean.shape == task.corrupt.shape == (12, 15)
    differs = (task.clean != task.corrupt)
    assert differs.sum(0).nonzero().flatten().tolist() == [10]  # only the second subject mention moves
    decode = smollm2.tokenizer.decode
    for i in range(12):
        names = {decode([int(task.clean[i, 2])]), decode([int(task.clean[i, 4])])}
        assert {decode([int(task.answer[i])]), decode([int(task.wrong[i])])} == names
        assert decode([int(task.clean[i, 10])]) == decode([int(task.wrong[i])])  # clean: subject repeats
        assert decode([int(task.corrupt[i, 10])]) == decode([int(task.answer[i])])
    assert len(IOI_TEMPLATES) >= 4
    assert torch.equal(tasks.ioi(smollm2, n=12, seed=1).clean, task.clean)  # seeded


def test_ioi_and_facts_behave_on_smollm2(smollm2):
    for task, min_gap in ((tasks.ioi(smollm2, n=8), 4.0), (tasks.facts(smollm2, n=8), 1.0)):
        with torch.no_grad():
            clean = task.metric(smollm2(task.clean)[:, -1], task.answer, task.wrong, None)
            corrupt = task.metric(smollm2(task.corrupt)[:, -1], task.answer, task.wrong, None)
        assert float(clean.mean() - corrupt.mean()) > min_gap, task.name


def test_jsonl_loader(smollm2, tmp_path):
    path = tmp_path / "capitals.jsonl"
    rows = [{"clean": "The capital of France is", "corrupt": "The capital of Italy is", "answer": " Paris",
             "wrong": " Rome"},
            {"clean": "The capital of Spain is", "corrupt": "The capital of Japan is", "answer": " Madrid",
             "wrong": " Tokyo"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    task = tasks.from_jsonl(smollm2, path)
    assert task.name == "capitals" and task.n_examples == 2
    assert smollm2.tokenizer.decode([int(task.answer[1])]) == " Madrid"
    assert torch.equal(task.clean[0], smollm2.to_tokens("The capital of France is")[0])


def test_mismatched_lengths_name_the_example_counts_and_tokens(smollm2):
    with pytest.raises(TaskError, match=r"example 1: clean prompt is 6 tokens but corrupted prompt is 9") as info:
        tasks.from_prompts(smollm2, ["The capital of France is", "The capital of Spain is"],
                           ["The capital of Italy is", "The capital of Burkina Faso is"], [" Paris"] * 2, [" Rome"] * 2)
    assert "'aso'" in str(info.value)


def test_multi_token_answers_and_bad_files_are_named(smollm2, tmp_path):
    with pytest.raises(TaskError, match=r"example 0: the answer ' Ouagadougou' is \d+ tokens"):
        tasks.from_prompts(smollm2, ["The capital is"], ["The capital is"], [" Ouagadougou"], [" Rome"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"clean": "a", "corrupt": "b", "answer": " c"}\n')
    with pytest.raises(TaskError, match=r"bad.jsonl:1: each line must be an object with string fields"):
        tasks.from_jsonl(smollm2, bad)
    bad.write_text("{not json\n")
    with pytest.raises(TaskError, match=r"bad.jsonl:1: not valid JSON"):
        tasks.from_jsonl(smollm2, bad)
    with pytest.raises(TaskError, match="does not exist"):
        tasks.from_jsonl(smollm2, tmp_path / "missing.jsonl")
    with pytest.raises(TaskError, match="unknown task 'iou'; valid: ioi, facts"):
        tasks.by_name(smollm2, "iou")


@pytest.mark.parametrize("build, n", [(tasks.ioi, 0), (tasks.facts, -1)])
def test_built_in_tasks_refuse_a_non_positive_size(smollm2, build, n):
    with pytest.raises(TaskError, match=f"n must be a positive number of examples, got {n}"):
        build(smollm2, n=n)
