"""A small masked training loop, extended by callbacks.

Only the entries a mask selects are trained, as one flat delta vector: after each step the weights at
those entries are set to base + delta (gathered and scattered by flat index), so every other entry is
never written and stays bit-identical, whatever the optimizer or weight decay. The optimizer, gradient
clipping and weight decay see only the delta: optimizer state scales with the trained entries, and
decay pulls the trained weights toward the base model's, not toward zero.

Coordinates: the trainer changes the weights of the model it is given, and the `Delta` records which
(`mechattr.finetune.delta.coordinates_of`). On a bridge from `mechattr.load_model(name)` (compatibility mode) it applies
to a model loaded the same way, not to the original checkpoint; on `mechattr.load_model(name,
compatibility=False)` it applies to the original checkpoint and can be exported
(`mechattr.finetune.export`).

The model stays in eval mode (no dropout), so a run is a deterministic function of the config's seed.
"""

import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import torch
from jaxtyping import Bool
from torch import Tensor
from tqdm.auto import tqdm

from mechattr.finetune.data import LOSSES, Data, Text, batch_indices, loss, tokens_of
from mechattr.finetune.delta import Delta, coordinates_of, probes_of
from mechattr.finetune.prefix import Prefix, first_block
from mechattr.models import device_of
from mechattr.selection import SiteSet
from mechattr.storage import write_torch

__all__ = ["TrainConfig", "TrainState", "FinetuneResult", "TrainedEntries", "Callback", "ProgressBar", "train",
           "save_checkpoint", "load_checkpoint", "optimizer_bytes"]


@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters of one fine-tuning run."""

    lr: float = 1e-3  # learning rate
    steps: int = 100  # optimizer steps
    batch_size: int = 8  # examples per step (at most the number of examples)
    weight_decay: float = 0.0  # decay of the delta: pulls trained weights toward the base model's
    max_grad_norm: float | None = 1.0  # clip the trained entries' gradient to this norm; None: never
    optimizer: str = "adamw"  # "adamw" (decoupled decay) or "sgd" (decay as an L2 term)
    momentum: float = 0.0  # SGD momentum
    loss: str = "ce"  # task loss, one of `data.LOSSES`: "ce" (answer cross-entropy) or "logit_diff"; Text: LM loss
    seed: int = 0  # batch order

    def __post_init__(self):
        if self.optimizer not in ("adamw", "sgd"):
            raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {self.optimizer!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"TrainConfig.loss: unknown task loss {self.loss!r}; valid: {', '.join(LOSSES)}")
        if self.steps < 0 or self.batch_size < 1:
            raise ValueError(f"need steps >= 0 and batch_size >= 1, got {self.steps} and {self.batch_size}")


class TrainedEntries:
    """The entries selected by a mask set, trained as one flat delta vector `delta`."""

    def __init__(self, model: Any, mask_set: dict[str, Bool[Tensor, "..."]]):
        params = dict(model.named_parameters())
        unknown = sorted(set(mask_set) - set(params))
        if unknown:
            raise KeyError(f"mask names {unknown[:3]} are not parameters of the model; e.g. {list(params)[:2]}")
        self.slots: list[tuple[str, Tensor, Tensor | None, int, int]] = []  # name, param, index, offset, n
        bases, offset = [], 0
        for name, param in params.items():
            mask = mask_set.get(name)
            if mask is None or not mask.any():
                continue
            if mask.shape != param.shape:
                raise ValueError(f"mask for {name!r} has shape {tuple(mask.shape)}, the parameter {tuple(param.shape)}")
            if not param.is_contiguous():
                raise ValueError(f"parameter {name!r} is not contiguous; flat indices cannot address it")
            # A full mask needs no index (full fine-tuning would otherwise store 8 bytes per entry).
            index = None if mask.all() else mask.flatten().nonzero().flatten()
            flat = param.detach().view(-1)
            bases.append(flat.clone() if index is None else flat[index].clone())
            self.slots.append((name, param, index, offset, bases[-1].numel()))
            offset += bases[-1].numel()
        if not self.slots:
            raise ValueError("the masks select no parameter entries; nothing to train")
        self.base = torch.cat(bases)  # (n_trained,) base values, in slot order
        self.delta = torch.zeros_like(self.base, requires_grad=True)  # (n_trained,)

    @property
    def n_trained(self) -> int:
        return self.delta.numel()

    def fingerprint(self) -> dict[str, Any]:
        """What a checkpoint must match: entries per parameter, and the base values' checksum."""
        return {"entries": {name: n for name, _, _, _, n in self.slots},
                "base_sum": float(self.base.double().cpu().sum())}  # CPU: the same sum wherever trained

    def write(self) -> None:
        """Weights at the trained entries := base + delta; nothing else is touched."""
        with torch.no_grad():
            for _, param, index, offset, n in self.slots:
                base, delta = self.base[offset: offset + n], self.delta[offset: offset + n]
                flat = param.data.view(-1)
                if index is None:
                    torch.add(base, delta, out=flat)
                else:
                    flat.index_copy_(0, index, base + delta)

    def collect_grad(self) -> None:
        """Gather the trained entries' gradients into `delta.grad` and drop the parameters' gradients."""
        grad = torch.empty_like(self.delta)  # (n_trained,)
        for _, param, index, offset, n in self.slots:
            if param.grad is None:  # the parameter did not reach the loss
                grad[offset: offset + n] = 0
            elif index is None:
                grad[offset: offset + n] = param.grad.reshape(-1)
            else:
                torch.index_select(param.grad.reshape(-1), 0, index, out=grad[offset: offset + n])
            param.grad = None
        self.delta.grad = grad

    def to_delta(self, sites: SiteSet, base_model: str, coordinates: str) -> Delta:
        """The trained entries as a `Delta` relative to the base weights, in `coordinates`."""
        values, indices, shapes, probes = {}, {}, {}, {}
        for name, param, index, offset, n in self.slots:
            values[name] = self.delta.detach()[offset: offset + n].clone()
            indices[name] = index
            shapes[name] = tuple(param.shape)
            probes[name] = probes_of(self.base[offset: offset + n], index)
        return Delta(values, indices, shapes, probes, sites, base_model, coordinates)


@dataclass
class TrainState:
    """What callbacks see: the model, the trained entries, the optimizer and the progress so far."""

    model: Any
    entries: TrainedEntries
    optimizer: torch.optim.Optimizer
    config: TrainConfig
    data: Data
    step: int = 0
    losses: list[float] = field(default_factory=list)  # training loss of every step so far
    layer: int | None = None  # the lowest block the trained entries can change (`prefix.first_block`)
    prefix: Prefix | None = None  # the base model's run of the data's tokens, when steps resume at `layer`


@dataclass(frozen=True, eq=False)
class FinetuneResult:
    """The outcome of `train`."""

    delta: Delta  # the trained entries (apply to a fresh base model to reproduce the weights)
    losses: tuple[float, ...]  # training loss per step, from step 0 (also across a resume)
    config: TrainConfig
    wall_s: float  # seconds spent in this call's training loop
    optimizer_bytes: int  # bytes of optimizer state

    @property
    def n_trained(self) -> int:
        return self.delta.n_trained


def _optimizer(delta: Tensor, config: TrainConfig) -> torch.optim.Optimizer:
    if config.optimizer == "adamw":
        return torch.optim.AdamW([delta], lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD([delta], lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)


def optimizer_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(v.numel() * v.element_size() for state in optimizer.state.values() for v in state.values()
               if torch.is_tensor(v))


class Callback:
    """Hooks into the loop; subclasses override what they need."""

    def on_start(self, state: TrainState) -> None:
        pass

    def on_step(self, state: TrainState) -> None:
        pass

    def on_end(self, state: TrainState) -> None:
        pass


class ProgressBar(Callback):
    """A tqdm bar over the steps, showing the last loss."""

    def on_start(self, state: TrainState) -> None:
        self.bar = tqdm(total=state.config.steps, initial=state.step, desc="fine-tuning", unit="step", leave=False)

    def on_step(self, state: TrainState) -> None:
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{state.losses[-1]:.4f}")

    def on_end(self, state: TrainState) -> None:
        self.bar.close()


def save_checkpoint(state: TrainState, path: str | Path) -> Path:
    """The delta, optimizer state, step and losses so far, written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"step": state.step, "losses": list(state.losses), "delta": state.entries.delta.detach().clone(),
               "optimizer": state.optimizer.state_dict(), "fingerprint": state.entries.fingerprint(),
               "config": asdict(state.config)}
    return write_torch(path, payload)


def load_checkpoint(state: TrainState, path: str | Path) -> None:
    """Continue `state` (built on the untrained base model) from a checkpoint of the same run."""
    payload = torch.load(Path(path), weights_only=False, map_location=state.entries.delta.device)
    expected, found = state.entries.fingerprint(), payload["fingerprint"]
    if expected["entries"] != found["entries"]:
        raise ValueError(f"checkpoint {path} trained other entries: {found['entries']} vs masks {expected['entries']}")
    if expected["base_sum"] != found["base_sum"]:
        raise ValueError(f"checkpoint {path}: the model's weights at the trained entries differ from the base the "
                         "checkpoint started from; resume on a fresh, untrained copy of the base model")
    # Only `steps` may change: a run can be extended, but other settings would change its history.
    differ = {k for k, v in asdict(state.config).items() if k != "steps" and payload["config"].get(k) != v}
    if differ:
        raise ValueError(f"checkpoint {path} was written with other settings for {sorted(differ)}: "
                         f"{ {k: payload['config'].get(k) for k in sorted(differ)} }")
    with torch.no_grad():
        state.entries.delta.copy_(payload["delta"])
    state.optimizer.load_state_dict(payload["optimizer"])
    state.step, state.losses = payload["step"], list(payload["losses"])
    state.entries.write()


def _step(state: TrainState) -> float:
    config, entries = state.config, state.entries
    index = batch_indices(state.data.n_examples, config.batch_size, config.seed, state.step)
    value = loss(state.model, state.data, index, config.loss, prefix=state.prefix, layer=state.layer)
    value.backward()
    entries.collect_grad()
    if config.max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_([entries.delta], config.max_grad_norm)
    state.optimizer.step()
    state.optimizer.zero_grad(set_to_none=True)
    entries.write()
    return float(value.detach())


def _on_model_device(data: Data, model: Any) -> Data:
    """`data` where the model's inputs go (its embedding's device); on one device the answers meet the
    logits there."""
    device = device_of(model)
    if isinstance(data, Text):
        return replace(data, tokens=data.tokens.to(device))
    return data.to(device)


def _resumable_prefix(model: Any, layer: int | None, data: Data, prefix: Prefix | None) -> Prefix | None:
    """The prefix steps resume from: `prefix` (shared by runs on the same base model) or a new one, once
    it proves usable on `model` at `layer`; None (full forwards) otherwise."""
    if layer is None:
        return None
    tokens, last = tokens_of(data)
    if prefix is None:
        prefix = Prefix(tokens, last)
    elif prefix.tokens.shape != tokens.shape or not torch.equal(prefix.tokens.to(tokens.device), tokens):
        raise ValueError(f"train: the prefix holds another batch ({tuple(prefix.tokens.shape)} tokens) than the "
                         f"training data ({tuple(tokens.shape)})")
    return prefix if prefix.usable(model, layer) else None


def train(model: Any, masks: dict[str, Bool[Tensor, "..."]], data: Data, config: TrainConfig = TrainConfig(),
          callbacks: Sequence[Callback] = (), *, resume: str | Path | None = None, progress: bool = True,
          sites: SiteSet | None = None, base_model: str | None = None, prefix: Prefix | None = None,
          skip_frozen: bool = True) -> FinetuneResult:
    """Train the entries `masks` selects on `data` for `config.steps` steps, in place.

    `callbacks` get `on_start(state)`, `on_step(state)` after every step and `on_end(state)`. `resume`
    is a checkpoint written by `Checkpoint`; the model must be the untrained base model. `sites` and
    `base_model` (default: the model's config name) are recorded in the returned delta.

    Steps run the blocks from the lowest one the trained entries sit in (`prefix.first_block`), on the
    residual the untrained model computes below it, each example's computed once (`prefix`, which runs
    of the same base model and data may share); the resumed path proves itself on the model first, else
    steps run full forwards. Only the positions the loss reads are unembedded. `skip_frozen=False` runs
    every block at every step (a reference path; the trained entries agree up to float rounding).
    """
    entries = TrainedEntries(model, masks)
    data = _on_model_device(data, model)
    layer = first_block(model, masks) if skip_frozen else None
    state = TrainState(model, entries, _optimizer(entries.delta, config), config, data, layer=layer,
                       prefix=_resumable_prefix(model, layer, data, prefix))
    if resume is not None:
        load_checkpoint(state, resume)
    callbacks = [*callbacks, *([ProgressBar()] if progress else [])]
    trained = {id(param) for _, param, _, _, _ in entries.slots}
    saved = {name: p.requires_grad for name, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in trained)  # no gradient work for frozen parameters
    start = time.perf_counter()
    try:
        for callback in callbacks:
            callback.on_start(state)
        while state.step < config.steps:
            state.losses.append(_step(state))
            state.step += 1
            for callback in callbacks:
                callback.on_step(state)
        for callback in callbacks:
            callback.on_end(state)
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(saved[name])
    wall = time.perf_counter() - start
    if base_model is None:
        base_model = str(getattr(getattr(model, "cfg", None), "model_name", ""))
    delta = entries.to_delta(sites or SiteSet(), base_model, coordinates_of(model))
    return FinetuneResult(delta=delta, losses=tuple(state.losses), config=config, wall_s=wall,
                          optimizer_bytes=optimizer_bytes(state.optimizer))
