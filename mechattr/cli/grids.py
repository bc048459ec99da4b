"""`mechattr patch`, `mechattr attribute` and `mechattr demo`: effects over grids of sites."""

import argparse
import time
from pathlib import Path

from mechattr.cli.common import add_grid_args, add_task_args, grids, is_writer, load, write_effects

__all__ = ["add"]


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("patch", help="exact activation patching over grids of sites")
    add_task_args(p)
    add_grid_args(p)
    p.set_defaults(run=cmd_patch)

    a = sub.add_parser("attribute", help="gradient estimates of patching for every site (same outputs as patch)")
    add_task_args(a)
    add_grid_args(a)
    a.add_argument("--method", default="atp", help="atp, atp* or ig")
    a.add_argument("--steps", type=int, default=8, help="integration points for ig")
    a.set_defaults(run=cmd_attribute)

    d = sub.add_parser("demo", help="IOI on smollm2-135m: grids, plots and a summary under runs/demo")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--n", type=int, default=8)
    d.set_defaults(run=cmd_demo)


def _sweep(args: argparse.Namespace, compute) -> None:
    model, task = load(args)
    effects = [compute(model, task, g) for g in grids(model, task, args)]
    if is_writer():
        for path in write_effects(Path(args.out), effects, args, task):
            print(path)


def cmd_patch(args: argparse.Namespace) -> None:
    import mechattr
    from mechattr import distributed
    from mechattr.interventions import by_name

    intervention = by_name(args.intervention)
    if args.distributed:
        _sweep(args, lambda model, task, g: distributed.patch(model, task, g, intervention))
    else:
        _sweep(args, lambda model, task, g: mechattr.patch(model, task, g, intervention))


def cmd_attribute(args: argparse.Namespace) -> None:
    import mechattr
    from mechattr import distributed
    from mechattr.attribution import METHODS
    from mechattr.cli.common import UsageError, positive
    from mechattr.interventions import by_name

    if args.method not in METHODS:
        raise UsageError(f"unknown attribution method {args.method!r}; valid: {', '.join(METHODS)}")
    positive("--steps", args.steps)
    options = {"method": args.method, "steps": args.steps, "intervention": by_name(args.intervention)}
    compute = distributed.attribute if args.distributed else mechattr.attribute
    _sweep(args, lambda model, task, g: compute(model, task, g, **options))


def cmd_demo(args: argparse.Namespace) -> None:
    import mechattr
    from mechattr import plots, tasks
    from mechattr.report import summary_markdown

    start = time.time()
    out = Path(args.out)
    model = mechattr.load_model("smollm2-135m")
    task = tasks.ioi(model, n=args.n, seed=0)
    effects = [mechattr.patch(model, task, mechattr.grid(model, kind, task.n_pos), mechattr.Denoise())
               for kind in ("resid_pre", "attn_out", "mlp_out", "z")]
    args = argparse.Namespace(model="smollm2-135m", task="ioi", n=args.n, seed=0)
    write_effects(out, effects, args, task)
    plots.save(plots.grids(effects[:3]), out / "blocks.png")
    (out / "summary.md").write_text(summary_markdown(effects, "smollm2-135m", task, time.time() - start))
    print(f"wrote {out}/summary.md, effects and plots in {time.time() - start:.0f} s")
