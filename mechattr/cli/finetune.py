"""`mechattr finetune`: precision fine-tuning of the top sites of saved effects, and `--compare` against
the baselines of `finetune.methods.FINETUNE_METHODS` (random sites and LoRA of the same size, bottom-k, full)."""

import argparse
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from mechattr.cli.common import (UsageError, add_task_args, check_choice, choices_help, default, effects_from,
                                 integers, load_model, names, positive, task_defaults, task_of)

__all__ = ["add"]


def add(sub: argparse._SubParsersAction) -> None:
    from mechattr.finetune import TrainConfig
    from mechattr.finetune.data import LOSSES
    from mechattr.finetune.masks import KV_MODES
    from mechattr.finetune.methods import BASELINES
    from mechattr.selection import select

    f = sub.add_parser("finetune", help="train only the parameters of the top sites of saved effects")
    f.add_argument("--sites-from", required=True, help="effects directory (or its effects.safetensors)")
    f.add_argument("--kinds", default=None, help="which saved grids to select from (default: all)")
    f.add_argument("--top-k", type=int, required=True, help="sites to train, by |effect|")
    f.add_argument("--significant-only", action=argparse.BooleanOptionalAction,
                   default=default(select, "significant_only"),
                   help="only cells significant after Benjamini-Hochberg correction are eligible (the sites "
                        "trained and any larger ones this leaves out are printed)")
    f.add_argument("--kv", default=KV_MODES[0], help=choices_help(KV_MODES, "GQA key/value groups")
                   + " (any: a group trains when any of its heads is selected)")
    add_task_args(f, defaults=False)
    f.add_argument("--heldout", type=float, default=0.3, help="share of the examples (pairs) held out")
    f.add_argument("--steps", type=int, default=TrainConfig.steps, help="optimizer steps")
    f.add_argument("--lr", type=float, default=TrainConfig.lr, help="learning rate")
    f.add_argument("--batch-size", type=int, default=TrainConfig.batch_size, help="examples per step")
    f.add_argument("--weight-decay", type=float, default=TrainConfig.weight_decay,
                   help="decay of the delta, toward the base model's weights")
    f.add_argument("--loss", default=TrainConfig.loss,
                   help="; ".join(f"{name}: {what}" for name, what in LOSSES.items()))
    f.add_argument("--compare", action="store_true", help="also run the baselines; writes comparison.md/.json")
    f.add_argument("--seeds", default="0,1,2", help="seeds for --compare")
    f.add_argument("--baselines", default=",".join(BASELINES),
                   help=choices_help(BASELINES, "with --compare, comma-separated methods to compare with"))
    f.add_argument("--estimate-from", default=None,
                   help="with --compare: an attribution estimate's effects, for precision from attribution")
    f.add_argument("--out", required=True, help="output directory")
    f.add_argument("--export", default=None, metavar="DIR",
                   help="also write the fine-tuned model as a Hugging Face model folder; trains on the checkpoint's "
                        "own weights (no compatibility mode), see docs/export.md")
    f.set_defaults(run=cmd_finetune)


def split(model: Any, args: argparse.Namespace) -> tuple[Any, Any]:
    """Training and held-out tasks, split the task's own way (cause_effect by pair) or by example (seeded)."""
    from mechattr.tasks import train_heldout

    if not 0 < args.heldout < 1:
        raise UsageError(f"--heldout must be a share between 0 and 1, got {args.heldout}")
    positive("--n", args.n)
    parts = train_heldout(model, args.task, args.n, args.seed, args.heldout)
    return tuple(part.with_metric(args.metric) for part in parts)


def _check(args: argparse.Namespace) -> None:
    positive("--top-k", args.top_k)
    positive("--steps", args.steps)
    positive("--batch-size", args.batch_size)
    from mechattr.finetune.data import LOSSES
    from mechattr.finetune.masks import KV_MODES
    from mechattr.finetune.methods import BASELINES

    check_choice("--kv mode", args.kv, KV_MODES)
    check_choice("--loss", args.loss, LOSSES)
    if args.estimate_from and not args.compare:
        raise UsageError("--estimate-from only applies with --compare")
    if args.export is not None and Path(args.export).resolve() == Path(args.out).resolve():
        raise UsageError(f"--export {args.export} must be another directory than --out")
    for name in names(args.baselines):
        check_choice("baseline", name, BASELINES)


def _model(args: argparse.Namespace) -> Any:
    """The model to fine-tune: with --export, the checkpoint's own weights (no compatibility mode)."""
    import mechattr

    return mechattr.load_model(args.model, device=args.device, dtype=args.dtype, compatibility=args.export is None)


def cmd_finetune(args: argparse.Namespace) -> None:
    from mechattr import plots
    from mechattr.finetune import Checkpoint, TopSites, TrainConfig, train
    from mechattr.finetune.compare import Evaluation
    from mechattr.finetune.harness import unrelated_text
    from mechattr.finetune.prefix import first_block
    from mechattr.finetune.memory import PeakMemory
    from mechattr.plots.finetune import plot_losses
    from mechattr.storage import write_json
    from mechattr.tasks import ioi

    _check(args)
    seeds = integers("--seeds", args.seeds) if args.compare else []
    effects = effects_from(args.sites_from, args.kinds)
    task_defaults(args, effects[0].meta, ("model", "task", "n", "seed", "metric"))
    base = _model(args)
    train_task, heldout = split(base, args)
    config = TrainConfig(lr=args.lr, steps=args.steps, batch_size=args.batch_size,
                         weight_decay=args.weight_decay, loss=args.loss, seed=args.seed)
    precision = TopSites(effects, k=args.top_k, kv=args.kv, significant_only=args.significant_only)
    other = ioi(base, n=8, seed=0) if args.task != "ioi" else task_of(base, "facts", 8, 0)
    text = unrelated_text(base)
    evaluation = Evaluation(base, train_task, heldout, other, text)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.export is not None:
        print("training on the checkpoint's own weights (no compatibility mode), so that --export can save them")
    setup = precision.build(_model(args), args.seed, None)
    print(f"training {setup.sites.describe()}")
    checkpoint = out / "checkpoint.pt"  # a rerun of an interrupted command continues from here
    with PeakMemory() as memory:
        result = train(setup.model, setup.masks, train_task, config, [Checkpoint(checkpoint, every=10)],
                       resume=checkpoint if checkpoint.is_file() else None, sites=setup.sites,
                       base_model=args.model)
    result.delta.save(out / "delta.safetensors")
    n_params = sum(p.numel() for p in base.parameters())
    metrics = {"task": train_task.name, "heldout_task": heldout.name, "model": args.model,
               "sites": [str(s) for s in setup.sites], "n_trained": result.n_trained,
               "coordinates": result.delta.coordinates, "trained_fraction": result.n_trained / n_params,
               "config": asdict(config),
               "base": evaluation.base, "trained": evaluation(setup.model, first_block(setup.model, setup.masks)),
               "wall_s": result.wall_s,
               "peak_mb": memory.peak_bytes / 2**20 if memory.peak_bytes is not None else None,
               "losses": list(result.losses)}
    write_json(out / "metrics.json", metrics, indent=1, default=str)
    plots.save(plot_losses(result.losses, label=f"precision, top {args.top_k}").figure, out / "training.png")
    checkpoint.unlink()
    print(f"trained {result.n_trained:,} entries ({100 * metrics['trained_fraction']:.3f}% of the model); "
          f"held-out accuracy {evaluation.base['heldout_accuracy']:.3f} -> {metrics['trained']['heldout_accuracy']:.3f}; "
          f"wrote {out}")
    if args.export is not None:
        from mechattr.finetune.export import export

        print(f"exported the fine-tuned model to {export(setup.model, args.export, result.delta, args.model)}")
    if args.compare:
        # Without --export the precision run's model is the comparison's base model: its scores are reused.
        _compare(args, out, effects, precision, (train_task, heldout, other, text), config, seeds,
                 evaluation if args.export is None else None)


def _compare(args: argparse.Namespace, out: Path, effects: list, precision: Any, data: tuple, config: Any,
             seeds: list[int], evaluation: Any) -> None:
    """--compare: precision fine-tuning against the --baselines on the same data, steps and seeds."""
    from mechattr import plots
    from mechattr.finetune import TopSites, compare
    from mechattr.finetune.methods import FINETUNE_METHODS
    from mechattr.plots.finetune import plot_comparison

    train_task, heldout, other, text = data
    methods = [precision]
    if args.estimate_from:
        methods.append(TopSites(effects_from(args.estimate_from, args.kinds), k=args.top_k, kv=args.kv,
                                significant_only=args.significant_only, tag="precision (attribution)"))
    methods += [FINETUNE_METHODS[name].against(effects, args.top_k, args.kv) for name in names(args.baselines)]
    start = time.time()
    table = compare(lambda: load_model(args), train_task, heldout, methods, config, seeds, other_task=other, text=text,
                    evaluation=evaluation)
    table.save(out)
    plots.save(plot_comparison(table), out / "comparison.png")
    print(table.to_markdown())
    print(f"compared {len(methods)} methods over {len(seeds)} seed(s) in {time.time() - start:.0f} s")
