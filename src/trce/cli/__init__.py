"""The `trce` command line: one module per command, each parsing its flags, calling one function of the
library (`trce.erase`, `trce.evaluate`, `trce.attack`, `trce.report`, ...) and printing the result.

User mistakes raise `TrceError` and end as one line on stderr with exit status 2; a library error that names
a field (`limit must be at least 1`) is shown with the command's flag (`--limit must be at least 1`).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from trce.cli.common import EXAMPLES, add_model_args, flag, parser_kwargs
from trce.errors import TrceError

log = logging.getLogger("trce")

# Each module has `register(sub)`, adding its subcommands; a subcommand sets `func` (and `flags`: field -> flag
# where a flag is not `--` + the field's name).
COMMAND_MODULES: list[str] = [
    "trce.cli.info", "trce.cli.generate", "trce.cli.erase", "trce.cli.eval", "trce.cli.attack", "trce.cli.report",
    "trce.cli.demo", "trce.cli.shapeworld",
]


class Parser(argparse.ArgumentParser):
    """argparse with trce's one-line errors: `trce: error: argument --seed: invalid int value: '1.5' (...)`."""

    def error(self, message: str):
        self.exit(2, f"trce: error: {message} (see `{self.prog} --help`)\n")


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's kill, `kill PID`): ends a run as Ctrl-C does, with the resume hint."""


def _on_sigterm(signum, frame):
    raise Terminated


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="trce",
        description="Reliable concept erasure for text-to-image diffusion models, with an offline testbed (ShapeWorld).",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    from trce.version import __version__

    parser.add_argument("--version", action="version", version=f"trce {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for module in COMMAND_MODULES:
        importlib.import_module(module).register(sub)
    return parser


def _quiet_libraries(verbose: bool) -> None:
    """Keep diffusers/transformers chatter (load reports, per-component bars) out of the user's terminal."""
    if verbose:
        return
    import os
    import warnings

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    dlog.set_verbosity_error()
    dlog.disable_progress_bar()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    import signal
    import threading

    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="trce: %(message)s", stream=sys.stderr)
    if argv is None:  # the `trce` command itself (not a call from Python): share the CPUs with other trce jobs
        from trce.utils import threads

        threads.configure()  # before torch starts, so that OpenMP's wait policy takes effect
    _quiet_libraries(verbose=args.verbose)
    # SIGTERM ends a run as Ctrl-C does: outputs are written atomically, locks released, the resume hint printed
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if threading.current_thread() is threading.main_thread() \
        else None
    try:
        return int(args.func(args) or 0)
    except TrceError as exc:
        renamed = getattr(args, "flags", None)  # field -> flag: a mapping (others: --field-name) or a function
        rename = renamed if callable(renamed) else (lambda field: flag(field, renamed))
        print(f"trce: error: {exc.message_for(rename)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        what = "terminated (SIGTERM)" if isinstance(exc, Terminated) else "interrupted"
        print(f"trce: {what}; finished work is kept: rerun the same command to resume", file=sys.stderr)
        return 128 + signal.SIGTERM if isinstance(exc, Terminated) else 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


__all__ = ["add_model_args", "build_parser", "main", "parser_kwargs"]
