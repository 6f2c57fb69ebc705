"""Scores the fault benchmark: recall per fault, false alarms on healthy runs, detection delay.

Pure Python on plain records, so that the scoring is tested without training anything.

- A fault run is detected when every entry of its ``must`` is matched by a finding of any
  severity (``"a|b"``: either slug). Recall of a fault = detected runs / runs.
- A healthy run has a false alarm when it reports any finding of severity warning or error other
  than the ambient ones (true findings that hold for every tiny run, see :data:`AMBIENT`). The
  false-alarm rate = healthy runs with at least one false alarm / healthy runs.
- A fault run's wrong findings: its ``must_not`` slugs reported at warning or above.
- Delay: the step of the first finding that matches the fault's ``must``, against the step the
  fault began (set-up findings count at the step their training job began: 0, or the step of the
  checkpoint a run resumed).
- Top-1 cause accuracy of a fault = runs whose first-ranked cause is the fault's true cause (its
  label, ``Scenario.cause``; ``"a|b"``: the one cause, under either of its names) / labelled runs.

How a run's first-ranked cause is read (:attr:`RunResult.named_cause`): from the findings that match
the fault's ``must`` (any severity, as for recall: a finding that names the fault at info, such as
``no-reward-variance``, names it all the same), taken in the order reported (by step):

1. The first of them that ranks causes (``evidence.causes``, the diagnosis pass) speaks for the run:
   its first-ranked cause (``evidence.causes[0].cause``) when that cause's verdict is
   ``"supported"``. A symptom with ranked causes is where the doctor says why, so it is read before
   any finding that only names a fault: on ``alpha-far-too-small`` the plateau's cause is the
   verdict, not the ``alpha-rank-ratio`` set-up warning beside it.
2. When its first-ranked cause is ``"open"`` (no fact singled one out, the finding lists causes to
   rule out) or ``"ruled-out"``, the doctor named no cause: the run counts as wrong. A user told
   "rule these out in order" has not been told the cause, however right that humility may be
   when the run's facts cannot decide; the accuracy shows how often that happens.
3. When none of them ranks causes, the first of them names the fault itself, and its slug is the
   cause (``rank-changed-on-resume``, ``no-trainable-params``, ``overfit``): the doctor names the
   fault directly. A label may give the one cause under several names joined by ``|``: its id in
   the diagnosis's vocabulary and the slug of a finding that names it directly
   (``alpha-too-small|alpha-rank-ratio``), or two findings that name it (``oom-risk|out-of-memory``).
4. No matching finding (a missed fault): no cause, wrong.

Results files written before the causes were kept carry no labels; their runs get no accuracy
(``-``), rather than a wrong one.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

__all__ = [
    "AMBIENT",
    "ANY",
    "SUPPORTED",
    "TARGET_CAUSE_ACCURACY",
    "TARGET_FALSE_ALARMS",
    "TARGET_RECALL",
    "Finding",
    "RunResult",
    "Summary",
    "format_table",
    "summarize",
]

ANY = "*"
TARGET_RECALL = 0.95
TARGET_FALSE_ALARMS = 0.02
TARGET_CAUSE_ACCURACY = 0.9
#: The verdict of a ranked cause that a fact of the run supports (``Cause.verdict``).
SUPPORTED = "supported"
_ALARM = frozenset({"warning", "error"})

#: Findings that are true of every run of this benchmark, whatever the fault, so neither a
#: detection nor a false alarm: LoRA on a two-layer model with hidden size 64 holds 10% to 40%
#: as many parameters as the model, far outside the 0.05% to 1% of a real model.
AMBIENT: dict[str, str] = {
    "lora-param-budget": "tiny models: LoRA holds 10-40% of the base model's parameters, a true finding",
}


@dataclass(frozen=True)
class Finding:
    """One finding as the diagnosis file gives it; a set-up finding (no step in the file) counts
    at the step its training job began.

    Attributes:
        slug: the finding's slug.
        severity: ``"info"``, ``"warning"`` or ``"error"``.
        step: the step it was reported at.
        cause: the id of its first-ranked cause (``evidence.causes[0].cause``); None when it
            ranks no causes.
        verdict: that cause's verdict (``"supported"``, ``"open"``, ``"ruled-out"``); None when it
            ranks no causes.
    """

    slug: str
    severity: str
    step: int
    cause: str | None = None
    verdict: str | None = None


@dataclass
class RunResult:
    """One run of one scenario, as the scorer sees it.

    Attributes:
        scenario: the scenario's name.
        fault: its fault, ``"healthy"`` for controls.
        arch: the model architecture.
        seed: the seed.
        must: findings the run must produce (``"a|b"``: either).
        must_not: findings that would be wrong (``"*"``: any at warning or above).
        cause: the fault's true cause (``"a|b"``: under either name); ``""`` for a healthy
            control, or when not known (results files written before the labels).
        findings: what the doctor reported.
        onset: the step at which the fault began.
        error: how the run died, if it did.
        report_written: whether ``lora_doctor.json`` was written.
        skipped: why the run did not run here (e.g. needs a GPU), or None.
        internal_errors: the doctor's internal-error lines.
    """

    scenario: str
    fault: str
    arch: str
    seed: int
    must: tuple[str, ...] = ()
    must_not: tuple[str, ...] = ()
    cause: str = ""
    findings: list[Finding] = field(default_factory=list)
    onset: int = 0
    error: str | None = None
    report_written: bool = True
    skipped: str | None = None
    internal_errors: list[str] = field(default_factory=list)

    @property
    def healthy(self) -> bool:
        return self.fault == "healthy"

    def first_step(self, group: str) -> int | None:
        """The step of the first finding matching ``group`` (``"a|b"``), None when none does."""
        slugs = set(group.split("|"))
        steps = [f.step for f in self.findings if f.slug in slugs]
        return min(steps) if steps else None

    @property
    def detected(self) -> bool:
        return all(self.first_step(group) is not None for group in self.must)

    @property
    def detection_step(self) -> int | None:
        """When the fault was fully reported: the latest of the first matches of each ``must``."""
        steps = [self.first_step(group) for group in self.must]
        return None if not steps or None in steps else max(s for s in steps if s is not None)

    @property
    def named_cause(self) -> str | None:
        """The run's first-ranked cause, read as the module docstring says; None when the doctor
        named none."""
        slugs = {slug for group in self.must for slug in group.split("|")}
        matching = sorted((f for f in self.findings if f.slug in slugs), key=lambda f: f.step)
        ranked = next((f for f in matching if f.cause is not None), None)
        if ranked is not None:
            return ranked.cause if ranked.verdict == SUPPORTED else None
        return matching[0].slug if matching else None

    @property
    def cause_right(self) -> bool | None:
        """Whether the first-ranked cause is the true one; None for an unlabelled run."""
        if not self.cause:
            return None
        return self.named_cause in self.cause.split("|")

    @property
    def false_alarms(self) -> list[str]:
        """Slugs reported at warning or above that this run must not produce."""
        alarms = [f.slug for f in self.findings if f.severity in _ALARM and f.slug not in AMBIENT]
        wrong = alarms if ANY in self.must_not else [s for s in alarms if s in self.must_not]
        return sorted(set(wrong))


@dataclass
class Summary:
    """One row of the table: a scenario over its architectures and seeds."""

    scenario: str
    fault: str
    must: tuple[str, ...]
    runs: int
    detected: int
    false_alarm_runs: int
    false_alarm_slugs: list[str]
    onsets: list[int]
    delays: list[int]
    detection_steps: list[int]
    no_report: int
    labelled: int
    cause_right: int
    wrong_causes: list[str]
    errors: list[str]
    internal_errors: int
    skipped: str | None

    @property
    def healthy(self) -> bool:
        return self.fault == "healthy"

    @property
    def recall(self) -> float | None:
        return self.detected / self.runs if self.runs and not self.healthy else None

    @property
    def cause_accuracy(self) -> float | None:
        """Top-1 cause accuracy: labelled runs whose first-ranked cause is the true one / labelled
        runs; None without labelled runs."""
        return self.cause_right / self.labelled if self.labelled and not self.healthy else None


def summarize(results: Iterable[RunResult]) -> list[Summary]:
    """Groups runs by scenario (in first-seen order) and scores each group.

    Example:
        >>> r = RunResult("nan", "NaN injected", "llama", 0, must=("non-finite-values",),
        ...               findings=[Finding("non-finite-values", "error", 41)], onset=40)
        >>> s = summarize([r])[0]
        >>> (s.recall, s.delays, s.cause_accuracy)
        (1.0, [1], None)
    """
    groups: dict[str, list[RunResult]] = {}
    for r in results:
        groups.setdefault(r.scenario, []).append(r)
    out = []
    for name, runs in groups.items():
        ran = [r for r in runs if r.skipped is None]
        steps = [(r.onset, r.detection_step) for r in ran if r.detection_step is not None]
        out.append(
            Summary(
                scenario=name,
                fault=runs[0].fault,
                must=runs[0].must,
                runs=len(ran),
                detected=sum(r.detected for r in ran),
                false_alarm_runs=sum(bool(r.false_alarms) for r in ran),
                false_alarm_slugs=sorted({s for r in ran for s in r.false_alarms}),
                onsets=[r.onset for r in ran],
                delays=[max(0, d - o) for o, d in steps],
                detection_steps=[d for _, d in steps],
                no_report=sum(not r.report_written for r in ran),
                labelled=sum(r.cause_right is not None for r in ran),
                cause_right=sum(r.cause_right is True for r in ran),
                wrong_causes=sorted(
                    {r.named_cause or "none" for r in ran if r.cause_right is False}
                ),
                errors=sorted({r.error.split(":")[0] for r in ran if r.error}),
                internal_errors=sum(len(r.internal_errors) for r in ran),
                skipped=runs[0].skipped if not ran else None,
            )
        )
    return out


def _median(xs: Sequence[int]) -> str:
    return f"{statistics.median(xs):g}" if xs else "-"


def _ratio(n: int, d: int) -> str:
    return f"{n / d:.2f} ({n}/{d})" if d else "-"


def format_table(summaries: Sequence[Summary], unregistered: Iterable[str] = ()) -> str:
    """The benchmark's report: faults, healthy controls, totals against the targets.

    Args:
        summaries: from :func:`summarize`.
        unregistered: slugs named in ``must`` that no registered check reports (shown, so a
            missed fault with no check behind it reads as such).
    """
    missing = set(unregistered)
    lines = [
        "Faults (recall: runs whose must-findings were all reported; cause: runs whose first-ranked "
        "cause is the true one; onset -> reported: median step the fault began -> median step "
        "first reported; wrong: runs with a must_not finding)",
        f"{'scenario':<20} {'must':<40} {'recall':>12} {'cause':>12} {'onset->reported':>16} "
        f"{'delay med/max':>13} {'wrong':>6}  notes",
    ]
    faults = [s for s in summaries if not s.healthy]
    healthy = [s for s in summaries if s.healthy]
    for s in faults:
        if s.skipped:
            lines.append(f"{s.scenario:<20} {'/'.join(s.must):<40} {'skipped':>12}  {s.skipped}")
            continue
        notes = _notes(s, missing)
        reported = f"{_median(s.onsets)}->{_median(s.detection_steps)}"
        delay = f"{_median(s.delays)}/{max(s.delays) if s.delays else '-'}"
        lines.append(
            f"{s.scenario:<20} {'/'.join(s.must):<40} {_ratio(s.detected, s.runs):>12} "
            f"{_ratio(s.cause_right, s.labelled):>12} {reported:>16} {delay:>13} "
            f"{s.false_alarm_runs:>6}  {notes}"
        )
    lines += ["", "Healthy controls (false alarm: any warning or error besides the ambient ones)"]
    lines.append(f"{'scenario':<20} {'false-alarm runs':>18}  slugs / notes")
    for s in healthy:
        notes = ", ".join(s.false_alarm_slugs) or "-"
        extra = _notes(s, missing)
        lines.append(
            f"{s.scenario:<20} {_ratio(s.false_alarm_runs, s.runs):>18}  {notes}"
            + (f"; {extra}" if extra else "")
        )
    fault_runs = sum(s.runs for s in faults)
    fault_hits = sum(s.detected for s in faults)
    healthy_runs = sum(s.runs for s in healthy)
    alarms = sum(s.false_alarm_runs for s in healthy)
    rate = alarms / healthy_runs if healthy_runs else 0.0
    labelled = sum(s.labelled for s in faults)
    causes_right = sum(s.cause_right for s in faults)
    lines += [
        "",
        f"recall over all fault runs: {_ratio(fault_hits, fault_runs)}; "
        + _lowest([s.recall for s in faults], TARGET_RECALL),
        f"top-1 cause accuracy over all labelled fault runs: {_ratio(causes_right, labelled)}; "
        + _lowest([s.cause_accuracy for s in faults], TARGET_CAUSE_ACCURACY),
        f"false-alarm rate on healthy runs: {_ratio(alarms, healthy_runs)}"
        f"  (target <= {TARGET_FALSE_ALARMS}: {'met' if healthy_runs and rate <= TARGET_FALSE_ALARMS else 'NOT met'})",
        "ambient findings, not scored: " + "; ".join(f"{k} ({v})" for k, v in AMBIENT.items()),
    ]
    return "\n".join(lines)


def _lowest(rates: Sequence[float | None], target: float) -> str:
    """The lowest per-fault rate against its target."""
    worst = min((r for r in rates if r is not None), default=None)
    met = "met" if worst is not None and worst >= target else "NOT met"
    return (
        f"lowest per fault: {'-' if worst is None else f'{worst:.2f}'}  (target >= {target}: {met})"
    )


def _notes(s: Summary, missing: set[str]) -> str:
    notes = []
    absent = [slug for group in s.must for slug in group.split("|") if slug in missing]
    if absent:
        notes.append("no check yet for " + ", ".join(absent))
    if s.false_alarm_slugs and not s.healthy:
        notes.append("wrong: " + ", ".join(s.false_alarm_slugs))
    if s.wrong_causes:
        notes.append("cause named instead: " + ", ".join(s.wrong_causes))
    if s.no_report:
        notes.append(f"no lora_doctor.json in {s.no_report}")
    if s.errors:
        notes.append("died: " + ", ".join(s.errors))
    if s.internal_errors:
        notes.append(f"{s.internal_errors} doctor internal errors")
    return "; ".join(notes)
