"""`mechattr run`: the main job (see `mechattr.app`), resumable in its output directory."""

import argparse
import time
from pathlib import Path

__all__ = ["add"]


def add(sub: argparse._SubParsersAction) -> None:
    from mechattr.models import DEFAULT_MODEL  # not mechattr.app: every command would import the whole job

    r = sub.add_parser("run", help="the main job: knowledge-vs-data attribution, precision fine-tuning of the "
                                   "top sites, re-attribution, report.md")
    r.add_argument("--model", default=DEFAULT_MODEL, help="smollm2-135m (offline), a Hugging Face id or a directory")
    r.add_argument("--name", default="main", help="the run's name: it writes runs/<name>/")
    r.add_argument("--out", default=None, help="output directory (overrides --name)")
    size = r.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="a small configuration: minutes, for a smoke test")
    size.add_argument("--full", action="store_true", help="every budget curve (1-16 heads and matched neurons, "
                                                          "both generated tasks, every baseline, heads ranked "
                                                          "exactly on every ranking example), the sachs table and "
                                                          "every layer of the knowledge view (hours on a CPU)")
    r.set_defaults(run=cmd_run)


def cmd_run(args: argparse.Namespace) -> None:
    from mechattr.app import RunConfig, run

    make = RunConfig.quick if args.quick else RunConfig.full if args.full else RunConfig
    config = make(model=args.model)
    out = Path(args.out or Path("runs") / args.name)
    start = time.time()
    run(config, out)
    print(f"wrote {out / 'report.md'}, metrics.json, figures, effects and the delta in {time.time() - start:.0f} s")
