"""What the commands share: task arguments, loading, site kinds, and writing effects with their plots."""

import argparse
import inspect
from pathlib import Path
from typing import Any, Callable, Sequence

__all__ = ["UsageError", "HelpFormatter", "default", "choices_help", "describe", "check_choice", "add_task_args",
           "add_grid_args", "positive", "names", "integers",
           "task_of", "load_model", "load", "kinds", "layers", "grids", "is_writer", "write_effects", "effects_from",
           "task_defaults"]

_DEFAULT_TASK, _DEFAULT_N, _DEFAULT_METRIC = "ioi", 8, "logit_diff"


class UsageError(Exception):
    """Bad input found by the command line itself."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Help that shows each option's default, except where there is none to show (None, a flag left off)
    or the help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def default(func: Callable, name: str) -> Any:
    """The default of `func`'s parameter `name`: an option's default is the library's, never a copy."""
    return inspect.signature(func).parameters[name].default


def choices_help(entries: dict[str, Any] | Sequence[str], what: str) -> str:
    """"what: a, b or c" from a registry's names, for an option's help."""
    names = list(entries)
    listed = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"
    return f"{what}: {listed}"


def describe(classes: dict[str, type]) -> str:
    """"name: first line of its docstring; ..." for a registry of classes, for an option's help."""
    return "; ".join(f"{name}: {cls.__doc__.strip().splitlines()[0].rstrip('.:')}" for name, cls in classes.items())


def add_task_args(p: argparse.ArgumentParser, defaults: bool = True) -> None:
    """--model, --task, --n, --seed, --metric, --device, --dtype. Without `defaults` the task arguments
    default to None, for commands that fill them from a saved result's metadata."""
    from mechattr.models import DEFAULT_MODEL
    from mechattr.tasks import METRICS, TASKS

    d = (lambda value: value) if defaults else (lambda value: None)
    saved = "" if defaults else " (default: as recorded with the saved effects)"
    p.add_argument("--model", default=d(DEFAULT_MODEL),
                   help=f"{DEFAULT_MODEL} (offline), a Hugging Face id, a .gguf file or a directory{saved}")
    p.add_argument("--task", default=d(_DEFAULT_TASK),
                   help="; ".join(f"{name}: {entry.help}" for name, entry in TASKS.items())
                   + f"; or a .jsonl file of {{clean, corrupt, answer, wrong}}{saved}")
    p.add_argument("--n", "--examples", dest="n", type=int, default=d(_DEFAULT_N),
                   help="examples for built-in tasks (under torchrun write --examples: it takes --n as its own)"
                   + saved)
    p.add_argument("--seed", type=int, default=d(0), help=f"seed for built-in tasks{saved}")
    p.add_argument("--metric", default=d(_DEFAULT_METRIC), help=describe(METRICS) + saved)
    p.add_argument("--device", default=None, help="where the model runs, e.g. cpu, cuda, cuda:1, mps (default: cpu)")
    p.add_argument("--dtype", default=None, help="weight dtype, e.g. float32, bfloat16, float16 (default: float32)")


def add_grid_args(p: argparse.ArgumentParser) -> None:
    from mechattr.interventions import INTERVENTIONS
    from mechattr.runs import DEFAULT_INTERVENTION
    from mechattr.sites import KINDS

    usable = {name: cls for name, cls in INTERVENTIONS.items() if cls.by_name_ok}
    p.add_argument("--sites", default="resid_pre,attn_out,mlp_out,z",
                   help=f"comma-separated site kinds, of: {', '.join(KINDS)}")
    p.add_argument("--intervention", default=DEFAULT_INTERVENTION.name,
                   help=choices_help(usable, "what a patched site is set to (see mechattr.interventions)"))
    p.add_argument("--per-position", action="store_true", help="head kinds get a position axis too")
    p.add_argument("--layers", default=None, help="comma-separated layers (default: all)")
    p.add_argument("--distributed", action="store_true",
                   help="share the sweep among the ranks of `torchrun --nproc-per-node N mechattr ...`")
    p.add_argument("--out", required=True, help="output directory")


def check_choice(what: str, value: str, entries: dict[str, Any] | Sequence[str]) -> None:
    """Raise a UsageError naming the valid entries unless `value` is one of them."""
    if value not in entries:
        raise UsageError(f"unknown {what} {value!r}; valid: {', '.join(entries)}")


def positive(name: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise UsageError(f"{name} must be a positive integer, got {value}")


def names(spec: str) -> list[str]:
    """The names of a comma-separated list."""
    return [name.strip() for name in spec.split(",") if name.strip()]


def integers(option: str, spec: str) -> list[int]:
    """The integers of a comma-separated list given to `option`."""
    try:
        values = [int(s) for s in spec.split(",") if s.strip()]
    except ValueError:
        raise UsageError(f"{option} must be comma-separated integers, got {spec!r}") from None
    if not values:
        raise UsageError(f"{option} names no value")
    return values


def task_of(model: Any, name: str, n: int, seed: int) -> Any:
    """A task of the registry by name, or from a .jsonl file."""
    from mechattr import tasks

    positive("--n", n)
    return tasks.by_name(model, name, n=n, seed=seed)


def load_model(args: argparse.Namespace) -> Any:
    """The model --model names, on --device in --dtype."""
    import mechattr

    return mechattr.load_model(args.model, device=args.device, dtype=args.dtype)


def load(args: argparse.Namespace) -> tuple[Any, Any]:
    """The model and the task (with its metric) that --model, --task, --n, --seed and --metric name."""
    model = load_model(args)
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

    return [mechattr.grid(model, kind, task.positions, per_position=args.per_position or None,
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

    # A task file is recorded by its absolute path, so the effects can be rebuilt from any folder.
    spec = str(Path(args.task).resolve()) if Path(args.task).is_file() else args.task
    save_effects(out, effects, model=args.model, task=task.name, task_spec=spec, n=task.n_examples, seed=args.seed)
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
    from mechattr.models import DEFAULT_MODEL

    fallback = {"model": DEFAULT_MODEL, "task": _DEFAULT_TASK, "n": _DEFAULT_N, "seed": 0, "metric": _DEFAULT_METRIC}
    saved = {"model": meta.get("model"), "task": meta.get("task_spec"), "n": meta.get("n"),
             "seed": meta.get("seed"), "metric": meta.get("metric")}
    for name in names:
        if getattr(args, name) is None:
            setattr(args, name, saved[name] if saved[name] is not None else fallback[name])
