"""`mechattr curves`: budget curves on a task. At each budget, do the sites exact patching and AtP choose
train better than random sites of the same parameter count (and bottom-k, LoRA, full fine-tuning)?"""

import argparse
from pathlib import Path

from mechattr.cli.common import (UsageError, add_task_args, check_choice, choices_help, integers, load_model, names,
                                 positive)

__all__ = ["add"]


def _listed(values: tuple[int, ...]) -> str:
    return ",".join(str(v) for v in values)


def add(sub: argparse._SubParsersAction) -> None:
    from mechattr.finetune.budgets import UNIT_KINDS, BudgetPlan
    from mechattr.finetune.methods import BASELINES

    plan = BudgetPlan()
    c = sub.add_parser("curves", help="budget curves: attribution-selected sites against random ones of the same "
                                      "parameter count, with paired intervals and a verdict per budget")
    add_task_args(c)
    c.set_defaults(task="greater_than", n=512)  # n: examples of a task split by example (greater_than: its own)
    c.add_argument("--heldout", type=float, default=0.5,
                   help="share held out (a task with its own split, such as greater_than, splits its items)")
    c.add_argument("--heads", default=_listed(plan.heads), help="head budgets, comma-separated")
    c.add_argument("--neurons", action=argparse.BooleanOptionalAction, default=True,
                   help="also MLP-neuron budgets of the head budgets' parameter counts (--no-neurons: --units head)")
    c.add_argument("--units", default=",".join(UNIT_KINDS),
                   help=choices_help(UNIT_KINDS, "unit kinds trained, comma-separated") + "; heads are ranked "
                        "either way, since the head budgets set the neuron budgets' parameter counts (--units "
                        "neuron adds neuron budgets to a head comparison run before: `BudgetCurves.combine`)")
    c.add_argument("--seeds", default=_listed(plan.seeds), help="seeds of every point (batch order, random draws)")
    c.add_argument("--draws", type=int, default=plan.draws, help="random site sets per seed")
    c.add_argument("--baselines", default=",".join(plan.baselines),
                   help=choices_help(BASELINES, "comma-separated baselines besides exact- and AtP-selected sites"))
    c.add_argument("--steps", type=int, default=plan.config.steps, help="optimizer steps of every run")
    c.add_argument("--lr", type=float, default=plan.config.lr, help="learning rate of the sparse methods")
    c.add_argument("--full-lr", type=float, default=plan.full_lr, help="learning rate of full fine-tuning")
    c.add_argument("--batch-size", type=int, default=plan.config.batch_size, help="examples per step")
    c.add_argument("--rank-examples", type=int, default=32, help="training examples the sites are ranked on")
    c.add_argument("--exact-examples", type=int, default=None,
                   help="of those, the first N that exact patching ranks on (default: all); AtP ranks on all, and "
                        "random sites, drawn from the whole grid, read no ranking")
    c.add_argument("--heldout-examples", type=int, default=None, help="held-out examples scored (default: all)")
    c.add_argument("--shortlist", type=int, default=None,
                   help="neurons ranked exactly: AtP's top N (default: 2 x the largest neuron budget); a part run "
                        "at fewer budgets than an earlier one gives the earlier one's, to rank the same neurons")
    c.add_argument("--out", required=True, help="output directory: curves.json, curves.md, curves.png")
    c.set_defaults(run=cmd_curves)


def _plan(args: argparse.Namespace):
    from mechattr.finetune import TrainConfig
    from mechattr.finetune.budgets import BudgetPlan
    from mechattr.finetune.methods import BASELINES

    for option in ("--draws", "--steps", "--batch-size", "--rank-examples", "--exact-examples",
                   "--heldout-examples", "--shortlist"):
        positive(option, getattr(args, option[2:].replace("-", "_")))
    for name in names(args.baselines):
        check_choice("baseline", name, BASELINES)
    heads = integers("--heads", args.heads)
    if min(heads) < 1:
        raise UsageError(f"--heads are positive head counts, got {args.heads!r}")
    return BudgetPlan(heads=tuple(heads), seeds=tuple(integers("--seeds", args.seeds)), draws=args.draws,
                      baselines=tuple(names(args.baselines)), full_lr=args.full_lr,
                      config=TrainConfig(lr=args.lr, steps=args.steps, batch_size=args.batch_size))


def _units(args: argparse.Namespace) -> tuple[str, ...]:
    """The unit kinds `--units` names, less neurons under `--no-neurons`."""
    from mechattr.finetune.budgets import UNIT_KINDS

    units = names(args.units)
    for kind in units:
        check_choice("unit kind", kind, UNIT_KINDS)
    units = tuple(kind for kind in UNIT_KINDS if kind in units and (args.neurons or kind != "neuron"))
    if not units:
        raise UsageError(f"--units {args.units!r} with --no-neurons leaves no unit kind to train")
    return units


def cmd_curves(args: argparse.Namespace) -> None:
    from dataclasses import replace

    from mechattr import plots
    from mechattr.cli.finetune import split
    from mechattr.finetune.budgets import budget_curves
    from mechattr.finetune.ranking import rank_units
    from mechattr.plots.finetune import plot_budget_curves

    plan, units = _plan(args), _units(args)
    base = load_model(args)
    train_task, heldout = split(base, args)
    if args.heldout_examples is not None:
        heldout = heldout.subset(slice(0, args.heldout_examples))
    ranked = train_task.subset(slice(0, args.rank_examples))
    exact = "" if args.exact_examples is None or args.exact_examples >= ranked.n_examples else \
        f" (exact patching on the first {args.exact_examples})"
    print(f"ranking heads{' and neurons' if 'neuron' in units else ''} on {ranked.n_examples} of "
          f"{train_task.n_examples} training examples{exact}; training {' and '.join(units)} budgets; scoring on "
          f"{heldout.n_examples} held-out examples")
    rankings, neurons = rank_units(base, ranked, plan.heads, "neuron" in units, shortlist=args.shortlist,
                                   exact_examples=args.exact_examples, progress=True)
    if "neuron" in rankings:  # what a later part at fewer budgets passes to rank the same neurons
        print(f"neurons ranked exactly: AtP's top {len(rankings['neuron']['exact'].sites)} (--shortlist)")
    rankings = {kind: rankings[kind] for kind in units}
    curves = budget_curves(lambda: load_model(args), train_task, heldout, rankings, replace(plan, neurons=neurons))
    out = Path(args.out)
    curves.save(out)
    plots.save(plot_budget_curves(curves), out / "curves.png")
    print(curves.to_markdown())
    print("\n".join(curves.verdicts()))
    print(f"wrote {out}")
