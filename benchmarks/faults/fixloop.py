"""The fix-efficacy benchmark: follow the doctor's own advice and train again.

For every scenario whose mistake a configuration change undoes (``Scenario.config_fix``), the
faulty run's diagnosis (the ``lora_doctor.json`` it wrote) is applied with ``Diagnosis.apply`` to
the run's own ``LoraConfig`` and ``TrainingArguments``. The changes it applied become the
scenario's overrides (``Spec.lora_changes``, ``Spec.training_changes``) and the scenario trains
again from scratch, with the same seed, data and budget.

A fault counts as fixed when the re-run

- no longer reports the fault's finding (any slug of the scenario's ``must``) at warning or above;
- raises no new error: no error finding the faulty run did not have, and it does not die;
- ends with a loss at most :data:`FIXED_LOSS_RATIO` of the faulty run's: the evaluation loss of the
  model the run ends with when the scenario evaluates (the best checkpoint's under
  ``load_best_model_at_end``), else the last logged training loss (the mean over the last logging
  window). A non-finite loss is worse than any finite one.

When the doctor reports the fault only as information (``attention-only-targets``: a suggestion,
which ``apply`` leaves out by default), the loop follows that finding's suggestion, as a user
trying it would (``apply(..., suggestions={slug})``; other suggestions, such as a smaller rank
measured on the old targets, are not followed), marked as such in the table. A diagnosis that applies no change
counts as not fixed, with the reason. A healthy control's
diagnosis (empty or information only) must change nothing: no change applied, both copies equal to
the run's own objects.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.faults.runner import Outcome, Spec, map_runs, plan_runs
from benchmarks.faults.scenarios import SCENARIOS, Scenario, Skip
from lora_doctor.fix import LORA_CONFIG, TRAINING_ARGUMENTS, AppliedFix
from lora_doctor.report import Diagnosis

__all__ = [
    "FIXED_LOSS_RATIO",
    "QUICK",
    "FixResult",
    "collect",
    "final_loss",
    "format_table",
    "judge",
    "load",
    "run_one",
    "save",
    "select",
]

FIXED_LOSS_RATIO = 0.85
#: The quick form (a test): three faults and one control, one seed, Llama.
QUICK = ("healthy", "alpha-not-scaled", "rank-too-low", "gc-no-input-grads")
_ALARM = ("warning", "error")


@dataclass
class FixResult:
    """One scenario, architecture and seed: the faulty run, the fix, the re-run.

    Attributes:
        scenario, fault, arch, seed: which run.
        recommended: every finding of the faulty run with config changes: ``code``, ``slug``,
            ``severity``, ``config_changes``.
        applied: the changes ``Diagnosis.apply`` made, by object.
        dropped, unrouted: the changes it did not make, each ``"field=value [slug]: why"``.
        steps: the steps that are not configuration.
        loss_key: ``"eval_loss"`` or ``"loss"`` (see the module docstring).
        loss_before, loss_after: the faulty run's and the re-run's (None: not measured).
        still_found: the fault's findings the re-run still reports at warning or above.
        new_errors: error findings of the re-run the faulty run did not have.
        error_after: how the re-run died, if it did.
        suggested: the changes followed are the fault's own finding's suggestion
            (``apply(..., suggestions={slug})``): the doctor reported it only as information.
        fixed: the verdict (None for a healthy control).
        reason: why it is not fixed (empty when it is).
        unchanged: for a healthy control, whether ``apply`` changed nothing.
        skipped: why the run did not run here.
    """

    scenario: str
    fault: str
    arch: str
    seed: int
    recommended: list[dict[str, Any]] = field(default_factory=list)
    applied: dict[str, dict[str, Any]] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)
    unrouted: list[str] = field(default_factory=list)
    steps: list[str] = field(default_factory=list)
    loss_key: str = "loss"
    loss_before: float | None = None
    loss_after: float | None = None
    still_found: list[str] = field(default_factory=list)
    new_errors: list[str] = field(default_factory=list)
    error_after: str | None = None
    suggested: bool = False
    fixed: bool | None = None
    reason: str = ""
    unchanged: bool | None = None
    skipped: str | None = None

    @property
    def healthy(self) -> bool:
        return self.fault == "healthy"


def select(quick: bool, only: Sequence[str] = ()) -> list[Scenario]:
    """The fix loop's scenarios: the configuration faults and the healthy controls (those named
    in ``only``, else all, or the quick form's).

    Raises:
        ValueError: naming a scenario the fix loop does not run.
    """
    loop = [s for s in SCENARIOS if s.config_fix or s.healthy]
    names = {s.name for s in loop}
    unknown = sorted(set(only) - names)
    if unknown:
        raise ValueError(f"not in the fix loop: {unknown}; it runs: {', '.join(sorted(names))}")
    wanted = set(only) or (set(QUICK) if quick else names)
    return [s for s in loop if s.name in wanted]


def final_loss(outcome: Outcome) -> tuple[str, float | None]:
    """The loss a run ends with: its evaluation loss when it evaluates, else the last logged
    training loss."""
    if outcome.eval_loss is not None:
        return "eval_loss", outcome.eval_loss
    losses = [float(e["loss"]) for e in outcome.log_history if "loss" in e]
    return "loss", losses[-1] if losses else None


def _recommended(report: dict[str, Any] | None) -> list[dict[str, Any]]:
    out = []
    for f in (report or {}).get("findings", []):
        changes = (f.get("recommendation") or {}).get("config_changes") or {}
        if changes:
            out.append(
                {k: f.get(k) for k in ("code", "slug", "severity")} | {"config_changes": changes}
            )
    return out


def _skipped(fix: AppliedFix, which: str) -> list[str]:
    return [f"{s.change.assignment()} [{s.change.slug}]: {s.reason}" for s in getattr(fix, which)]


def _matches(slug: str, scenario: Scenario) -> bool:
    return any(slug in group.split("|") for group in scenario.must)


def _told_only_as_information(scenario: Scenario, faulty: Outcome) -> set[str]:
    """The slugs of the fault's findings, when the doctor reported it only as information."""
    found = [f for f in faulty.findings if _matches(f.slug, scenario)]
    return set() if any(f.severity in _ALARM for f in found) else {f.slug for f in found}


def _no_change_reason(scenario: Scenario, faulty: Outcome, fix: AppliedFix) -> str:
    """Why a diagnosis applied no change."""
    if fix.unrouted:
        return "its changes could not be applied: " + "; ".join(_skipped(fix, "unrouted"))
    found = [f for f in faulty.findings if _matches(f.slug, scenario)]
    if not found:
        return f"the doctor did not report the fault ({' / '.join(scenario.must)})"
    alarms = sorted({f.slug for f in found if f.severity in _ALARM})
    if not alarms:
        slugs = ", ".join(sorted({f.slug for f in found}))
        return f"{slugs} only as information, with no configuration change to suggest"
    return f"{', '.join(alarms)} names no supported cause, so no configuration change"


def judge(record: FixResult, scenario: Scenario, faulty: Outcome, fixed: Outcome) -> None:
    """Fills ``record`` with the re-run's verdict, by the module docstring's three conditions
    (``record.loss_key`` and ``loss_before`` must hold the faulty run's)."""
    record.still_found = sorted(
        {f.slug for f in fixed.findings if f.severity in _ALARM and _matches(f.slug, scenario)}
    )
    before_errors = {f.slug for f in faulty.findings if f.severity == "error"}
    record.new_errors = sorted(
        {f.slug for f in fixed.findings if f.severity == "error"} - before_errors
    )
    record.error_after = fixed.error
    record.loss_after = fixed.eval_loss if record.loss_key == "eval_loss" else final_loss(fixed)[1]
    before = record.loss_before if record.loss_before is not None else math.nan
    after = record.loss_after if record.loss_after is not None else math.nan
    lower = math.isfinite(after) and (
        not math.isfinite(before) or after <= FIXED_LOSS_RATIO * before
    )
    reasons = []
    if record.still_found:
        reasons.append("still reports " + ", ".join(record.still_found))
    if record.new_errors:
        reasons.append("new error " + ", ".join(record.new_errors))
    if fixed.error is not None and faulty.error is None:
        reasons.append(f"died: {fixed.error}")
    if not lower:
        reasons.append(f"{record.loss_key} above {FIXED_LOSS_RATIO:g} x the faulty run's")
    record.fixed, record.reason = not reasons, "; ".join(reasons)


def run_one(scenario: Scenario, spec: Spec) -> FixResult:
    """The faulty run, ``Diagnosis.apply`` on its diagnosis, and the re-run with the changes.

    Example:
        >>> result = run_one(scenario, Spec("llama", 0, Path("/tmp/x")))  # doctest: +SKIP
        >>> result.fixed, result.applied  # doctest: +SKIP
        (True, {'LoraConfig': {'lora_alpha': 32}})
    """
    record = FixResult(scenario.name, scenario.fault, spec.arch, spec.seed)
    faulty = scenario.build(spec)
    diagnosis = Diagnosis.from_dict(faulty.report or {})
    fix = diagnosis.apply(faulty.lora_config, faulty.training_args)
    told = _told_only_as_information(scenario, faulty)
    if not scenario.healthy and not fix.applied and told:
        fix = diagnosis.apply(faulty.lora_config, faulty.training_args, suggestions=told)
        record.suggested = True
    record.recommended = _recommended(faulty.report)
    for change in fix.applied:
        record.applied.setdefault(change.target, {})[change.field] = change.value
    record.dropped, record.unrouted = _skipped(fix, "dropped"), _skipped(fix, "unrouted")
    record.steps = list(fix.steps)
    record.loss_key, record.loss_before = final_loss(faulty)
    if scenario.healthy:
        record.unchanged = (
            not fix.applied
            and fix.lora_config == faulty.lora_config
            and fix.training_args == faulty.training_args
        )
        return record
    if not fix.applied:
        record.fixed, record.reason = False, _no_change_reason(scenario, faulty, fix)
        return record
    again = dataclasses.replace(
        spec,
        workdir=spec.workdir / "fixed",
        lora_changes=record.applied.get(LORA_CONFIG, {}),
        training_changes=record.applied.get(TRAINING_ARGUMENTS, {}),
    )
    again.workdir.mkdir(parents=True, exist_ok=True)
    judge(record, scenario, faulty, scenario.build(again))
    return record


def _run_or_skip(scenario: Scenario, spec: Spec) -> FixResult:
    """:func:`run_one`, or the record of a run that cannot run here."""
    spec.workdir.mkdir(parents=True, exist_ok=True)
    try:
        return run_one(scenario, spec)
    except Skip as why:
        return FixResult(scenario.name, scenario.fault, spec.arch, spec.seed, skipped=str(why))


def _progress(args: tuple[Any, ...], record: FixResult, seconds: float) -> None:
    print(
        f"  {record.scenario:<20} {record.arch:<6} seed {record.seed}: {_state(record)} "
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
) -> list[FixResult]:
    """Runs the fix loop for every scenario, architecture and seed, in that order; ``jobs`` and
    ``threads`` as for :func:`~benchmarks.faults.runner.map_runs`.

    Example:
        >>> results = collect(select(quick=True), ["llama"], [0], Path("/tmp/x"))  # doctest: +SKIP
    """
    runs = plan_runs(scenarios, archs, seeds, workdir, device)
    return map_runs(_run_or_skip, runs, jobs, threads, _progress if progress else None)


def _state(r: FixResult) -> str:
    if r.skipped:
        return f"skipped ({r.skipped})"
    if r.healthy:
        return "unchanged" if r.unchanged else f"CHANGED: {r.applied}"
    losses = f"{r.loss_key} {_num(r.loss_before)} -> {_num(r.loss_after)}"
    return f"{'fixed' if r.fixed else 'NOT fixed'}; {r.applied}; {losses}; {r.reason}"


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}"


def load(paths: Sequence[Path]) -> list[FixResult]:
    """Reads the ``fixloop.json`` files of earlier runs, in the benchmark's scenario order."""
    order = {s.name: i for i, s in enumerate(SCENARIOS)}
    results = [FixResult(**raw) for p in paths for raw in json.loads(p.read_text(encoding="utf-8"))]
    return sorted(results, key=lambda r: order.get(r.scenario, len(order)))


def save(results: Sequence[FixResult], path: Path) -> None:
    path.write_text(
        json.dumps([dataclasses.asdict(r) for r in results], indent=1) + "\n", encoding="utf-8"
    )


def _changes(runs: Sequence[FixResult]) -> str:
    """The distinct change sets applied, each with its number of runs; suggestions followed are
    marked."""
    counts: dict[str, int] = {}
    for r in runs:
        text = ", ".join(
            f"`{k}={v!r}`" for target in r.applied.values() for k, v in sorted(target.items())
        )
        if text and r.suggested:
            text += " (a suggestion)"
        counts[text or "none"] = counts.get(text or "none", 0) + 1
    return "; ".join(f"{k} ({n})" if len(counts) > 1 else k for k, n in counts.items())


def _reasons(failed: Sequence[FixResult], runs: int) -> str:
    """Why runs were not fixed: each reason once, with the runs it holds for."""
    by: dict[str, list[str]] = {}
    for r in failed:
        for reason in r.reason.split("; "):
            by.setdefault(reason, []).append(f"{r.arch} s{r.seed}")
    return "; ".join(
        f"{reason} ({'all' if len(who) == runs else ', '.join(who)})" for reason, who in by.items()
    )


def _median(xs: Sequence[float | None]) -> str:
    finite = [x for x in xs if x is not None and math.isfinite(x)]
    if not finite:
        return "-"
    text = f"{statistics.median(finite):.3g}"
    return text + (f" ({len(xs) - len(finite)} non-finite)" if len(finite) < len(xs) else "")


def format_table(results: Sequence[FixResult]) -> str:
    """The fix loop's tables in Markdown: per fault, runs fixed / runs, median losses before and
    after, the changes applied and why runs were not fixed; then the healthy controls."""
    groups: dict[str, list[FixResult]] = {}
    for r in results:
        if r.skipped is None:
            groups.setdefault(r.scenario, []).append(r)
    lines = [
        "| fault | fixed / runs | loss | before -> after (median) | changes applied | "
        "not fixed because |",
        "|---|---|---|---|---|---|",
    ]
    controls = ["| healthy control | runs | unchanged by `apply` |", "|---|---|---|"]
    for name, runs in groups.items():
        if runs[0].healthy:
            controls.append(f"| `{name}` | {len(runs)} | {sum(bool(r.unchanged) for r in runs)} |")
            continue
        fixed = sum(bool(r.fixed) for r in runs)
        why = _reasons([r for r in runs if not r.fixed], len(runs))
        lines.append(
            f"| `{name}` ({runs[0].fault}) | **{fixed}/{len(runs)}** | {runs[0].loss_key} | "
            f"{_median([r.loss_before for r in runs])} -> "
            f"{_median([r.loss_after for r in runs if r.loss_after is not None])} | "
            f"{_changes(runs)} | {why or '-'} |"
        )
    return "\n".join([*lines, "", *controls])
