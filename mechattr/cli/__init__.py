"""The `mechattr` command line.

    mechattr run        the main job: knowledge vs data, precision fine-tuning, re-attribution, report.md
    mechattr patch      exact activation patching over grids of sites
    mechattr attribute  gradient estimates of the same grids (atp, atp*, ig)
    mechattr verify     exact patching of an estimate's top sites and a sample of the rest
    mechattr discover   a circuit and its faithfulness curve
    mechattr finetune   precision fine-tuning of the top sites, with --compare against baselines

The task commands take --device and --dtype for the model. Choices and their help are read from the
library's registries (`tasks.TASKS`, `interventions.INTERVENTIONS`, `attribution.METHODS`, ...).

Every command reports bad input (unknown kind, layer out of range, mismatched lengths, missing model or
file) as one paragraph on stderr and exit status 2, never a traceback (MECHATTR_DEBUG=1 shows it).
"""

import argparse
import os
import sys
from typing import Callable, Sequence

from mechattr.cli import circuits, finetune, grids, run as run_command
from mechattr.cli.common import UsageError

__all__ = ["main"]

EXIT_BAD_INPUT = 2


def _parser() -> argparse.ArgumentParser:
    import mechattr

    parser = argparse.ArgumentParser(prog="mechattr", description="Causal attribution for transformers.")
    parser.add_argument("--version", action="version", version=f"mechattr {mechattr.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in (run_command, grids, circuits, finetune):
        module.add(sub)
    return parser


def _bad_input_types() -> tuple[type, ...]:
    from mechattr.models import ModelNotAvailable
    from mechattr.tasks import TaskError

    # OSError: missing input files, output paths that name a file, unwritable directories.
    return (UsageError, ValueError, KeyError, OSError, ModelNotAvailable, TaskError)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit status (0, or 2 for bad input, usage errors included)."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exit:  # argparse has printed its usage message (or --help)
        return exit.code if isinstance(exit.code, int) else EXIT_BAD_INPUT
    run: Callable[[argparse.Namespace], None] = args.run
    try:
        run(args)
    except _bad_input_types() as error:
        if os.environ.get("MECHATTR_DEBUG"):
            raise
        message = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
        print(f"mechattr {args.command}: error: {message}", file=sys.stderr)
        return EXIT_BAD_INPUT
    finally:
        _leave_process_group()
    return 0


def _leave_process_group() -> None:
    """Exiting with a torch.distributed group alive can abort in gloo's teardown; `--distributed` joins one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()

