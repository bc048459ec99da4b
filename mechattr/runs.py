"""The unpatched runs of a task: what every do-operator and every estimate starts from.

`unpatched(model, task, intervention)` gives the task's two runs: the *base* run, the one the
intervention acts on (`intervention.base_run`), and the *source* run, the other one, whose activations
the intervention may read. A `Runs` records, when a consumer first asks, both runs' activations at the
hooks it needs and their last-position logits, the clean run's next-token log-probabilities (the
reference KL compares with) and both runs' per-example metrics. `patch`, `attribute`, `patch_edges`,
`discover` and `verify` take one (`patch(runs, sites)`), so several of them share the same runs.

Every last-position read is at each example's own last token (`Task.last`), so tasks whose prompts
differ in length run as right-padded batches.

Two engines run a batch: `Forward.cache` (a full forward that also records what each block receives, so
patched runs can resume mid-model, `mechattr.cells`) for exact patching, and `gradient_pass` (zero probes
at the hooks, logits only at the last position, an optional backward) for the gradient estimates.
"""

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechattr.forward import Forward, last_logits
from mechattr.graph import Edge
from mechattr.interventions import INTERVENTIONS, Denoise, Intervention
from mechattr.models import device_of, final_hook
from mechattr.relevance import scale_edits_allowed
from mechattr.sites import Site, hook_name
from mechattr.tasks import Task

__all__ = ["Runs", "Pass", "unpatched", "gradient_pass", "row_metric", "other_run", "task_forward",
           "check_intervention", "setup", "DEFAULT_INTERVENTION"]

DEFAULT_INTERVENTION = Denoise()  # what a site is set to when a call names no intervention


def other_run(run: str) -> str:
    """The other of the task's two runs: a base run's source."""
    if run not in ("clean", "corrupt"):
        raise ValueError(f"run must be 'clean' or 'corrupt', got {run!r}")
    return "clean" if run == "corrupt" else "corrupt"


def task_forward(model: Any, task: Task, run: str, resumable: bool = True) -> Forward:
    """Forwards of `task`'s `run` tokens, read out at each example's last token."""
    return Forward(model, task.tokens(run), resumable, last=task.last)


def check_intervention(task: Task, intervention: Intervention, units: Sequence[Site | Edge]) -> None:
    """Refuse what would read padding: on a task of mixed lengths, an intervention that is not
    examplewise (it combines examples, or depends on the batch) at a site spanning every position, or
    on an edge (an edge always spans every position)."""
    if not task.ragged or intervention.examplewise:
        return
    spanning = next((u for u in units if isinstance(u, Edge) or u.pos is None), None)
    if spanning is None:
        return
    valid = ", ".join(name for name, cls in INTERVENTIONS.items() if cls.examplewise)
    mixing = (f"{intervention.name!r} is not examplewise, and task {task.name!r} has prompts of different "
              "lengths, so at every position it would mix real tokens with padding")
    if isinstance(spanning, Edge):
        raise ValueError(f"edge {spanning}: {mixing}; an edge spans every position, so use an examplewise "
                         f"intervention ({valid})")
    raise ValueError(f"site {spanning}: {mixing}; use sites at named positions "
                     f"({', '.join(task.named_positions)}) or an examplewise intervention ({valid})")


def row_metric(task: Task, reference: Float[Tensor, "n vocab"] | None) -> Callable[[Tensor], Tensor]:
    """Turns last-position logits of stacked copies of the task, [copies * n, vocab], into the task metric
    per row, [copies * n]. `reference` None: each row's own (clean) distribution is the reference."""
    def read(logits):
        copies = logits.shape[0] // task.n_examples
        # .to: a model split over devices returns logits where its unembedding is, not where its inputs are.
        rep = lambda t: t.to(logits.device).repeat(copies, *([1] * (t.dim() - 1)))  # noqa: E731
        ref = logits.detach().log_softmax(-1) if reference is None else rep(reference)
        return task.metric(logits, rep(task.answer), rep(task.wrong), ref)
    return read


class _Stop(Exception):
    """Raised by the last block's hook: the metric needs only the last position's logits."""


@dataclass
class Pass:
    """One forward (and backward) of a batch: activations, metric per row, and metric gradients."""

    metric: Float[Tensor, " rows"] | None  # None without a backward
    logits: Float[Tensor, "rows vocab"]  # last position
    acts: dict[str, Tensor]  # hook name -> activation [rows, *act]
    grads: dict[str, Tensor]  # hook name -> d sum(metric) / d activation [rows, *act]
    live: dict[str, Tensor]  # hook name -> the graph's tensor (only with keep_graph)


def gradient_pass(model: Any, tokens: Int[Tensor, "rows pos"], names: Sequence[str],
                  metric: Callable[[Tensor], Tensor] | None, *, optional: Sequence[str] = (),
                  embed: Callable[[Tensor], Tensor] | None = None, keep_graph: bool = False,
                  last: Int[Tensor, " rows"] | None = None, rules: Sequence[tuple[str, Callable]] = ()) -> Pass:
    """Run `tokens` with a zero probe added at each hook in `names` and differentiate sum(metric(logits)).

    The gradient at a probe is the gradient at the activation, on every hook the model lets a hook
    rewrite (the bridge reshapes some activations before hooks see them, so `retain_grad` on the
    hooked tensor would not work). `metric` maps last-position logits [rows, vocab] to [rows]; rows do
    not interact, so the gradient of the sum is each row's own gradient; None = no backward (grads
    empty). Hooks in `optional` are recorded only if the model fires them. `embed` rewrites the token
    embeddings first (ig's path). With `keep_graph` the graph stays alive for more backwards. `last`
    is each row's last token index (None: position -1). `rules` are forward hooks added before the
    probes, that change what the backward computes (`mechattr.relevance.rules`).
    """
    final = final_hook(model)
    optional = [n for n in optional if n in model.hook_dict]
    names = list(dict.fromkeys([*names, *optional, final]))
    acts, probes, live = {}, {}, {}

    def probe(name):
        def hook(act, hook):
            if name == "hook_embed" and embed is not None:
                act = embed(act)
            acts[name] = act.detach()
            if metric is None:
                live[name] = act
            else:
                probes[name] = torch.zeros_like(act, requires_grad=True)
                live[name] = act + probes[name]
            if name == final:
                raise _Stop
            return live[name]
        return hook

    hooks = list(rules) + [(name, probe(name)) for name in names]
    if embed is not None and "hook_embed" not in names:
        hooks.append(("hook_embed", lambda act, hook: embed(act)))
    with torch.set_grad_enabled(metric is not None), model.hooks(fwd_hooks=hooks), \
            (scale_edits_allowed() if rules else nullcontext()):
        try:
            model(tokens)
        except _Stop:
            pass
        missing = set(names) - set(live) - set(optional)
        if missing:
            raise ValueError(f"the model has no hook point(s) {sorted(missing)}; check the site kinds")
        logits = last_logits(model, live[final], last).float()
        if metric is None:
            return Pass(None, logits, acts, {}, {})
        values = metric(logits)
        fired = [n for n in names if n in probes]
        grads = torch.autograd.grad(values.sum(), [probes[n] for n in fired], retain_graph=keep_graph,
                                    allow_unused=True)
    grads = {n: torch.zeros_like(acts[n]) if g is None else g for n, g in zip(fired, grads)}
    return Pass(values.detach(), logits.detach(), acts, grads, live if keep_graph else {})


class Runs:
    """Both unpatched runs of a task under `intervention` (see the module docstring), recorded lazily:
    nothing runs when a `Runs` is made; each consumer records the hooks it needs (`record`), and a hook
    not yet recorded costs one more forward of the run that lacks it. The base run's `Forward`, which
    patched runs resume from, belongs to the `Runs`; gradients are a separate pass (`gradients`).

    `metrics` maps "clean" and "corrupt" to per-example metrics [n]; `reference` is the clean run's
    last-position log-probabilities [n, vocab]."""

    def __init__(self, model: Any, task: Task, intervention: Intervention):
        self.model = model
        self.task = task.to(device_of(model))
        self.intervention = intervention
        self.forward = task_forward(model, self.task, self.base_run)  # records when block inputs are first asked for
        self._base: Pass | None = None
        self._source: Pass | None = None
        self._metrics: dict[str, Tensor] | None = None

    @property
    def base_run(self) -> str:
        return self.intervention.base_run

    @property
    def source_run(self) -> str:
        return other_run(self.base_run)

    def record(self, hooks: Iterable[str] = (), *, base_hooks: Iterable[str] = (), source_hooks: Iterable[str] = (),
               block_inputs: bool = False) -> "Runs":
        """Make the activations at `hooks` (both runs), `base_hooks` and `source_hooks` available, running a
        run again only where it lacks one. `block_inputs`: what the base run's blocks receive too, recorded by
        the runs' `Forward` (what patched runs resume from; on a model that cannot resume, nothing more)."""
        base_names, source_names = set(hooks) | set(base_hooks), set(hooks) | set(source_hooks)
        if source_names - _names(self._source):
            self._run_source(source_names)
        unrecorded = block_inputs and self.forward.resumable and not self.forward.block_kwargs
        if base_names - _names(self._base) or unrecorded:
            self._run_base(base_names, block_inputs)
        return self

    def _run_source(self, names: set[str] = frozenset()) -> Pass:
        logits, acts = task_forward(self.model, self.task, self.source_run, resumable=False).cache(
            sorted(names - _names(self._source)))
        self._source = _merged(self._source, logits, acts)
        return self._source

    def _run_base(self, names: set[str] = frozenset(), block_inputs: bool = False) -> Pass:
        forward = self.forward if block_inputs else task_forward(self.model, self.task, self.base_run, resumable=False)
        logits, acts = forward.cache(sorted(names - _names(self._base)))
        self._base = _merged(self._base, logits, acts)
        return self._base

    def gradients(self, hooks: Sequence[str], *, optional: Sequence[str] = (), keep_graph: bool = False,
                  rules: Sequence[tuple[str, Callable]] = ()) -> Pass:
        """A forward and backward of the base run (`gradient_pass`): activations at `hooks` (and `optional`
        ones where the model fires them) and d metric / d activation at each. A `Runs` that has not run its
        base run yet keeps this pass's activations and logits as its base run's."""
        reference = None if self.source_run == "corrupt" else self.reference
        run = gradient_pass(self.model, self.task.tokens(self.base_run), hooks, row_metric(self.task, reference),
                            optional=optional, keep_graph=keep_graph, last=self.task.last, rules=rules)
        if self._base is None:
            self._base = Pass(None, run.logits, dict(run.acts), {}, {})
        return run

    @property
    def base(self) -> Pass:
        """The base run's last-position logits and recorded activations."""
        return self._run_base() if self._base is None else self._base

    @property
    def source(self) -> Pass:
        return self._run_source() if self._source is None else self._source

    @property
    def reference(self) -> Float[Tensor, "n vocab"]:
        """The clean run's last-position log-probabilities (running only the clean run, if neither has run)."""
        clean = self.base if self.base_run == "clean" else self.source
        return clean.logits.log_softmax(-1)

    @property
    def metrics(self) -> dict[str, Tensor]:
        if self._metrics is None:
            logits = {self.base_run: self.base.logits, self.source_run: self.source.logits}
            reference = self.reference
            self._metrics = {run: self.task.metric(lg, self.task.answer, self.task.wrong, reference)
                             for run, lg in logits.items()}
        return self._metrics

    @property
    def clean(self) -> Float[Tensor, " n"]:
        return self.metrics["clean"]

    @property
    def corrupt(self) -> Float[Tensor, " n"]:
        return self.metrics["corrupt"]

    @property
    def base_metric(self) -> Float[Tensor, " n"]:
        return self.metrics[self.base_run]

    def row_metric(self) -> Callable[[Tensor], Tensor]:
        """Per-row metric of stacked copies of the base run (see `row_metric`)."""
        return row_metric(self.task, self.reference)

    def value(self, site: Site) -> Tensor:
        """intervention(base, source) at `site`: the value the do-operator sets it to, [n, *site]; at a
        named position, each example's activation at its own index of it."""
        check_intervention(self.task, self.intervention, [site])
        self.record([site.hook])
        where = site.where(slice(0, self.task.n_examples), self.task.index_at(site))
        return self.intervention(self.base.acts[site.hook][where], self.source.acts[site.hook][where])

    def resid(self, layers: Iterable[int]) -> dict[str, Tensor]:
        """The base run's residual stream entering each block in `layers` (where patched runs resume)."""
        names = [hook_name("resid_pre", layer) for layer in layers]
        self.record(base_hooks=names)
        return {name: self.base.acts[name] for name in names}


def _names(recorded: Pass | None) -> set[str]:
    return set() if recorded is None else set(recorded.acts)


def _merged(recorded: Pass | None, logits: Tensor, acts: dict[str, Tensor]) -> Pass:
    """A run's record with more activations; its logits are those of its first forward."""
    if recorded is None:
        return Pass(None, logits, acts, {}, {})
    return Pass(None, recorded.logits, {**recorded.acts, **acts}, {}, {})


def unpatched(model: Any, task: Task, intervention: Intervention = DEFAULT_INTERVENTION, hooks: Sequence[str] = (), *,
              base_hooks: Sequence[str] = (), block_inputs: bool = False) -> Runs:
    """The unpatched runs of `task` under `intervention`, to share between `patch`, `attribute`,
    `patch_edges`, `discover` and `verify`. Nothing runs until something is asked for: `hooks` (both runs),
    `base_hooks` and, with `block_inputs`, what the base run's blocks receive (patching resumes from it) are
    recorded now, and any other hook a consumer needs later costs one more forward of each run that lacks it."""
    runs = Runs(model, task, intervention)
    return runs.record(hooks, base_hooks=base_hooks, block_inputs=block_inputs)


def setup(model: Any, task: Any, units: Any, intervention: Intervention | None, consumer: str,
          default: Intervention = DEFAULT_INTERVENTION) -> tuple[Runs, Any]:
    """(runs, units) from either form of a consumer's call: `consumer(runs, units)`, on runs made by
    `unpatched` (and maybe shared), or `consumer(model, task, units, intervention=default)`."""
    if isinstance(model, Runs):
        if intervention is not None or isinstance(units, Intervention):
            raise TypeError(f"{consumer}(runs, ...): the runs carry the intervention ({model.intervention.name}), so "
                            "pass none again")
        if task is not None and units is not None:
            raise TypeError(f"{consumer}(runs, units): the runs carry the task, so pass the units alone")
        return model, units if task is None else task
    if not isinstance(task, Task):
        raise TypeError(f"{consumer}(model, task, ...) needs a Task second, got {type(task).__name__}; or call "
                        f"{consumer}(runs, ...) with runs = mechattr.unpatched(model, task, intervention)")
    return Runs(model, task, intervention or default), units
