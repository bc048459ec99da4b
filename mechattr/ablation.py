"""Ablating everything outside a circuit, as ACDC evaluates circuits (Conmy et al. 2023).

`EdgeAblator`: every edge outside a circuit reads its sender's ablated value. Each receiver's input is
rebuilt from the current run: the residual it reads minus, for each ablated edge into it, the sender's
(current - ablated) contribution. K circuits run as K stacked copies of the batch in one forward.

`NodeAblator`: every node outside a circuit is set to its ablated value, the circuits run as patched
cells (`mechattr.cells`), resumed at their earliest ablated block.

Both take a model and a task, or (`EdgeAblator.of`, `NodeAblator.of`) unpatched runs shared with an
estimate (`discover` ranks and evaluates on one pair of runs).
"""

from typing import Any, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from mechattr.cells import run_cells
from mechattr.graph import (HEAD_INPUTS, Edge, all_edges, check_receivers, contributions, input_hook, n_inputs,
                            output_hook, receive, receiver_groups)
from mechattr.interventions import Intervention, Noise
from mechattr.models import model_shape
from mechattr.runs import Runs, check_intervention
from mechattr.sites import Site, hook_name
from mechattr.tasks import Task

__all__ = ["EdgeAblator", "NodeAblator"]

_COPIES = 4  # circuits per ablation run: each copy holds every sender's contribution


class _Ablation:
    """Hooks for one run of K stacked copies of the batch, copy k with the edges where `ablated[k]` is
    True set to their ablated senders' values: each receiver reads the current residual minus, for each
    ablated edge, the sender's (current - ablated) contribution."""

    def __init__(self, model: Any, send: list[Site], recv: list[Site], ablated: Tensor,
                 ablated_acts: dict[str, Tensor]):
        self.model, self.send, self.n_copies = model, send, ablated.shape[0]
        self.ablated_acts = ablated_acts  # sender hook -> ablated activation [n, ...]
        self.masks: dict[tuple[str, int], Tensor] = {}  # (kind, layer) -> (K, S, receivers) float
        for j, r in enumerate(recv):
            key = (r.kind, r.layer)
            width = n_inputs(model, r.kind) if r.kind in HEAD_INPUTS else 1
            mask = self.masks.setdefault(key, torch.zeros(self.n_copies, len(send), width, device=ablated.device))
            mask[:, :, r.head or 0] = ablated[:, :, j].float()
        self.sender_slots = {}
        for i, s in enumerate(send):
            self.sender_slots.setdefault(s.hook, []).append(i)
        self.diff: Tensor | None = None  # (K, n, P, S, d_model), filled as senders run
        self.resid: dict[int, Tensor] = {}

    def _removal(self, kind: str, layer: int) -> Tensor:
        """Sum of ablated senders' (current - ablated) contributions per receiver: (rows, P, width, d)."""
        removal = torch.einsum("knpsd,ksr->knprd", self.diff, self.masks[(kind, layer)])
        return removal.flatten(0, 1)

    def sender(self, site_hook: str):
        def hook(act, hook):
            k = self.n_copies
            if self.diff is None:
                n = act.shape[0] // k
                self.diff = act.new_zeros(k, n, act.shape[1], len(self.send), self.model.cfg.d_model)
            now = contributions(self.model, [self.send[i] for i in self.sender_slots[site_hook]], {site_hook: act})
            then = contributions(self.model, [self.send[i] for i in self.sender_slots[site_hook]],
                                  {site_hook: self.ablated_acts[site_hook]})  # (s, n, P, d)
            diff = now - then.repeat(1, k, 1, 1)
            self.diff[:, :, :, self.sender_slots[site_hook]] = diff.reshape(diff.shape[0], k, -1, *diff.shape[2:]
                                                                            ).permute(1, 2, 3, 0, 4)
        return hook

    def capture(self, layer: int):
        def hook(act, hook):
            self.resid[layer] = act
        return hook

    def head_receiver(self, kind: str, layer: int):
        def hook(act, hook):
            x = self.resid[layer][:, :, None] - self._removal(kind, layer)  # (rows, P, heads, d)
            return receive(self.model, kind, layer, x)
        return hook

    def residual_receiver(self, kind: str, layer: int):
        def hook(act, hook):
            return act - self._removal(kind, layer)[:, :, 0]
        return hook

    def hooks(self) -> list[tuple[str, Any]]:
        out = [(hook, self.sender(hook)) for hook in self.sender_slots]
        out += [(hook_name("resid_pre", layer), self.capture(layer))
                for layer in sorted({layer for kind, layer in self.masks if kind in HEAD_INPUTS})]
        for kind, layer in self.masks:
            if kind in HEAD_INPUTS:
                out.append((hook_name(kind, layer), self.head_receiver(kind, layer)))
            else:
                where = hook_name("mlp_in", layer) if kind == "mlp_out" else input_hook(kind, layer)
                out.append((where, self.residual_receiver(kind, layer)))
        return out


class EdgeAblator:
    """Evaluates edge circuits: the task metric of the base run (clean for `Noise`) with every edge outside
    a circuit ablated, its receiver reading the sender's `ablation` value (the corrupted run's for `Noise`)
    instead of the current one. `edges` is the graph (default: all edges of the model). The unpatched
    runs are cached once, so each call costs one forward per `_COPIES` circuits."""

    def __init__(self, model: Any, task: Task, ablation: Intervention = Noise(), edges: Sequence[Edge] | None = None):
        self._setup(Runs(model, task, ablation), edges)

    @classmethod
    def of(cls, runs: Runs, edges: Sequence[Edge] | None = None) -> "EdgeAblator":
        """An ablator on unpatched runs shared with other consumers; `runs.intervention` is the ablation."""
        ablator = cls.__new__(cls)
        ablator._setup(runs, edges)
        return ablator

    def _setup(self, runs: Runs, edges: Sequence[Edge] | None) -> None:
        model, task, ablation = runs.model, runs.task, runs.intervention
        self.model, self.task, self.runs = model, task, runs
        self.edges = list(all_edges(model) if edges is None else edges)
        check_intervention(task, ablation, self.edges)
        self.send = list(dict.fromkeys(e.sender for e in self.edges))
        self.recv = list(dict.fromkeys(e.receiver for e in self.edges))
        self.s_index = {s: i for i, s in enumerate(self.send)}
        self.r_index = {r: j for j, r in enumerate(self.recv)}
        # Head receivers are rebuilt by their receiver functions, which must reproduce the model's own.
        heads = {key: sites for key, sites in receiver_groups(model, self.edges).items() if key[0] in HEAD_INPUTS}
        checked = {name for kind, layer in heads for name in (input_hook(kind, layer), output_hook(kind, layer))}
        runs.record(sorted({s.hook for s in self.send}), base_hooks=sorted(checked))
        base, source = runs.base, runs.source
        check_receivers(model, heads, base.acts)
        self.values = {s.hook: ablation(base.acts[s.hook], source.acts[s.hook]) for s in self.send}

    def _mask(self, circuits: Sequence[set[Edge]]) -> Tensor:
        ablated = torch.zeros(len(circuits), len(self.send), len(self.recv), dtype=torch.bool,
                              device=self.runs.reference.device)
        for e in self.edges:
            ablated[:, self.s_index[e.sender], self.r_index[e.receiver]] = True
        for k, circuit in enumerate(circuits):
            for e in circuit:
                ablated[k, self.s_index[e.sender], self.r_index[e.receiver]] = False
        return ablated

    def __call__(self, circuits: Sequence[set[Edge]]) -> Float[Tensor, "circuit example"]:
        ablated = self._mask(circuits)
        row_metric = self.runs.row_metric()
        out = []
        for start in range(0, len(circuits), _COPIES):
            chunk = ablated[start:start + _COPIES]
            hooks = _Ablation(self.model, self.send, self.recv, chunk, self.values).hooks()
            logits = self.runs.forward.patched(chunk.shape[0], hooks)
            out.append(row_metric(logits).reshape(chunk.shape[0], -1))
        return torch.cat(out)


class NodeAblator:
    """Evaluates node circuits: the task metric [circuits, n] of the base run with every candidate node
    outside each circuit set to its `ablation` value, from one pair of unpatched runs (each call runs
    the circuits as patched cells, resumed at their earliest ablated block)."""

    def __init__(self, model: Any, task: Task, candidates: Sequence[Site], ablation: Intervention):
        self._setup(Runs(model, task, ablation), candidates)

    @classmethod
    def of(cls, runs: Runs, candidates: Sequence[Site]) -> "NodeAblator":
        """An ablator on unpatched runs shared with other consumers; `runs.intervention` is the ablation."""
        ablator = cls.__new__(cls)
        ablator._setup(runs, candidates)
        return ablator

    def _setup(self, runs: Runs, candidates: Sequence[Site]) -> None:
        # Cells never resume at block 0: the embedding runs before it, so an embed patch needs the full forward.
        self.layers = list(range(1, model_shape(runs.model)["n_layers"]))
        runs.record(sorted({s.hook for s in candidates}),
                    base_hooks=[hook_name("resid_pre", layer) for layer in self.layers], block_inputs=True)
        self.runs = runs
        self.values = {s: runs.value(s) for s in candidates}

    def __call__(self, circuits: Sequence[set[Site]]) -> Tensor:
        cells = [[(s, v) for s, v in self.values.items() if s not in circuit] for circuit in circuits]
        out = torch.empty(len(circuits), self.runs.task.n_examples, device=self.runs.reference.device)
        todo = [i for i, c in enumerate(cells) if c]
        out[[i for i, c in enumerate(cells) if not c]] = self.runs.base_metric  # nothing ablated: the base run
        if todo:
            out[todo] = run_cells(self.runs, [cells[i] for i in todo], self.layers, desc="circuits")
        return out
