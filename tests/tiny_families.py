"""Tiny models of every family in `mechattr.families`, a task for them, and independent references:
one hook per forward for patching, a hand-written backward for AtP, hand-shifted inputs for an edge."""

from functools import partial

import torch
import torch.nn.functional as F

from mechattr.families import VOCAB
from mechattr.models import model_shape
from mechattr.sites import KINDS, Site, available_kinds
from mechattr.tasks import Task

N_EXAMPLES, N_POS = 3, 8
LATE = (5, 7)  # corrupted positions: patches there start late and reuse the prefix


def task() -> Task:
    """N_EXAMPLES random byte prompts whose corrupted copies differ at the LATE positions."""
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(0, 256, (N_EXAMPLES, N_POS), generator=g)
    corrupt = clean.clone()
    for pos in LATE:
        corrupt[:, pos] = torch.randint(0, 256, (N_EXAMPLES,), generator=g)
    answer, wrong = torch.randint(0, VOCAB, (2, N_EXAMPLES), generator=g)
    return Task(clean, corrupt, answer=answer, wrong=wrong, name="conformance")


def kinds(model) -> list[str]:
    """The site kinds `model` can be patched at (`available_kinds`), in `KINDS` order."""
    return available_kinds(model)


def sites(model, kind: str) -> list[Site]:
    """A few sites of `kind`, some at LATE positions only (so patched runs start late and reuse the
    prefix): positions 0 and LATE[1] in the last layer and LATE[0] in the first; for head kinds, head 0
    of the first layer at every position and the last head of the last layer at LATE[1]; neurons alike."""
    shape = model_shape(model)
    last = shape["n_layers"] - 1
    if kind == "embed":
        return [Site(kind, pos=p) for p in (0, *LATE)]
    if kind == "neuron":
        return [Site(kind, 0, neuron=0), Site(kind, last, pos=LATE[1], neuron=5)]
    if KINDS[kind].heads is None:
        return [Site(kind, last, pos=0), Site(kind, 0, pos=LATE[0]), Site(kind, last, pos=LATE[1])]
    n = shape["n_heads" if KINDS[kind].heads == "query" else "n_kv_heads"]
    return [Site(kind, 0, head=0), Site(kind, last, pos=LATE[1], head=n - 1)]


def _metric(t: Task, logits: torch.Tensor) -> torch.Tensor:
    return logits.gather(-1, t.answer[:, None])[:, 0] - logits.gather(-1, t.wrong[:, None])[:, 0]


def _activations(model, tokens, hooks) -> dict[str, torch.Tensor]:
    store = {}

    def save(name):
        def hook(act, hook):
            store[name] = act.detach().clone()
        return hook

    with torch.no_grad(), model.hooks(fwd_hooks=[(h, save(h)) for h in sorted(hooks)]):
        model(tokens)
    return store


def patch_reference(model, t: Task, sites: list[Site], base_run: str) -> torch.Tensor:
    """The metric per example, [site, n], with each site alone set to the other run's activation: one
    full forward and one hand-written hook per site, writing in place as TL's own patch setters do."""
    source = _activations(model, t.tokens("clean" if base_run == "corrupt" else "corrupt"), {s.hook for s in sites})
    out = []
    for site in sites:
        where = (slice(None),) + site.index
        value = source[site.hook][where]

        def hook(act, hook):
            act[where] = value
            return act

        with torch.no_grad(), model.hooks(fwd_hooks=[(site.hook, hook)]):
            out.append(_metric(t, model(t.tokens(base_run))[:, -1]))
    return torch.stack(out)


def atp_reference(model, t: Task, sites: list[Site], base_run: str, rules=()) -> torch.Tensor:
    """Base metric + (source - base activation) . d metric / d activation per site, [site, n]: the
    gradient at a zero tensor added at each hook (the bridge passes on a reshaped copy of what some
    hooks see, so the hooked tensor itself may not be in the graph), all in one forward and backward.
    `rules`: hooks run before the probes that change the backward (`relp_rules`)."""
    hooks = sorted({s.hook for s in sites})
    source = _activations(model, t.tokens("clean" if base_run == "corrupt" else "corrupt"), hooks)
    acts, probes = {}, {}

    def add_probe(name):
        def hook(act, hook):
            acts[name] = act.detach().clone()
            probes[name] = torch.zeros_like(act, requires_grad=True)
            return act + probes[name]
        return hook

    with torch.enable_grad(), model.hooks(fwd_hooks=[*rules, *[(h, add_probe(h)) for h in hooks]]):
        metric = _metric(t, model(t.tokens(base_run))[:, -1])
        grads = dict(zip(hooks, torch.autograd.grad(metric.sum(), [probes[h] for h in hooks], allow_unused=True)))
    out = []
    for site in sites:
        where = (slice(None),) + site.index
        grad = grads[site.hook]
        change = (source[site.hook] - acts[site.hook]) * (torch.zeros_like(acts[site.hook]) if grad is None else grad)
        out.append(metric.detach() + change[where].reshape(t.n_examples, -1).sum(-1))
    return torch.stack(out)


def relp_rules(model) -> list:
    """Relevance patching's rules written out by hand for one forward: every normalisation scale a
    constant in the backward; each MLP's activation differentiated as act(x) / x, and a gated MLP's
    product split half and half between act(gate) and up."""
    act = {"gelu": F.gelu, "silu": F.silu, "relu": F.relu, "gelu_new": partial(F.gelu, approximate="tanh"),
           "gelu_pytorch_tanh": partial(F.gelu, approximate="tanh"),
           "gelu_fast": partial(F.gelu, approximate="tanh")}[model.cfg.act_fn]
    gated = bool(getattr(model.cfg, "gated_mlp", False))
    names = list(model.hook_dict)
    saved = {}

    def constant(a, hook):
        return a.detach()

    def save(key):
        def hook(a, hook):
            saved[key] = a
            return a
        return hook

    def post(a, hook):
        pre = saved["pre"]
        slope = (act(pre) / pre).detach()  # no exactly-zero pre-activations in these random models
        if gated:
            up = saved["up"]
            new = 0.5 * act(pre).detach() * up + 0.5 * pre * slope * up.detach()
        else:
            new = pre * slope
        return a.detach() + new - new.detach()

    out = [(n, constant) for n in names if n.endswith("hook_scale")]
    for n in names:
        if n.endswith("mlp.hook_pre"):
            out.append((n, save("pre")))
        elif n.endswith("mlp.hook_pre_linear"):
            out.append((n, save("up")))
        elif n.endswith("mlp.hook_post"):
            out.append((n, post))
    return out


def edge_reference(model, t: Task, sender: Site, receiver: Site) -> torch.Tensor:
    """Denoising one edge by hand: the sender's clean-minus-corrupted write (through W_O for a head)
    added to the receiver's input only; for a head input, the shifted q/k/v kept for that head alone."""
    def act(tokens, name, hooks=()):
        store = {}

        def save(a, hook):
            store[name] = a.detach().clone()
        with torch.no_grad(), model.hooks(fwd_hooks=[*hooks, (name, save)]):
            model(tokens)
        return store[name]

    delta = act(t.clean, sender.hook) - act(t.corrupt, sender.hook)
    if sender.kind == "z":
        delta = delta[:, :, sender.head] @ model.blocks[sender.layer].attn.W_O[sender.head]
    if receiver.kind == "mlp_out":  # the MLP's input shifted; everything after it follows
        shift = (f"blocks.{receiver.layer}.ln2.hook_in", lambda a, hook: a + delta)
        with torch.no_grad(), model.hooks(fwd_hooks=[shift]):
            logits = model(t.corrupt)[:, -1]
        return t.metric(logits, t.answer, t.wrong, None)
    shift = (f"blocks.{receiver.layer}.ln1.hook_in", lambda a, hook: a + delta)
    shifted = act(t.corrupt, receiver.hook, [shift])

    def hook(a, hook):
        a = a.clone()
        a[:, :, receiver.head] = shifted[:, :, receiver.head]
        return a

    with torch.no_grad(), model.hooks(fwd_hooks=[(receiver.hook, hook)]):
        logits = model(t.corrupt)[:, -1]
    return t.metric(logits, t.answer, t.wrong, None)
