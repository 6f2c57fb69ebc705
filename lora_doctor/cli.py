"""The ``lora-doctor`` command.

    lora-doctor --version
    lora-doctor diagnose PATH [--json OUT] [--plot OUT.png] [--fail-on warning|error]
    lora-doctor sweep MODULE:FUNCTION [--ranks 4 8 16] [--metric eval_loss] [--out DIR]

PATH is a run folder, a checkpoint folder or a ``trainer_state.json``. Exit status: 0 when nothing
is at or above ``--fail-on`` (default: error), 1 when something is, 2 when the input could not be
read or an output not written (with one line naming the problem, no traceback). ``sweep`` is described in
:mod:`lora_doctor.sweep` (exit 0: a rank was chosen, 1: every rank failed, 2: bad input).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from importlib import metadata

from lora_doctor import __version__
from lora_doctor.findings import Severity
from lora_doctor.offline import RunReadError, diagnose
from lora_doctor.plot import check_plot_path
from lora_doctor.sweep import add_sweep_parser

__all__ = ["main"]

EXIT_OK, EXIT_FOUND, EXIT_UNREADABLE = 0, 1, 2


def _version() -> str:
    """The installed distribution's version (``importlib.metadata``); the package's own
    ``__version__`` when it runs from a source tree that is not installed."""
    try:
        return metadata.version("lora-doctor")
    except metadata.PackageNotFoundError:
        return __version__


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lora-doctor", description="Diagnoses LoRA fine-tuning runs."
    )
    parser.add_argument(
        "--version", action="version", version=f"%(prog)s {_version()}", help="print the version"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    diag = sub.add_parser(
        "diagnose",
        help="diagnose a finished run from its trainer_state.json",
        description="Diagnoses a saved run: a run folder, a checkpoint folder or a "
        "trainer_state.json (the adapter_config.json beside it is read too). Exit 0: nothing at "
        "or above --fail-on; 1: something is; 2: the input could not be read or an output "
        "not written.",
    )
    diag.add_argument(
        "path", metavar="PATH", help="run folder, checkpoint folder or trainer_state.json"
    )
    diag.add_argument(
        "--json",
        metavar="OUT",
        help="write the diagnosis JSON to OUT (atomically; a symbolic link is followed)",
    )
    diag.add_argument(
        "--plot",
        metavar="OUT.png",
        help="draw the curves with the findings to OUT.png (or .pdf, .svg ...: any format "
        "matplotlib writes; needs the plot extra)",
    )
    diag.add_argument(
        "--fail-on",
        choices=[Severity.WARNING.value, Severity.ERROR.value],
        default=Severity.ERROR.value,
        help="exit 1 when a finding is at or above this severity (default: error)",
    )
    add_sweep_parser(sub)
    return parser


def _error(message: str) -> int:
    print(f"lora-doctor: error: {message}", file=sys.stderr)
    return EXIT_UNREADABLE


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command; returns the exit status.

    ``diagnose`` checks its outputs' names first (an unknown ``--plot`` format is exit 2 before any
    work), writes the files, and prints last: a closed standard output (``| head -1``) loses
    nothing and ends quietly, with the exit status of the findings. Without matplotlib, ``--plot``
    is skipped with a note and the rest is done.

    Example:
        >>> main(["diagnose", "outputs/checkpoint-500", "--fail-on", "warning"])  # doctest: +SKIP
        1
    """
    args = _parser().parse_args(argv)
    if args.command == "sweep":
        return int(args.handler(args))
    plot_note = ""
    if args.plot:
        try:
            check_plot_path(args.plot)
        except ImportError as err:  # no matplotlib: everything else is still done
            plot_note, args.plot = f"lora-doctor: --plot skipped: {err}", None
        except ValueError as err:
            return _error(f"--plot: {err}")
    try:
        diagnosis = diagnose(args.path)
    except RunReadError as err:
        return _error(str(err))
    written: list[str] = []
    failure = ""
    try:
        if args.json:
            diagnosis.to_json(args.json)
            written.append(f"diagnosis written to {args.json}")
        if args.plot:
            diagnosis.plot(args.plot)
            written.append(f"plot written to {args.plot}")
    except OSError as err:  # an output that cannot be written: one line, as for the input
        failure = f"cannot write {err.filename}: {err.strerror or err}"
    except (ValueError, RuntimeError) as err:  # matplotlib cannot draw (e.g. .pgf without LaTeX)
        failure = f"cannot draw the plot: {err}"
    try:
        print("\n".join([diagnosis.summary(), *written]), flush=True)
    except OSError:  # the reader left (``| head -1``): the files are written already
        _silence_stdout()
    if plot_note:
        print(plot_note, file=sys.stderr)
    if failure:
        return _error(failure)
    threshold = Severity.parse(args.fail_on)
    worst = diagnosis.worst
    return EXIT_FOUND if worst is not None and worst >= threshold else EXIT_OK


def _silence_stdout() -> None:
    """Points standard output at the null device, so that the interpreter's final flush does not
    fail again on the closed pipe (the recipe of Python's ``signal`` documentation)."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, ValueError, OSError):  # no real file behind it: nothing to flush
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


if __name__ == "__main__":
    sys.exit(main())
