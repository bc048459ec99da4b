"""`mechattr verify` (estimate, then check by exact patching) and `mechattr discover` (circuits)."""

import argparse
import math
from dataclasses import asdict
from pathlib import Path

from mechattr.cli.common import (UsageError, add_task_args, check_choice, choices_help, default, effects_from, load,
                                 positive, task_defaults)

__all__ = ["add"]


def _ablations() -> list[str]:
    """The interventions circuit discovery can ablate with, from the registry."""
    from mechattr.interventions import INTERVENTIONS

    return [name for name, cls in INTERVENTIONS.items() if cls.ablates]


def add(sub: argparse._SubParsersAction) -> None:
    from mechattr.attribution import METHODS
    from mechattr.circuits import DEFAULT_ABLATION, LEVELS, discover
    from mechattr.verification import verify

    v = sub.add_parser("verify", help="exact patching of an estimate's top sites and a stratified sample of the rest: "
                                      "how many important sites it missed, and where it is most wrong")
    v.add_argument("--effects", required=True, help="directory (or its effects.safetensors) written by attribute")
    v.add_argument("--kind", default=None, help="which saved grid to verify (default: the only one)")
    add_task_args(v, defaults=False)
    v.add_argument("--top", type=int, default=default(verify, "top"), help="sites with the largest |estimate| to check")
    v.add_argument("--sample", type=int, default=default(verify, "sample"),
                   help="sites drawn from the rest (below the top) to check")
    v.add_argument("--strata", type=int, default=default(verify, "strata"),
                   help="strata of estimated rank the sample is spread over (sizes growing geometrically)")
    v.add_argument("--sample-seed", type=int, default=default(verify, "seed"), help="seed of the sample")
    v.add_argument("--threshold", type=float, default=default(verify, "threshold"),
                   help="|exact effect| / |clean - corrupt| above which a site counts as important")
    v.add_argument("--level", type=float, default=default(verify, "level"), help="coverage of the interval")
    v.add_argument("--out", required=True, help="output directory")
    v.set_defaults(run=cmd_verify)

    d = sub.add_parser("discover", help="a circuit: rank by attribution, prune by exact patching")
    add_task_args(d)
    d.add_argument("--level", default=default(discover, "level"),
                   help=choices_help(LEVELS, "what a circuit is made of"))
    d.add_argument("--method", default=default(discover, "method"),
                   help=choices_help(METHODS, "attribution used to rank"))
    d.add_argument("--ablation", default=DEFAULT_ABLATION.name,
                   help=choices_help(_ablations(), "what ablated components get"))
    d.add_argument("--target", type=float, default=default(discover, "target"),
                   help="faithfulness the circuit must keep")
    d.add_argument("--threshold", type=float, default=default(discover, "threshold"),
                   help="pruning threshold, a fraction of the gap")
    d.add_argument("--points", type=int, default=default(discover, "points"), help="points on the faithfulness curve")
    d.add_argument("--no-prune", action="store_true", help="keep the smallest prefix reaching the target")
    d.add_argument("--mib", type=int, default=default(discover, "mib"), metavar="RANDOM",
                   help="also the ranking's MIB faithfulness (CPR, CMD with intervals) against RANDOM random "
                        "rankings (0: skip)")
    d.add_argument("--out", required=True, help="output directory")
    d.set_defaults(run=cmd_discover)


def cmd_verify(args: argparse.Namespace) -> None:
    import mechattr
    from mechattr import plots
    from mechattr.plots.estimates import plot_estimate_vs_exact
    from mechattr.storage import write_json

    if args.top < 0 or args.sample < 0 or args.top + args.sample == 0:
        raise UsageError(f"--top and --sample must be >= 0 and not both 0, got {args.top} and {args.sample}")
    positive("--strata", args.strata)
    if not 0 < args.level < 1:
        raise UsageError(f"--level must be between 0 and 1, got {args.level}")
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
    checked = mechattr.verify(model, task, estimate, top=args.top, sample=args.sample, seed=args.sample_seed,
                              strata=args.strata, threshold=args.threshold, level=args.level)
    out = Path(args.out)
    mechattr.effects.save_effects(out / "exact", [checked.exact], model=args.model, task=task.name)
    missed = None if math.isnan(checked.missed) else checked.missed  # JSON has no NaN
    summary = {"kind": estimate.kind, "method": estimate.method, "missed": missed,
               "missed_ci": list(checked.missed_ci), "level": checked.level, "n_checked": len(checked.checked),
               "n_sites": len(estimate.sites), "n_top": checked.n_top,
               "n_sample": len(checked.checked) - checked.n_top, "n_rest": checked.n_rest,
               "strata": [asdict(s) for s in checked.strata], "threshold": checked.threshold,
               "important_top": checked.important_top, "important_sample": checked.important_sample,
               "misses": [_site_row(*m) for m in checked.misses()],
               "disagreements": [_site_row(*d) for d in checked.disagreements(10)],
               "spearman": checked.spearman, "sites": [str(s) for s in checked.checked], "ranks": list(checked.ranks),
               "estimated": checked.estimated_effect.tolist(), "exact": checked.exact.effect.tolist()}
    write_json(out / "verification.json", summary, indent=1)
    plots.save(plot_estimate_vs_exact(checked).figure, out / "estimate_vs_exact.png")
    print(checked.summary())
    print(f"wrote {out}")


def _site_row(site, estimate: float, exact: float, rank: int) -> dict:
    return {"site": str(site), "estimate": estimate, "exact": exact, "rank": rank + 1}


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
    if args.mib < 0:
        raise UsageError(f"--mib must be >= 0 (random rankings; 0 skips it), got {args.mib}")
    model, task = load(args)
    circuit = mechattr.discover(model, task, args.level, method=args.method, ablation=by_name(args.ablation),
                                target=args.target, threshold=args.threshold, points=args.points,
                                prune=not args.no_prune, mib=args.mib)
    out = circuit.save(args.out)
    plots.save(plot_faithfulness(circuit).figure, out / "faithfulness.png")
    plots.save(plot_circuit(circuit).figure, out / "circuit.png")
    print(f"{circuit.size} {circuit.level}s of {len(circuit.ranking)}, faithfulness {circuit.faithfulness:.3f}, "
          f"curve AUC {circuit.auc:.3f}; wrote {out}")
    if "mib" in circuit.meta:
        m = circuit.meta["mib"]
        print(f"MIB: CPR {m['cpr']:.3f} [{m['cpr_ci'][0]:.3f}, {m['cpr_ci'][1]:.3f}] (random {m['random_cpr'][0]:.3f} "
              f"± {m['random_cpr'][1]:.3f}), CMD {m['cmd']:.3f} [{m['cmd_ci'][0]:.3f}, {m['cmd_ci'][1]:.3f}] "
              f"(random {m['random_cmd'][0]:.3f} ± {m['random_cmd'][1]:.3f})")
