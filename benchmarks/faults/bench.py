"""Runs the fault benchmark's scenarios over architectures and seeds, and prints the table."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from benchmarks.faults import fixloop
from benchmarks.faults.runner import Spec, map_runs, plan_runs, set_up_process
from benchmarks.faults.scenarios import SCENARIOS, Scenario, Skip
from benchmarks.faults.score import Finding, RunResult, format_table, summarize
from benchmarks.faults.tasks import ARCHS
from lora_doctor.checks import Registry

__all__ = ["collect", "load_results", "main", "run_one", "select"]

QUICK_ARCHS = ("llama",)


def select(quick: bool, only: Sequence[str] = ()) -> list[Scenario]:
    """The scenarios to run: those named in ``only``, else all (or the quick subset).

    Raises:
        ValueError: naming an unknown scenario and the known ones.
    """
    names = {s.name for s in SCENARIOS}
    unknown = sorted(set(only) - names)
    if unknown:
        raise ValueError(f"unknown scenario(s) {unknown}; known: {', '.join(sorted(names))}")
    if only:
        return [s for s in SCENARIOS if s.name in only]
    return [s for s in SCENARIOS if s.quick or not quick]


def run_one(scenario: Scenario, spec: Spec) -> RunResult:
    """One run of ``scenario`` as the scorer sees it (a skipped one says why).

    Example:
        >>> record = run_one(SCENARIOS[0], Spec("llama", 0, Path("/tmp/x")))  # doctest: +SKIP
    """
    spec.workdir.mkdir(parents=True, exist_ok=True)
    record = RunResult(
        scenario.name,
        scenario.fault,
        spec.arch,
        spec.seed,
        scenario.must,
        scenario.must_not,
        scenario.cause,
    )
    try:
        outcome = scenario.build(spec)
    except Skip as why:
        record.skipped = str(why)
    else:
        record.findings = outcome.findings
        record.onset = outcome.onset
        record.error = outcome.error
        record.report_written = outcome.report_written
        record.internal_errors = outcome.internal_errors
    return record


def _progress(args: tuple[Any, ...], record: RunResult, seconds: float) -> None:
    found = ", ".join(sorted({f.slug for f in record.findings})) or "-"
    state = record.skipped or ("detected" if record.detected or record.healthy else "MISSED")
    if record.cause:
        state += f", cause {record.named_cause or 'none'}" + (
            "" if record.cause_right else " (WRONG)"
        )
    print(
        f"  {record.scenario:<20} {record.arch:<6} seed {record.seed}: {state}; found: {found} "
        f"({seconds:.1f} s)",
        file=sys.stderr,
        flush=True,
    )


def collect(
    scenarios: Sequence[Scenario],
    archs: Sequence[str],
    seeds: Sequence[int],
    workdir: Path,
    device: str = "cpu",
    progress: bool = True,
    jobs: int = 1,
    threads: int = 1,
) -> list[RunResult]:
    """Runs every scenario for every architecture and seed; returns the scored records, in that
    order whatever ``jobs`` is.

    Args:
        scenarios, archs, seeds: what to run.
        workdir: an empty folder; each run gets ``<scenario>/<arch>-s<seed>`` in it.
        device: ``"cpu"`` or ``"cuda"``.
        progress: print a line on stderr as each run finishes.
        jobs: worker processes (:func:`~benchmarks.faults.runner.map_runs`).
        threads: torch CPU threads of each worker.

    Example:
        >>> results = collect(select(quick=True), ["llama"], [0], Path("/tmp/x"))  # doctest: +SKIP
    """
    runs = plan_runs(scenarios, archs, seeds, workdir, device)
    return map_runs(run_one, runs, jobs, threads, _progress if progress else None)


def load_results(paths: Sequence[Path]) -> list[RunResult]:
    """Reads the ``results.json`` files of earlier runs (e.g. scenarios split over processes),
    in the benchmark's scenario order.

    Example:
        >>> results = load_results([Path("out/a/results.json")])  # doctest: +SKIP
    """
    order = {s.name: i for i, s in enumerate(SCENARIOS)}
    results = []
    for path in paths:
        for raw in json.loads(path.read_text(encoding="utf-8")):
            raw["must"], raw["must_not"] = tuple(raw["must"]), tuple(raw["must_not"])
            raw["findings"] = [Finding(**f) for f in raw["findings"]]
            results.append(RunResult(**raw))
    return sorted(results, key=lambda r: order.get(r.scenario, len(order)))


def _report(results: Sequence[RunResult], scenarios: Sequence[Scenario]) -> str:
    """The table, and the doctor's internal errors if there were any."""
    registered = Registry().names
    unregistered = {
        slug for s in scenarios for g in s.must for slug in g.split("|") if slug not in registered
    }
    lines = [format_table(summarize(results), unregistered)]
    for line in sorted({line for r in results for line in r.internal_errors}):
        lines.append("doctor internal error: " + line.splitlines()[0])
    return "\n".join(lines)


def _fix_loop(
    scenarios: Sequence[Scenario],
    archs: Sequence[str],
    seeds: Sequence[int],
    device: str,
    out: Path | None,
    start: float,
    jobs: int,
    threads: int,
) -> int:
    """``--fix-loop``: runs :mod:`benchmarks.faults.fixloop`, prints (and saves) its table."""
    with tempfile.TemporaryDirectory(prefix="lora-doctor-fixloop-") as tmp:
        results = fixloop.collect(
            scenarios, archs, seeds, Path(tmp), device, jobs=jobs, threads=threads
        )
    table = fixloop.format_table(results)
    print(table)
    print(
        f"\n{len(results)} fix loops ({', '.join(archs)}; seeds {list(seeds)}; {device}) in "
        f"{time.perf_counter() - start:.0f} s"
    )
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        fixloop.save(results, out / "fixloop.json")
        (out / "fixloop.md").write_text(table + "\n", encoding="utf-8")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m benchmarks.faults``: runs the benchmark and prints the table."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.faults", description=__doc__)
    parser.add_argument("--seeds", type=int, default=3, help="seeds per scenario and architecture")
    parser.add_argument("--quick", action="store_true", help="1 seed, Llama only, a subset")
    parser.add_argument("--arch", nargs="+", choices=ARCHS, default=None)
    parser.add_argument("--only", nargs="+", default=(), help="scenario names to run")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads of each process (default 1)"
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="runs trained at once, each in its own process (default 1); jobs x threads should "
        "not exceed the CPU cores",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="write results.json and table.txt here"
    )
    parser.add_argument(
        "--score",
        type=Path,
        nargs="+",
        default=None,
        help="train nothing: score the results.json (with --fix-loop: fixloop.json) files of "
        "earlier runs together",
    )
    parser.add_argument(
        "--fix-loop",
        action="store_true",
        help="apply each configuration fault's diagnosis and train again (with --quick: three "
        "faults and a control)",
    )
    args = parser.parse_args(argv)
    if args.score is not None:
        scored = (
            fixloop.format_table(fixloop.load(args.score))
            if args.fix_loop
            else _report(load_results(args.score), SCENARIOS)
        )
        print(scored)
        return 0
    for name in ("seeds", "jobs", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    try:
        scenarios = (fixloop.select if args.fix_loop else select)(args.quick, args.only)
    except ValueError as err:
        parser.error(str(err))
    archs = args.arch or (QUICK_ARCHS if args.quick else ARCHS)
    seeds = range(1 if args.quick else args.seeds)
    set_up_process(args.threads)
    start = time.perf_counter()
    if args.fix_loop:
        return _fix_loop(
            scenarios, archs, seeds, args.device, args.out, start, args.jobs, args.threads
        )
    with tempfile.TemporaryDirectory(prefix="lora-doctor-faults-") as tmp:
        results = collect(
            scenarios, archs, seeds, Path(tmp), args.device, jobs=args.jobs, threads=args.threads
        )
    table = _report(results, scenarios)
    print(table)
    print(
        f"\n{len(results)} runs ({', '.join(archs)}; seeds {list(seeds)}; {args.device}; "
        f"{args.jobs} jobs x {args.threads} threads) in {time.perf_counter() - start:.0f} s"
    )
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(
            json.dumps([asdict(r) for r in results], indent=1), encoding="utf-8"
        )
        (args.out / "table.txt").write_text(table + "\n", encoding="utf-8")
    return 0
