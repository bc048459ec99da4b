"""What the commands share: task arguments, loading, site kinds, and writing effects with their plots."""

import argparse
from pathlib import Path
from typing import Any, Sequence

__all__ = ["UsageError", "add_task_args", "add_grid_args", "positive", "task_of", "load", "kinds", "layers", "grids",
           "is_writer", "write_effects", "effects_from", "task_defaults"]


class UsageError(Exception):
    """Bad input found by the command line itself."""


def add_task_args(p: argparse.ArgumentParser, defaults: bool = True) -> None:
    """--model, --task, --n, --seed, --metric. Without `defaults` they default to None, for commands that
    fill them from a saved result's metadata."""
    d = (lambda value: value) if defaults else (lambda value: None)
    p.add_argument("--model", default=d("smollm2-135m"),
                   help="smollm2-135m (offline), a Hugging Face id or a directory")
    p.add_argument("--task", default=d("ioi"),
                   help="ioi, facts, cause_effect, or a .jsonl file of {clean, corrupt, answer, wrong}")
    p.add_argument("--n", "--examples", dest="n", type=int, default=d(8),
                   help="examples for built-in tasks (under torchrun write --examples: it takes --n as its own)")
    p.add_argument("--seed", type=int, default=d(0), help="seed for built-in tasks")
    p.add_argument("--metric", default=d("logit_diff"), help="logit_diff, answer_prob or kl")


def add_grid_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sites", default="resid_pre,attn_out,mlp_out,z", help="comma-separated site kinds")
    p.add_argument("--intervention", default="denoise", help="denoise, noise, zero, mean, resample, gaussian")
    p.add_argument("--per-position", action="store_true", help="head kinds get a position axis too")
    p.add_argument("--layers", default=None, help="comma-separated layers (default: all)")
    p.add_argument("--distributed", action="store_true",
                   help="share the sweep among the ranks of `torchrun --nproc-per-node N mechattr ...`")
    p.add_argument("--out", required=True, help="output directory")


def positive(name: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise UsageError(f"{name} must be a positive integer, got {value}")


def task_of(model: Any, name: str, n: int, seed: int, split: str = "train") -> Any:
    """A task by name; `split` picks the training or held-out part of cause_effect."""
    from mechattr import tasks
    from mechattr.finetune import cause_effect

    positive("--n", n)
    if name not in ("ioi", "facts", "cause_effect") and not (name.endswith(".jsonl") or Path(name).exists()):
        raise UsageError(f"unknown task {name!r}; valid: ioi, facts, cause_effect, or a path to a .jsonl file")
    if name == "cause_effect":
        return cause_effect(model, split, seed=seed)
    return tasks.by_name(model, name, n=n, seed=seed)


def load(args: argparse.Namespace) -> tuple[Any, Any]:
    """The model and the task (with its metric) that --model, --task, --n, --seed and --metric name."""
    import mechattr

    model = mechattr.load_model(args.model)
    return model, task_of(model, args.task, args.n, args.seed).with_metric(args.metric)


def kinds(spec: str) -> list[str]:
    """Distinct site kinds from "z,mlp_out,...", in the order given."""
    from mechattr.sites import KINDS

    names = list(dict.fromkeys(k.strip() for k in spec.split(",") if k.strip()))
    unknown = [k for k in names if k not in KINDS]
    if unknown or not names:
        raise UsageError(f"unknown site kind(s) {', '.join(unknown) or '(none given)'}; "
                         f"valid kinds: {', '.join(KINDS)}")
    return names


def layers(spec: str | None) -> list[int] | None:
    if spec is None:
        return None
    try:
        return [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--layers must be comma-separated integers, got {spec!r}") from None


def grids(model: Any, task: Any, args: argparse.Namespace) -> list:
    """The full grid of every kind in --sites, restricted to --layers."""
    import mechattr

    return [mechattr.grid(model, kind, task.n_pos, per_position=args.per_position or None,
                          layers=layers(args.layers)) for kind in kinds(args.sites)]


def is_writer() -> bool:
    """Rank 0 of a process group, or the only process."""
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def write_effects(out: Path, effects: list, args: argparse.Namespace, task: Any) -> list[Path]:
    """effects.safetensors, effects.json (with the task's name, size and seed, so `verify` and `finetune`
    can rebuild it) and one heatmap PNG per kind; returns the PNG paths."""
    from mechattr import plots
    from mechattr.effects import save_effects

    save_effects(out, effects, model=args.model, task=task.name, task_spec=args.task, n=args.n, seed=args.seed)
    paths = []
    for e in effects:
        path = out / f"{e.kind}.png"
        plots.save(plots.heatmap(e).figure, path)
        paths.append(path)
    return paths


def effects_from(path: str, kind_spec: str | None = None) -> list:
    """The grids saved at `path` (a directory or its effects.safetensors), optionally only `kind_spec`."""
    from mechattr.effects import load_effects

    directory = Path(path)
    if directory.name == "effects.safetensors":
        directory = directory.parent
    saved = load_effects(directory)
    if kind_spec is None:
        return list(saved.values())
    wanted = kinds(kind_spec)
    missing = [k for k in wanted if k not in saved]
    if missing:
        raise UsageError(f"{directory} has no {', '.join(missing)} grid; it holds: {', '.join(saved)}")
    return [saved[k] for k in wanted]


def task_defaults(args: argparse.Namespace, meta: dict[str, Any], names: Sequence[str]) -> None:
    """Fill the task arguments left unset from a saved result's metadata, then from the usual defaults."""
    fallback = {"model": "smollm2-135m", "task": "ioi", "n": 8, "seed": 0, "metric": "logit_diff"}
    saved = {"model": meta.get("model"), "task": meta.get("task_spec"), "n": meta.get("n"),
             "seed": meta.get("seed"), "metric": meta.get("metric")}
    for name in names:
        if getattr(args, name) is None:
            setattr(args, name, saved[name] if saved[name] is not None else fallback[name])
