"""The `mechattr` command line.

    mechattr run        the main job: knowledge vs data, precision fine-tuning, re-attribution, report.md
    mechattr patch      exact activation patching over grids of sites
    mechattr attribute  gradient estimates of the same grids (atp, atp*, ig)
    mechattr verify     exact patching of an estimate's top sites and a sample of the rest
    mechattr discover   a circuit and its faithfulness curve
    mechattr finetune   precision fine-tuning of the top sites, with --compare against baselines
    mechattr curves     budget curves: attribution-selected sites against random ones of the same size
    mechattr export     a delta trained in checkpoint coordinates as a Hugging Face model folder

The task commands take --device and --dtype for the model. Choices and their help are read from the
library's registries (`tasks.TASKS`, `interventions.INTERVENTIONS`, `attribution.METHODS`, ...).

Every command reports bad input (unknown kind, layer out of range, mismatched lengths, missing model or
file) as one paragraph on stderr and exit status 2, never a traceback (MECHATTR_DEBUG=1 shows it).
"""

import argparse
import contextlib
import functools
import os
import sys
import warnings
from typing import Callable, Iterator, Sequence

from mechattr.cli import circuits, curves, export, finetune, grids, run as run_command
from mechattr.cli.common import HelpFormatter, UsageError

__all__ = ["main"]

EXIT_BAD_INPUT = 2


def _parser() -> argparse.ArgumentParser:
    import mechattr

    parser = argparse.ArgumentParser(prog="mechattr", description="Causal attribution for transformers.")
    parser.add_argument("--version", action="version", version=f"mechattr {mechattr.__version__}")
    # Every subcommand's --help shows the defaults.
    sub = parser.add_subparsers(dest="command", required=True,
                                parser_class=functools.partial(argparse.ArgumentParser, formatter_class=HelpFormatter))
    for module in (run_command, grids, circuits, finetune, curves, export):
        module.add(sub)
    for command in sub.choices.values():
        command.add_argument("--threads", type=int, default=None,
                             help="torch CPU threads (default: torch's, one per core); on a machine shared "
                                  "with other busy processes, fewer threads than cores can be much faster")
    return parser


def _bad_input_types() -> tuple[type, ...]:
    from mechattr.models import ModelNotAvailable
    from mechattr.tasks import TaskError

    # OSError: missing input files, output paths that name a file, unwritable directories.
    return (UsageError, ValueError, KeyError, OSError, ModelNotAvailable, TaskError)


@contextlib.contextmanager
def _third_party_quiet() -> Iterator[None]:
    """Hide the deprecation notices of the libraries underneath (transformers, TransformerLens, torch),
    which name calls the user did not write, and transformers' progress bars for loading and saving
    weights (a second's work each, between mechattr's own bars); mechattr's own warnings still show."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # transformers logs some deprecations instead of warning
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            for category in (FutureWarning, DeprecationWarning):
                warnings.filterwarnings("ignore", category=category)
                warnings.filterwarnings("default", category=category, module="mechattr")
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit status (0, or 2 for bad input, usage errors included)."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exit:  # argparse has printed its usage message (or --help)
        return exit.code if isinstance(exit.code, int) else EXIT_BAD_INPUT
    run: Callable[[argparse.Namespace], None] = args.run
    try:
        if args.threads is not None:
            if args.threads < 1:
                raise UsageError(f"--threads must be at least 1, got {args.threads}")
            import torch

            torch.set_num_threads(args.threads)
        with _third_party_quiet():
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

