"""The ``lora-doctor`` command.

    lora-doctor diagnose PATH [--json OUT] [--plot OUT.png] [--fail-on warning|error]
    lora-doctor sweep MODULE:FUNCTION [--ranks 4 8 16] [--metric eval_loss] [--out DIR]

PATH is a run folder, a checkpoint folder or a ``trainer_state.json``. Exit status: 0 when nothing
is at or above ``--fail-on`` (default: error), 1 when something is, 2 when the input could not be
read or an output not written (with one line naming the problem, no traceback). ``sweep`` is described in
:mod:`lora_doctor.sweep` (exit 0: a rank was chosen, 1: every rank failed, 2: bad input).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from collections.abc import Sequence

from lora_doctor.findings import Severity
from lora_doctor.offline import RunReadError, diagnose
from lora_doctor.sweep import add_sweep_parser

__all__ = ["main"]

EXIT_OK, EXIT_FOUND, EXIT_UNREADABLE = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lora-doctor", description="Diagnoses LoRA fine-tuning runs."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    diag = sub.add_parser(
        "diagnose",
        help="diagnose a finished run from its trainer_state.json",
        description="Diagnoses a saved run: a run folder, a checkpoint folder or a "
        "trainer_state.json (the adapter_config.json beside it is read too).",
    )
    diag.add_argument(
        "path", metavar="PATH", help="run folder, checkpoint folder or trainer_state.json"
    )
    diag.add_argument("--json", metavar="OUT", help="write the diagnosis JSON to OUT")
    diag.add_argument(
        "--plot", metavar="OUT.png", help="draw the curves with the findings to OUT.png"
    )
    diag.add_argument(
        "--fail-on",
        choices=[Severity.WARNING.value, Severity.ERROR.value],
        default=Severity.ERROR.value,
        help="exit 1 when a finding is at or above this severity (default: error)",
    )
    add_sweep_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command; returns the exit status.

    Example:
        >>> main(["diagnose", "outputs/checkpoint-500", "--fail-on", "warning"])  # doctest: +SKIP
        1
    """
    args = _parser().parse_args(argv)
    if args.command == "sweep":
        return int(args.handler(args))
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        print(
            "lora-doctor: error: --plot needs matplotlib: pip install 'lora-doctor[plot]'",
            file=sys.stderr,
        )
        return EXIT_UNREADABLE
    try:
        diagnosis = diagnose(args.path)
    except RunReadError as err:
        print(f"lora-doctor: error: {err}", file=sys.stderr)
        return EXIT_UNREADABLE
    print(diagnosis.summary())
    try:
        if args.json:
            diagnosis.to_json(args.json)
            print(f"diagnosis written to {args.json}")
        if args.plot:
            diagnosis.plot(args.plot)
            print(f"plot written to {args.plot}")
    except OSError as err:  # an output that cannot be written: one line, as for the input
        print(f"lora-doctor: error: cannot write {err.filename}: {err.strerror}", file=sys.stderr)
        return EXIT_UNREADABLE
    threshold = Severity.parse(args.fail_on)
    worst = diagnosis.worst
    return EXIT_FOUND if worst is not None and worst >= threshold else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
