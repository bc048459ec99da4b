"""The unpatched runs of a task: what every do-operator and every estimate starts from.

`unpatched(model, task, intervention, hooks)` runs the task's two sets of prompts once each: the *base*
run, the one the intervention acts on (`intervention.base_run`), and the *source* run, the other one,
whose activations the intervention may read. A `Runs` holds both runs' activations at the hooks asked
for and last-position logits, the clean run's next-token log-probabilities (the reference KL compares
with), both runs' per-example metrics, and the base run's metric gradients where asked. Patching,
attribution, edges, circuits and verification all take one.

Every last-position read is at each example's own last token (`Task.last`), so tasks whose prompts
differ in length run as right-padded batches.

Two engines run a batch: `Forward.cache` (a full forward that also records what each block receives, so
patched runs can resume mid-model) for exact patching, and `gradient_pass` (zero probes at the hooks,
logits only at the last position, an optional backward) for the gradient estimates.
"""

from contextlib import nullcontext
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Callable, Iterable, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechattr.forward import Forward, last_logits
from mechattr.graph import Edge
from mechattr.interventions import INTERVENTIONS, Intervention
from mechattr.models import device_of, final_hook
from mechattr.relevance import scale_edits_allowed
from mechattr.sites import Site, hook_name
from mechattr.tasks import Task

__all__ = ["Runs", "Pass", "unpatched", "gradient_pass", "readout", "other_run",
           "task_forward", "check_intervention"]


def other_run(run: str) -> str:
    """The other of the task's two runs: a base run's source."""
    if run not in ("clean", "corrupt"):
        raise ValueError(f"run must be 'clean' or 'corrupt', got {run!r}")
    return "clean" if run == "corrupt" else "corrupt"


def task_forward(model: Any, task: Task, run: str, resumable: bool = True) -> Forward:
    """Forwards of `task`'s `run` tokens, read out at each example's last token."""
    return Forward(model, task.tokens(run), resumable, last=task.last, positions=task.named_positions)


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


def readout(task: Task, reference: Float[Tensor, "n vocab"] | None) -> Callable[[Tensor], Tensor]:
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


@dataclass(frozen=True, eq=False)
class Runs:
    """Both unpatched runs of a task (see the module docstring). `metrics` maps "clean" and "corrupt" to
    per-example metrics [n]; `reference` is the clean run's last-position log-probabilities [n, vocab]."""

    model: Any
    task: Task
    base_run: str
    base: Pass
    source: Pass
    reference: Float[Tensor, "n vocab"]
    metrics: dict[str, Tensor]
    recorded: Forward | None = None  # the base run's forward, when it recorded the block inputs

    @classmethod
    def of(cls, model: Any, task: Task, base_run: str, base: Pass, source: Pass, reference: Tensor,
           recorded: Forward | None = None) -> "Runs":
        """Runs from two passes; both runs' metrics are read from their logits against `reference`."""
        logits = {base_run: base.logits, other_run(base_run): source.logits}
        metrics = {run: task.metric(lg, task.answer, task.wrong, reference) for run, lg in logits.items()}
        return cls(model, task, base_run, base, source, reference, metrics, recorded)

    @property
    def source_run(self) -> str:
        return other_run(self.base_run)

    @property
    def clean(self) -> Float[Tensor, " n"]:
        return self.metrics["clean"]

    @property
    def corrupt(self) -> Float[Tensor, " n"]:
        return self.metrics["corrupt"]

    @property
    def base_metric(self) -> Float[Tensor, " n"]:
        return self.metrics[self.base_run]

    @cached_property
    def forward(self) -> Forward:
        """Resumable forwards of the base run's tokens, for patched runs (`patching.run_cells`)."""
        return self.recorded or task_forward(self.model, self.task, self.base_run)

    def readout(self) -> Callable[[Tensor], Tensor]:
        """Per-row metric of stacked copies of the base run (see `readout`)."""
        return readout(self.task, self.reference)

    def value(self, intervention: Intervention, site: Site) -> Tensor:
        """intervention(base, source) at `site`: the value the do-operator sets it to, [n, *site]; at a
        named position, each example's activation at its own index of it."""
        check_intervention(self.task, intervention, [site])
        at = self.task.index_of(site.pos) if isinstance(site.pos, str) else None
        where = site.where(slice(0, self.task.n_examples), at)
        return intervention(self.base.acts[site.hook][where], self.source.acts[site.hook][where])

    def resid(self, layers: Iterable[int]) -> dict[str, Tensor]:
        """The base run's residual stream entering each block in `layers` (where patched runs resume)."""
        names = [hook_name("resid_pre", layer) for layer in layers]
        return {name: self.base.acts[name] for name in names}


def unpatched(model: Any, task: Task, intervention: Intervention, hooks: Sequence[str] = (), *,
              base_hooks: Sequence[str] = (), gradients: bool = False, optional: Sequence[str] = (),
              keep_graph: bool = False, resumable: bool = False, rules: Sequence[tuple[str, Callable]] = ()) -> Runs:
    """The base run (`intervention.base_run`) and the source run of `task`, with activations at `hooks`
    (both runs) and `base_hooks` (the base run only); `optional` hooks are recorded where the model fires
    them. `gradients`: d metric / d activation at every base-run hook (`keep_graph` keeps the graph for
    more backwards). `resumable`: exact patching's engine, which records the block inputs too. `rules`:
    hooks that change the base run's backward (`gradient_pass`)."""
    task = task.to(device_of(model))
    base_run = intervention.base_run
    source_run = other_run(base_run)
    base_names = sorted(set(hooks) | set(base_hooks))
    if resumable:
        if gradients:
            raise ValueError("unpatched: resumable runs take no gradients")
        recorded = task_forward(model, task, base_run)
        base_logits, base_acts = recorded.cache(base_names)
        source_logits, source_acts = task_forward(model, task, source_run, resumable=False).cache(hooks)
        base, source = Pass(None, base_logits, base_acts, {}, {}), Pass(None, source_logits, source_acts, {}, {})
        reference = (base if base_run == "clean" else source).logits.log_softmax(-1)
        return Runs.of(model, task, base_run, base, source, reference, recorded)
    source = gradient_pass(model, task.tokens(source_run), sorted(hooks), None, optional=optional, last=task.last)
    reference = source.logits.log_softmax(-1) if source_run == "clean" else None
    base = gradient_pass(model, task.tokens(base_run), base_names, readout(task, reference) if gradients else None,
                         optional=optional, keep_graph=keep_graph, last=task.last, rules=rules)
    if reference is None:
        reference = base.logits.log_softmax(-1)
    return Runs.of(model, task, base_run, base, source, reference)
