"""Component-level knowledge vs data: aligned S1/S3 and S1/S2 tasks, and patching over them."""

import pytest
import torch

import mechattr
from mechattr.causal import load
from mechattr.causal.components import KnowledgeConfig, knowledge_effects, knowledge_task, prompt_parts

CONFIG = KnowledgeConfig(rows=2, trials=1, n=4, tries=100)


@pytest.fixture(scope="module")
def asia():
    return load("asia", n_samples=50)


def _data_span(model, text: str) -> slice:
    """Token positions (with BOS) of the CSV data rows in a decoded prompt."""
    head_end = text.index("(CSV):\n") + len("(CSV):\n")
    header_end = text.index("\n", head_end) + 1
    rows_end = text.index("Question:")
    n_head = model.to_tokens(text[:header_end], prepend_bos=False).shape[1]
    n_rows = model.to_tokens(text[header_end:rows_end], prepend_bos=False).shape[1]
    return slice(n_head, n_head + n_rows)


@pytest.mark.slow
@pytest.mark.parametrize("against", ["S3", "S2"])
def test_knowledge_task_is_aligned(smollm2, asia, against):
    task = knowledge_task(smollm2, asia, against, CONFIG)
    assert task.clean.shape == task.corrupt.shape and task.n_examples >= 2
    yes, no = (smollm2.to_tokens(t, prepend_bos=False)[0, 0] for t in (" Yes", " No"))
    assert set(task.answer.tolist()) == {int(yes), int(no)}
    assert torch.equal(task.wrong, torch.where(task.answer == yes, no, yes))
    for i in range(task.n_examples):
        text = smollm2.tokenizer.decode(task.clean[i, 1:])
        span = _data_span(smollm2, text)
        assert span.stop > span.start
        differ = (task.clean[i] != task.corrupt[i]).nonzero().flatten()
        inside = (differ >= span.start) & (differ < span.stop)
        if against == "S3":  # names changed, data rows bit-identical
            assert torch.equal(task.clean[i, span], task.corrupt[i, span])
            assert len(differ) > 0 and not inside.any()
        else:  # only data values changed, all to '?'
            assert inside.all() and len(differ) > 0
            assert set(smollm2.tokenizer.decode([int(t)]) for t in task.corrupt[i, differ]) == {"?"}


def test_prompt_parts_split_at_header():
    import pandas as pd

    frame = pd.DataFrame({"a b": ["yes", "no"], "c": ["no", "no"]})
    head, body = prompt_parts(("a b", "c"), frame, 2, ("c", "a b"))
    assert head.endswith("a b,c\n") and body.startswith("yes,no\nno,no\n")
    assert body.endswith("Question: Does c cause a b? Answer:")


def test_prompts_from_written_rows_equal_prompts_from_the_frame():
    """The made-up-name search writes an example's rows once (`csv_rows`) and only renames: the text must
    be the frame's, with fewer rows than asked and with more."""
    import pandas as pd

    from mechattr.causal.prompts import csv_rows, describe

    frame = pd.DataFrame({"a b": ["yes", "no", "yes"], "c": [0.5, 1, "no"]})
    for n in (0, 2, 3, 5):
        assert describe(["a b", "c"], csv_rows(frame, n), n) == describe(["a b", "c"], frame, n)
        assert prompt_parts(("a b", "c"), csv_rows(frame, 3), n, ("c", "a b")) == prompt_parts(
            ("a b", "c"), frame, n, ("c", "a b"))
    assert describe(["a b", "c"], frame, 2).endswith("(CSV):\na b,c\nyes,0.5\nno,1\n")


@pytest.mark.slow
def test_knowledge_effects_equal_direct_patch(smollm2, asia):
    layers = [0, 29]
    (effects,) = knowledge_effects(smollm2, asia, kinds=("z",), against="S2", config=CONFIG, layers=layers)
    task = knowledge_task(smollm2, asia, "S2", CONFIG)
    direct = mechattr.patch(smollm2, task, mechattr.grid(smollm2, "z", task.n_pos, layers=layers))
    assert effects.values.shape == (2, smollm2.cfg.n_heads)
    torch.testing.assert_close(effects.values, direct.values, atol=1e-5, rtol=0)
    torch.testing.assert_close(effects.clean, direct.clean)
    assert effects.meta["against"] == "S2"
