"""`mechattr patch` and `mechattr attribute`: effects over grids of sites."""

import argparse
from pathlib import Path

from mechattr.cli.common import (add_grid_args, add_task_args, check_choice, choices_help, default, grids, is_writer,
                                 load, positive, write_effects)

__all__ = ["add"]


def add(sub: argparse._SubParsersAction) -> None:
    from mechattr.attribution import METHODS, attribute

    p = sub.add_parser("patch", help="exact activation patching over grids of sites")
    add_task_args(p)
    add_grid_args(p)
    p.set_defaults(run=cmd_patch)

    a = sub.add_parser("attribute", help="gradient estimates of patching for every site (same outputs as patch)")
    add_task_args(a)
    add_grid_args(a)
    a.add_argument("--method", default=default(attribute, "method"), help=choices_help(METHODS, "gradient estimate"))
    a.add_argument("--steps", type=int, default=default(attribute, "steps"), help="integration points for ig")
    a.set_defaults(run=cmd_attribute)


def _sweep(args: argparse.Namespace, compute) -> None:
    from tqdm.auto import tqdm

    model, task = load(args)
    todo = grids(model, task, args)
    # One step per site kind; `patch` also shows its batches. No bar when stderr is not a terminal.
    effects = [compute(model, task, g) for g in tqdm(todo, desc=args.command, unit="kind", disable=None)]
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
    from mechattr.interventions import by_name

    check_choice("attribution method", args.method, METHODS)
    positive("--steps", args.steps)
    options = {"method": args.method, "steps": args.steps, "intervention": by_name(args.intervention)}
    compute = distributed.attribute if args.distributed else mechattr.attribute
    _sweep(args, lambda model, task, g: compute(model, task, g, **options))
