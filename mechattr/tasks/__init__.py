"""Tasks: clean and corrupted prompts, the answer and wrong-answer tokens, and a metric.

Build one from text with `from_prompts`, from a JSONL file with `from_jsonl` (lines
`{"clean": str, "corrupt": str, "answer": str, "wrong": str}`, optionally `"positions": {name: index}`),
or by name from the registry `TASKS` (`ioi`, `facts`, `cause_effect`, `greater_than`, `ioi_distractor`)
with `by_name`. Examples may differ in token length; named positions align them (docs/tasks.md).

Modules: `task` (the type), `tokens` (tokenization), `jsonl`, `builtin` (IOI, facts), `cause_effect`,
`generated` (greater-than, IOI with distractors), `metrics`, `registry`.
"""

from mechattr.tasks.builtin import facts, ioi
from mechattr.tasks.cause_effect import cause_effect
from mechattr.tasks.generated import greater_than, ioi_distractor
from mechattr.tasks.jsonl import from_jsonl
from mechattr.tasks.metrics import METRICS, AnswerProb, KLToClean, LogitDiff, Metric, metric_by_name
from mechattr.tasks.registry import TASKS, by_name, split_examples, train_heldout
from mechattr.tasks.task import Task, TaskError
from mechattr.tasks.tokens import from_prompts, largest_same_length, single_token, str_tokens

__all__ = ["Task", "TaskError", "from_prompts", "from_jsonl", "ioi", "facts", "cause_effect", "greater_than",
           "ioi_distractor", "TASKS", "by_name", "train_heldout", "split_examples", "single_token", "str_tokens",
           "largest_same_length",
           "Metric", "LogitDiff", "AnswerProb", "KLToClean", "METRICS", "metric_by_name"]
