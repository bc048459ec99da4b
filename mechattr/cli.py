"""The `mechattr` command line: `patch`, `demo`.

Every command reports bad input (unknown kind, layer out of range, mismatched lengths, missing model)
as one paragraph on stderr and exit status 2, never a traceback (MECHATTR_DEBUG=1 shows it).
"""

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

__all__ = ["main"]

EXIT_BAD_INPUT = 2


class UsageError(Exception):
    """Bad input found by the command line itself."""


def _add_task_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m", help="smollm2-135m (offline), a Hugging Face id or a directory")
    p.add_argument("--task", default="ioi", help="ioi, facts, or a .jsonl file of {clean, corrupt, answer, wrong}")
    p.add_argument("--n", type=int, default=8, help="examples for built-in tasks")
    p.add_argument("--seed", type=int, default=0, help="seed for built-in tasks")
    p.add_argument("--metric", default="logit_diff", help="logit_diff, answer_prob or kl")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mechattr", description="Causal attribution for transformers.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("patch", help="exact activation patching over grids of sites")
    _add_task_args(p)
    p.add_argument("--sites", default="resid_pre,attn_out,mlp_out,z", help="comma-separated site kinds")
    p.add_argument("--intervention", default="denoise", help="denoise, noise, zero, mean, resample, gaussian")
    p.add_argument("--per-position", action="store_true", help="head kinds get a position axis too")
    p.add_argument("--layers", default=None, help="comma-separated layers (default: all)")
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(run=cmd_patch)

    d = sub.add_parser("demo", help="IOI on smollm2-135m: grids, plots and a summary under runs/demo")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--n", type=int, default=8)
    d.set_defaults(run=cmd_demo)
    return parser


def _load(args: argparse.Namespace) -> tuple[Any, Any]:
    import mechattr
    from mechattr import tasks

    model = mechattr.load_model(args.model)
    task = tasks.by_name(model, args.task, n=args.n, seed=args.seed).with_metric(args.metric)
    return model, task


def _kinds(spec: str) -> list[str]:
    from mechattr.sites import KINDS

    kinds = [k.strip() for k in spec.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise UsageError(f"unknown site kind(s) {', '.join(unknown) or '(none given)'}; "
                         f"valid kinds: {', '.join(KINDS)}")
    return kinds


def _layers(spec: str | None) -> list[int] | None:
    if spec is None:
        return None
    try:
        return [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--layers must be comma-separated integers, got {spec!r}") from None


def run_grids(model: Any, task: Any, kinds: Sequence[str], intervention: Any, per_position: bool = False,
              layers: Sequence[int] | None = None) -> list:
    """Exact patching over the full grid of each kind."""
    import mechattr

    return [mechattr.patch(model, task, mechattr.grid(model, kind, task.n_pos, per_position=per_position or None,
                                                       layers=layers), intervention)
            for kind in kinds]


def write_outputs(out: Path, effects: list, model_name: str, task: Any) -> list[Path]:
    """effects.safetensors, effects.json and one PNG per kind; returns the PNG paths."""
    from mechattr import plots
    from mechattr.effects import save_effects

    save_effects(out, effects, model=model_name, task=task.name)
    paths = []
    for e in effects:
        path = out / f"{e.kind}.png"
        plots.save(plots.heatmap(e).figure, path)
        paths.append(path)
    return paths


def cmd_patch(args: argparse.Namespace) -> None:
    from mechattr.interventions import by_name

    kinds = _kinds(args.sites)
    intervention = by_name(args.intervention)
    model, task = _load(args)
    effects = run_grids(model, task, kinds, intervention, args.per_position, _layers(args.layers))
    for path in write_outputs(Path(args.out), effects, args.model, task):
        print(path)


def cmd_demo(args: argparse.Namespace) -> None:
    import mechattr
    from mechattr import plots, tasks
    from mechattr.report import summary_markdown

    start = time.time()
    out = Path(args.out)
    model = mechattr.load_model("smollm2-135m")
    task = tasks.ioi(model, n=args.n, seed=0)
    effects = run_grids(model, task, ["resid_pre", "attn_out", "mlp_out", "z"], mechattr.Denoise())
    write_outputs(out, effects, "smollm2-135m", task)
    plots.save(plots.grids(effects[:3]), out / "blocks.png")
    (out / "summary.md").write_text(summary_markdown(effects, "smollm2-135m", task, time.time() - start))
    print(f"wrote {out}/summary.md, effects and plots in {time.time() - start:.0f} s")


def _bad_input_types() -> tuple[type, ...]:
    from mechattr.models import ModelNotAvailable
    from mechattr.tasks import TaskError

    # OSError: output paths that name a file, unwritable directories.
    return (UsageError, ValueError, KeyError, OSError, ModelNotAvailable, TaskError)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    run: Callable[[argparse.Namespace], None] = args.run
    try:
        run(args)
    except _bad_input_types() as error:
        if os.environ.get("MECHATTR_DEBUG"):
            raise
        message = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
        print(f"mechattr {args.command}: error: {message}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


if __name__ == "__main__":
    sys.exit(main())
