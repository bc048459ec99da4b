"""`mechattr verify` (estimate, then check by exact patching) and `mechattr discover` (circuits)."""

import argparse
from pathlib import Path

from mechattr.cli.common import (UsageError, add_task_args, check_choice, choices_help, effects_from, load, positive,
                                 task_defaults)

__all__ = ["add"]


def _ablations() -> list[str]:
    """The interventions circuit discovery can ablate with, from the registry."""
    from mechattr.interventions import INTERVENTIONS

    return [name for name, cls in INTERVENTIONS.items() if cls.ablates]


def add(sub: argparse._SubParsersAction) -> None:
    from mechattr.attribution import METHODS
    from mechattr.circuits import LEVELS

    v = sub.add_parser("verify", help="exact patching of an estimate's top sites and a random sample of the rest")
    v.add_argument("--effects", required=True, help="directory (or its effects.safetensors) written by attribute")
    v.add_argument("--kind", default=None, help="which saved grid to verify (default: the only one)")
    add_task_args(v, defaults=False)
    v.add_argument("--top", type=int, default=20, help="sites with the largest |estimate| to check")
    v.add_argument("--sample", type=int, default=20, help="random sites from the rest to check")
    v.add_argument("--threshold", type=float, default=0.1, help="|effect| / |clean - corrupt| that counts as important")
    v.add_argument("--out", required=True, help="output directory")
    v.set_defaults(run=cmd_verify)

    d = sub.add_parser("discover", help="a circuit: rank by attribution, prune by exact patching")
    add_task_args(d)
    d.add_argument("--level", default=LEVELS[0], help=choices_help(LEVELS, "what a circuit is made of"))
    d.add_argument("--method", default="atp", help=choices_help(METHODS, "attribution used to rank"))
    d.add_argument("--ablation", default="noise", help=choices_help(_ablations(), "what ablated components get"))
    d.add_argument("--target", type=float, default=0.8, help="faithfulness the circuit must keep")
    d.add_argument("--threshold", type=float, default=0.01, help="pruning threshold, a fraction of the gap")
    d.add_argument("--points", type=int, default=24, help="points on the faithfulness curve")
    d.add_argument("--no-prune", action="store_true", help="keep the smallest prefix reaching the target")
    d.add_argument("--out", required=True, help="output directory")
    d.set_defaults(run=cmd_discover)


def cmd_verify(args: argparse.Namespace) -> None:
    import mechattr
    from mechattr import plots
    from mechattr.plots.estimates import plot_estimate_vs_exact
    from mechattr.storage import write_json

    positive("--top", args.top)
    if args.sample < 0:
        raise UsageError(f"--sample must be >= 0, got {args.sample}")
    saved = effects_from(args.effects, args.kind)
    if len(saved) > 1:
        raise UsageError(f"{args.effects} holds {len(saved)} grids ({', '.join(e.kind for e in saved)}); "
                         f"choose one with --kind")
    estimate = saved[0]
    task_defaults(args, estimate.meta, ("model", "task", "n", "seed", "metric"))
    model, task = load(args)
    if task.n_examples != estimate.n_examples:
        raise UsageError(f"the estimate has {estimate.n_examples} examples but task {task.name!r} has "
                         f"{task.n_examples}; pass the --task/--n/--seed it was computed with")
    checked = mechattr.verify(model, task, estimate, top=args.top, sample=args.sample, threshold=args.threshold)
    out = Path(args.out)
    mechattr.save_effects(out / "exact", [checked.exact], model=args.model, task=task.name)
    summary = {"kind": estimate.kind, "method": estimate.method, "spearman": checked.spearman,
               "n_top": checked.n_top, "n_sample": len(checked.checked) - checked.n_top, "n_rest": checked.n_rest,
               "threshold": checked.threshold, "important_top": checked.important_top,
               "important_sample": checked.important_sample, "missed": checked.missed,
               "missed_ci": list(checked.missed_ci), "sites": [str(s) for s in checked.checked],
               "estimated": checked.estimated_effect.tolist(), "exact": checked.exact.effect.tolist()}
    write_json(out / "verification.json", summary, indent=1)
    plots.save(plot_estimate_vs_exact(checked).figure, out / "estimate_vs_exact.png")
    print(f"Spearman {checked.spearman:.3f} over {len(checked.checked)} checked sites; "
          f"estimated missed important sites {checked.missed:.1f} "
          f"[{checked.missed_ci[0]:.1f}, {checked.missed_ci[1]:.1f}]; wrote {out}")


def cmd_discover(args: argparse.Namespace) -> None:
    import mechattr
    from mechattr import plots
    from mechattr.attribution import METHODS
    from mechattr.plots.estimates import plot_circuit, plot_faithfulness
    from mechattr.circuits import LEVELS
    from mechattr.interventions import by_name

    check_choice("circuit level", args.level, LEVELS)
    check_choice("attribution method", args.method, METHODS)
    check_choice("ablation", args.ablation, _ablations())
    positive("--points", args.points)
    model, task = load(args)
    circuit = mechattr.discover(model, task, args.level, method=args.method, ablation=by_name(args.ablation),
                                target=args.target, threshold=args.threshold, points=args.points,
                                prune=not args.no_prune)
    out = circuit.save(args.out)
    plots.save(plot_faithfulness(circuit).figure, out / "faithfulness.png")
    plots.save(plot_circuit(circuit).figure, out / "circuit.png")
    print(f"{circuit.size} {circuit.level}s of {len(circuit.ranking)}, faithfulness {circuit.faithfulness:.3f}, "
          f"curve AUC {circuit.auc:.3f}; wrote {out}")
