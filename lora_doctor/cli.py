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
import importlib
import importlib.util
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lora_doctor.findings import Severity
from lora_doctor.offline import RunReadError, diagnose
from lora_doctor.sweep import rank_sweep

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
    _add_sweep_parser(sub)
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


# --- lora-doctor sweep ---------------------------------------------------------------------------
def _add_sweep_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Adds ``lora-doctor sweep`` to the command's subparsers (``argparse`` ``add_subparsers()``).

    Its description is not %-formatted by argparse (its help strings are): a bare % is right.
    """
    parser = subparsers.add_parser(
        "sweep",
        help="train a few LoRA ranks from scratch and choose r from the measurements",
        description=(
            "Trains each rank from scratch with the trainer that MODULE:FUNCTION builds "
            "(FUNCTION(r, lora_alpha) returns a fresh transformers.Trainer), and chooses the "
            "smallest rank that reaches 95% of the best metric within 70% of the slowest rank's "
            "training time. Exit 0: a rank was chosen; 1: every rank failed; 2: bad input."
        ),
    )
    parser.add_argument(
        "build",
        metavar="MODULE:FUNCTION",
        help="the build function, in an importable module (pkg.train:build) or a file "
        "(path/to/train.py:build)",
    )
    parser.add_argument("--ranks", type=int, nargs="+", default=[4, 8, 16], metavar="R")
    parser.add_argument("--metric", default="eval_loss", help="metric to compare (eval_loss)")
    parser.add_argument("--alpha-ratio", type=float, default=2.0, help="lora_alpha = ratio * r (2)")
    direction = parser.add_mutually_exclusive_group()
    direction.add_argument(
        "--greater-is-better",
        dest="greater_is_better",
        action="store_const",
        const=True,
        help="a higher metric is better (default: from the metric's name)",
    )
    direction.add_argument(
        "--lower-is-better", dest="greater_is_better", action="store_const", const=False
    )
    parser.add_argument("--quality-share", type=float, default=0.95)
    parser.add_argument("--time-share", type=float, default=0.70)
    parser.add_argument("--min-gain", type=float, default=0.01)
    parser.add_argument(
        "--out", metavar="DIR", help="write sweep.json, sweep.csv and sweep.png into DIR"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(handler=_run_sweep)
    return parser


def _run_sweep(args: argparse.Namespace) -> int:
    """Runs ``lora-doctor sweep``; returns the exit code."""
    try:
        build = load_build(args.build)
        result = rank_sweep(
            build,
            args.ranks,
            args.metric,
            alpha_ratio=args.alpha_ratio,
            greater_is_better=args.greater_is_better,
            quality_share=args.quality_share,
            time_share=args.time_share,
            min_gain=args.min_gain,
            progress=not args.no_progress,
        )
    except ValueError as exc:
        print(f"lora-doctor sweep: {exc}", file=sys.stderr)
        return 2
    print(result.summary())
    if args.out:
        out = Path(args.out)
        result.to_json(out / "sweep.json")
        result.to_csv(out / "sweep.csv")
        written = [out / "sweep.json", out / "sweep.csv"]
        try:
            written.append(result.plot(out / "sweep.png"))
        except ImportError as exc:
            print(f"lora-doctor sweep: no plot: {exc}", file=sys.stderr)
        print("written: " + ", ".join(str(p) for p in written))
    return 0 if result.chosen_rank is not None else 1


def load_build(spec: str) -> Callable[..., Any]:
    """The function named by ``MODULE:FUNCTION``, MODULE being importable or a ``.py`` file.

    Raises:
        ValueError: with one line saying what could not be found or loaded.

    Example:
        >>> load_build("os.path:join")("a", "b")
        'a/b'
    """
    module_name, sep, func_name = spec.rpartition(":")
    if not sep or not module_name or not func_name:
        raise ValueError(
            f"expected MODULE:FUNCTION (e.g. my_train:build or path/to/train.py:build), got {spec!r}"
        )
    try:
        if module_name.endswith(".py") or "/" in module_name or os.sep in module_name:
            module = _load_file(Path(module_name))
        else:
            if os.getcwd() not in sys.path and "" not in sys.path:
                sys.path.insert(0, os.getcwd())  # as `python -m` does
            module = importlib.import_module(module_name)
    except ValueError:
        raise
    except Exception as exc:
        raise ValueError(f"cannot load {module_name!r}: {type(exc).__name__}: {exc}") from None
    func = getattr(module, func_name, None)
    if not callable(func):
        raise ValueError(f"{module_name!r} has no function {func_name!r}")
    return func  # type: ignore[no-any-return]


def _load_file(path: Path) -> Any:
    if not path.is_file():
        raise ValueError(f"no such file: {path}")
    name = f"_lora_doctor_build_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ValueError(f"cannot load {path} as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.resolve().parent))  # its sibling modules import, as `python file`
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


if __name__ == "__main__":
    sys.exit(main())
