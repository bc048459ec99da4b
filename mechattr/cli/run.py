"""`mechattr run`: the main job (see `mechattr.app`), resumable in its output directory."""

import argparse
import time
from pathlib import Path

__all__ = ["add"]


def add(sub: argparse._SubParsersAction) -> None:
    r = sub.add_parser("run", help="the main job: knowledge-vs-data attribution, precision fine-tuning of the "
                                   "top sites, re-attribution, report.md")
    r.add_argument("--model", default="smollm2-135m", help="smollm2-135m (offline), a Hugging Face id or a directory")
    r.add_argument("--name", default="main", help="the run's name: it writes runs/<name>/")
    r.add_argument("--out", default=None, help="output directory (overrides --name)")
    r.add_argument("--quick", action="store_true", help="a small configuration: minutes, for a smoke test")
    r.set_defaults(run=cmd_run)


def cmd_run(args: argparse.Namespace) -> None:
    from mechattr.app import RunConfig, run

    config = RunConfig.quick(model=args.model) if args.quick else RunConfig(model=args.model)
    out = Path(args.out or Path("runs") / args.name)
    start = time.time()
    run(config, out)
    print(f"wrote {out / 'report.md'}, metrics.json, figures, effects and the delta in {time.time() - start:.0f} s")
