"""The ``lora-doctor`` command.

    lora-doctor --version
    lora-doctor diagnose PATH [--json OUT] [--fix-json FILE [--suggestions | --suggest SLUG ...]] [--plot OUT.png] [--fail-on warning|error]
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
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lora_doctor._version import __version__
from lora_doctor.findings import Severity
from lora_doctor.fix import AppliedFix, suggestions_named
from lora_doctor.offline import RunReadError, diagnose, input_files
from lora_doctor.plot import check_plot_path
from lora_doctor.report import Diagnosis, write_json_atomic

__all__ = ["main"]

EXIT_OK, EXIT_FOUND, EXIT_UNREADABLE = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lora-doctor", description="Diagnoses LoRA fine-tuning runs."
    )
    parser.add_argument(
        "--version", action="version", version=f"%(prog)s {__version__}", help="print the version"
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
        "--fix-json",
        metavar="FILE",
        help="write the fix to FILE: the LoraConfig and TrainingArguments changes the findings "
        "recommend, merged (errors before warnings), and the steps that are not configuration",
    )
    diag.add_argument(
        "--suggestions",
        action="store_true",
        help="with --fix-json, also apply every information finding's suggestion (a smaller rank, "
        "all-linear targets ...)",
    )
    diag.add_argument(
        "--suggest",
        action="append",
        metavar="SLUG",
        help="with --fix-json, also apply this finding's suggestion (a slug or code; repeat it "
        "for several)",
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
    _add_sweep_parser(sub)
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
    if (args.suggestions or args.suggest) and not args.fix_json:
        flag = "--suggestions" if args.suggestions else "--suggest"
        return _error(f"{flag} says what --fix-json applies: add --fix-json FILE")
    try:
        clash = _overwrites_input(args)
        diagnosis = diagnose(args.path)
    except RunReadError as err:
        return _error(str(err))
    if clash:
        return _error(clash)
    try:
        wanted = True if args.suggestions else set(args.suggest or ())
        fix = diagnosis.apply(
            suggestions=suggestions_named(wanted, diagnosis.findings, "--suggest")
        )
    except ValueError as err:
        return _error(str(err))
    written, failure = _write_outputs(args, diagnosis, fix)
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


def _overwrites_input(args: argparse.Namespace) -> str:
    """The one line refusing an output that is one of the files the run is read from (its
    trainer state, adapter config or weights); empty when none is."""
    inputs = {p.resolve() for p in input_files(args.path)}
    for flag, out in (("--json", args.json), ("--fix-json", args.fix_json), ("--plot", args.plot)):
        if out and Path(out).resolve() in inputs:
            return f"{flag} {out} is a file this run is read from: write it elsewhere"
    return ""


def _write_outputs(
    args: argparse.Namespace, diagnosis: Diagnosis, fix: AppliedFix
) -> tuple[list[str], str]:
    """Writes the files ``diagnose`` was asked for; returns what was written, in words, and the
    one line of a failure (empty when none)."""
    written: list[str] = []
    try:
        if args.json:
            diagnosis.to_json(args.json)
            written.append(f"diagnosis written to {args.json}")
        if args.fix_json:
            write_json_atomic(args.fix_json, json.dumps(fix.to_dict(), indent=2, allow_nan=False))
            written.append(f"fix written to {args.fix_json}")
        if args.plot:
            diagnosis.plot(args.plot)
            written.append(f"plot written to {args.plot}")
    except OSError as err:  # an output that cannot be written: one line, as for the input
        return written, f"cannot write {err.filename}: {err.strerror or err}"
    except (ValueError, RuntimeError) as err:  # matplotlib cannot draw (e.g. .pgf without LaTeX)
        return written, f"cannot draw the plot: {err}"
    return written, ""


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
    from lora_doctor.sweep import rank_sweep  # imported when used: diagnose starts without it

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
