"""Doctor: holds a run's history and facts, runs the checks of a phase, de-duplicates findings."""

from __future__ import annotations

import logging
from collections.abc import Hashable, Iterable, Mapping
from typing import Any

from lora_doctor.checks import ALL_CHECKS, Check, Context, Phase
from lora_doctor.config import DoctorConfig
from lora_doctor.facts import RunFacts
from lora_doctor.findings import Finding, Severity, to_jsonable
from lora_doctor.history import History
from lora_doctor.report import Diagnosis

__all__ = ["Doctor"]

logger = logging.getLogger("lora_doctor")


class Doctor:
    """The diagnostic engine. Framework-free: it reads plain data and returns findings.

    Feed it facts and log entries; call :meth:`run_phase` at the moments of :class:`Phase`; read
    the new findings it returns (each is returned, and logged, once).

    Args:
        config: thresholds and switches; defaults when None.
        facts: what is known about the run; empty when None.
        checks: the check classes to run; all registered checks when None.
        emit: log each new finding through the ``lora_doctor`` logger (False on non-main processes
            and where the caller prints its own report).

    Example:
        >>> doctor = Doctor(emit=False)
        >>> doctor.observe(10, {"loss": 2.0})
        >>> doctor.run_phase(Phase.LOG)
        []
    """

    def __init__(
        self,
        config: DoctorConfig | None = None,
        facts: RunFacts | None = None,
        checks: Iterable[type[Check]] | None = None,
        emit: bool = True,
    ) -> None:
        self.config = config or DoctorConfig()
        self.facts = facts or RunFacts()
        self.history = History()
        self.emit = emit
        self.findings: list[Finding] = []
        self.step = 0
        self._checks: list[Check] = [cls() for cls in (ALL_CHECKS if checks is None else checks)]
        # per phase, the checks the user did not silence (run_phase is called at every log entry)
        self._by_phase: dict[Phase, list[Check]] = {
            phase: [
                c
                for c in self._checks
                if phase in c.phases and not self.config.silenced(c.slug, c.code)
            ]
            for phase in Phase
        }
        # LOG checks marked ``batched`` run at every log entry for the first 256 entries, then once
        # per n/256 new entries (a geometric schedule): a 100,000-entry log costs linear time.
        self._unbatched_log = [c for c in self._by_phase[Phase.LOG] if not c.batched]
        self._next_batch = 0
        self._seen: set[tuple[str, Hashable]] = set()
        self._disabled: set[str] = set()
        self._stop_reason: Finding | None = None

    # --- input ------------------------------------------------------------------------------------
    def observe(self, step: int | None, logs: Mapping[str, Any]) -> None:
        """Records one log entry at ``step`` (the entry's own ``step`` key when None)."""
        self.history.add(step, logs)
        self.step = max(self.step, self.history.last_step)

    # --- running ----------------------------------------------------------------------------------
    def run_phase(self, phase: Phase, step: int | None = None) -> list[Finding]:
        """Runs every enabled check of ``phase`` and returns the findings not reported before.

        A check that raises is logged once and switched off for the rest of the run; the others run.
        """
        if step is not None and step > self.step:
            self.step = int(step)
        checks = self._by_phase[phase]
        if phase is Phase.LOG:
            n = len(self.history)
            if n >= self._next_batch:
                self._next_batch = n + max(1, n >> 8)
            else:
                checks = self._unbatched_log
        if not checks:
            return []
        ctx = Context(
            facts=self.facts,
            history=self.history,
            config=self.config,
            phase=phase,
            step=self.step,
            findings=self.findings,
        )
        new: list[Finding] = []
        for check in checks:
            if check.code in self._disabled:
                continue
            if check.needs_lora and self.facts.has_lora is False:
                continue
            try:
                produced = list(check.run(ctx))
            except Exception:  # a bug in a check must never reach the user's training
                self._disabled.add(check.code)
                logger.warning(
                    "lora-doctor: internal error in check %s (%s); this check is switched off "
                    "for the rest of the run, training is not affected.",
                    check.code,
                    check.slug,
                    exc_info=True,
                )
                continue
            if produced:
                new.extend(f for f in produced if self._record(f, check.dedup_key(f)))
        return new

    def add_finding(self, finding: Finding) -> bool:
        """Records a finding made outside the checks (e.g. by a probe); False if already reported."""
        return self._record(finding, finding.slug)

    def _record(self, finding: Finding, dedup_key: Hashable) -> bool:
        """Keeps, logs and acts on a finding unless it was reported before or is silenced."""
        key = (finding.slug, dedup_key)
        if key in self._seen or self.config.silenced(finding.slug, finding.code):
            return False
        self._seen.add(key)
        self.findings.append(finding)
        self._log(finding)
        if self._stop_reason is None and self.config.stops(finding.slug, finding.code):
            self._stop_reason = finding
        return True

    @property
    def stop_reason(self) -> Finding | None:
        """The first finding whose slug is in ``config.stop_on``, if any."""
        return self._stop_reason

    def _log(self, finding: Finding) -> None:
        if not self.emit:
            return
        level = logging.INFO if finding.severity is Severity.INFO else logging.WARNING
        logger.log(level, "%s", finding.log_line())

    # --- saving and restoring --------------------------------------------------------------------
    def export_state(self) -> dict[str, Any]:
        """What a checkpoint keeps of the doctor, as JSON-able data: facts, findings, the step and
        which findings were reported (so that a resumed run does not report them again).

        The metric history is not part of it: a checkpoint's ``log_history`` holds the same entries,
        and :meth:`restore_state` rebuilds the history from it.

        Example:
            >>> Doctor(emit=False).export_state()["findings"]
            []
        """
        return {
            "step": self.step,
            "facts": to_jsonable(self.facts.to_dict()),
            "findings": [f.to_dict() for f in self.findings],
            "reported": [to_jsonable([slug, key]) for slug, key in sorted(self._seen, key=repr)],
        }

    def restore_state(
        self, data: Mapping[str, Any], log_history: Iterable[Mapping[str, Any]] = ()
    ) -> None:
        """Takes back a state saved by :meth:`export_state`; the history is rebuilt from the
        checkpoint's ``log_history``. Unknown keys are ignored, missing ones leave things as they are.

        Example:
            >>> d = Doctor(emit=False)
            >>> d.restore_state({"step": 40}, [{"step": 40, "loss": 1.0}])
            >>> d.step, len(d.history)
            (40, 1)
        """
        facts = data.get("facts")
        if isinstance(facts, Mapping):
            self.facts = RunFacts.from_dict(facts)
        findings = data.get("findings")
        if isinstance(findings, list):
            self.findings = [Finding.from_dict(f) for f in findings if isinstance(f, Mapping)]
        reported = data.get("reported")
        if isinstance(reported, list):
            self._seen = {
                (str(item[0]), _hashable(item[1]))
                for item in reported
                if isinstance(item, list) and len(item) == 2
            }
        self.history = History.from_log_history(log_history)
        self.step = max(int(data.get("step", 0) or 0), self.history.last_step)

    # --- output -----------------------------------------------------------------------------------
    def diagnosis(self, source: str = "live") -> Diagnosis:
        """The diagnosis so far: run facts and every finding reported, in order."""
        diagnosis = Diagnosis.build(self.facts, self.findings, source=source, global_step=self.step)
        diagnosis.history = self.history
        return diagnosis


def _hashable(value: Any) -> Hashable:
    """A de-duplication key read back from JSON: lists become tuples again."""
    if isinstance(value, list):
        return tuple(_hashable(v) for v in value)
    return value  # type: ignore[no-any-return]
