"""Callbacks for `train`: checkpointing and evaluation hang off the loop instead of living inside it."""

from pathlib import Path

from mechattr.finetune.evaluation import task_scores
from mechattr.finetune.prefix import Prefix
from mechattr.finetune.trainer import Callback, TrainState, save_checkpoint
from mechattr.tasks import Task

__all__ = ["Checkpoint", "Evaluate"]


class Checkpoint(Callback):
    """Write a checkpoint to `path` every `every` steps and at the end; `train(..., resume=path)`
    continues from it to the same final weights as an uninterrupted run."""

    def __init__(self, path: str | Path, every: int = 50):
        if every < 1:
            raise ValueError(f"Checkpoint every must be >= 1, got {every}")
        self.path, self.every = Path(path), every

    def on_step(self, state: TrainState) -> None:
        if state.step % self.every == 0:
            save_checkpoint(state, self.path)

    def on_end(self, state: TrainState) -> None:
        save_checkpoint(state, self.path)


class Evaluate(Callback):
    """Record the task metric and accuracy on `task` (e.g. held-out examples) every `every` steps and
    at the start and end, as `history`: a list of (step, {"metric", "accuracy"}). Where the steps resume
    at a block, so does the scoring (from the untrained model's run of the task, computed at the start)."""

    def __init__(self, task: Task, every: int = 10):
        if every < 1:
            raise ValueError(f"Evaluate every must be >= 1, got {every}")
        self.task, self.every = task, every
        self.history: list[tuple[int, dict[str, float]]] = []
        self.prefix: Prefix | None = None

    def _record(self, state: TrainState) -> None:
        if not self.history or self.history[-1][0] != state.step:
            scores = task_scores(state.model, self.task, prefix=self.prefix, layer=state.layer)
            self.history.append((state.step, scores))

    def on_start(self, state: TrainState) -> None:
        if state.prefix is not None:  # training never changes the blocks below state.layer: any step's run serves
            self.task = self.task.to(next(state.model.parameters()).device)
            self.prefix = Prefix(self.task.clean, self.task.last)
        self._record(state)

    def on_step(self, state: TrainState) -> None:
        if state.step % self.every == 0:
            self._record(state)

    def on_end(self, state: TrainState) -> None:
        self._record(state)
