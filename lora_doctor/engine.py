"""Doctor: the diagnostic engine, and the entry point for custom training loops.

It holds a run's history and facts, owns the schedule and the per-check cursors, derives the facts
every check may rely on, runs the checks of a phase, then the diagnosis pass
(:mod:`lora_doctor.diagnosis`), and reports each finding once.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Hashable, Iterable, Mapping
from typing import Any

from lora_doctor.alerts import Alerts
from lora_doctor.checks import Check, Context, Phase, Points, Read, Reads, Registry
from lora_doctor.config import DoctorConfig
from lora_doctor.diagnosis import reasoning
from lora_doctor.facts import RunFacts, derive_facts
from lora_doctor.findings import Finding, Severity, to_jsonable
from lora_doctor.history import History, is_eval_entry
from lora_doctor.report import Diagnosis

__all__ = ["Doctor"]

logger = logging.getLogger("lora_doctor")

#: LOG looks happen at every log entry for the first 2**_BATCH_SHIFT entries, then once per
#: n / 2**_BATCH_SHIFT new entries (a geometric schedule): a 100,000-entry log costs linear time.
_BATCH_SHIFT = 8


class Doctor:
    """The diagnostic engine. Framework-free: it reads plain data and returns findings.

    The Trainer callback drives it for you. In a custom training loop, drive it yourself: call
    :meth:`start` before the first step, :meth:`observe` with each step's metrics (it runs the
    checks and returns what they found), and :meth:`end` after the last step (it writes the
    diagnosis JSON when given a path). Wrap the loop in :func:`lora_doctor.watch` to get the report
    when the loop dies of an error. ``examples/custom_loop.py`` shows the whole loop.

    Args:
        config: thresholds and switches; defaults when None.
        facts: what is known about the run (``lora_doctor.read_model(model)`` reads a live PEFT
            model; ``RunFacts(max_steps=..., learning_rate=...)`` by hand); empty when None.
        checks: the check classes to run; the built-in ones when None.
        emit: log each new finding through the ``lora_doctor`` logger, and send it as an alert
            when ``config.alerts`` (False on non-main processes and where the caller prints its
            own report).
        extra_checks: your own check classes, run after ``checks``; their slugs and codes can be
            silenced (``ignore``) and stopped on (``stop_on``) like built-in ones.

    Raises:
        ValueError: ``config.ignore`` or ``config.stop_on`` names a finding no check reports, or two
            checks share a code or slug.

    Example:
        >>> doctor = Doctor(emit=False)
        >>> doctor.start()
        []
        >>> doctor.observe(10, {"loss": 2.0})
        []
    """

    def __init__(
        self,
        config: DoctorConfig | None = None,
        facts: RunFacts | None = None,
        checks: Iterable[type[Check]] | None = None,
        emit: bool = True,
        *,
        extra_checks: Iterable[type[Check]] = (),
    ) -> None:
        if config is not None and not isinstance(config, DoctorConfig):
            raise ValueError(
                f"Doctor(config=...) must be a lora_doctor.DoctorConfig, got {type(config).__name__}"
            )
        self.config = config or DoctorConfig()
        self.registry = Registry(checks, extra_checks)
        self.registry.validate("DoctorConfig.ignore", self.config.ignore)
        self.registry.validate("DoctorConfig.stop_on", self.config.stop_on)
        self.facts = facts or RunFacts()
        self.history = History()
        self.emit = emit
        self.alerts = Alerts() if emit and self.config.alerts else None
        self.findings: list[Finding] = []
        self.step = 0
        # per phase, the checks the user did not silence
        self._by_phase: dict[Phase, list[Check]] = {
            phase: [
                c
                for c in self.registry.checks
                if phase in c.phases and not self.config.silenced(c.slug, c.code)
            ]
            for phase in Phase
        }
        self._by_slug = {c.slug: c for c in self.registry.checks}
        self._states: dict[str, Any] = {
            c.code: c.State() if c.State is not None else None for c in self.registry.checks
        }
        self._cursors: dict[tuple[str, str], int] = {}
        self._next_look: dict[str, float] = {}
        self._next_batch = 0
        self._keys_derived = -1
        self._seen: set[tuple[str, Hashable]] = set()
        self._disabled: set[str] = set()
        self._retired: set[str] = set()
        self._stop_reason: Finding | None = None

    # --- the loop ---------------------------------------------------------------------------------
    def start(self) -> list[Finding]:
        """Runs the SETUP checks (the adapter's configuration); returns their findings."""
        return self.run_phase(Phase.SETUP, self.step)

    def observe(
        self, step: int | None, logs: Mapping[str, Any], *, run: bool = True
    ) -> list[Finding]:
        """Records one log entry at ``step`` (the entry's own ``step`` key when None) and runs the
        checks of its phase (EVAL for an entry of ``eval_...`` metrics, LOG otherwise).

        Args:
            step: the optimizer step the metrics belong to.
            logs: the metrics, e.g. ``{"loss": 1.93, "grad_norm": 0.41, "learning_rate": 2e-4}``.
            run: False records the entry without running the checks (for a caller that runs the
                phase itself).

        Returns:
            The findings not reported before (each also logged once when ``emit``).
        """
        if self.alerts is not None and self.alerts.pending:  # a tracker's run may have started
            self.alerts.flush()
        history = self.history
        history.add(step, logs)
        if history.last_step > self.step:
            self.step = history.last_step
        if not run:
            return []
        if is_eval_entry(logs):
            return self.run_phase(Phase.EVAL, step)
        if len(history) < self._next_batch:  # not a look: skip the call (a 1M-entry log's hot path)
            return []
        return self.run_phase(Phase.LOG, step)

    def end(self, report_path: str | os.PathLike[str] | None = None) -> Diagnosis:
        """Runs the END checks and returns the diagnosis; writes it as JSON to ``report_path``
        (atomically) when given."""
        self.run_phase(Phase.END, self.step)
        diagnosis = self.diagnosis("live")
        if report_path is not None:
            diagnosis.to_json(report_path)
        return diagnosis

    # --- running ----------------------------------------------------------------------------------
    def run_phase(self, phase: Phase, step: int | None = None) -> list[Finding]:
        """Runs the checks of ``phase`` that have something new to read, then the diagnosis pass,
        and returns the findings not reported before.

        LOG looks follow one schedule: at every entry for the first 256 entries, then once per
        n/256 new entries; every check reads every point it declared, whenever it looks. A check
        that raises is logged once and switched off for the rest of the run; the others run.
        """
        if step is not None and step > self.step:
            self.step = int(step)
        if phase is Phase.LOG:
            n = len(self.history)
            if n < self._next_batch:
                return []
            self._next_batch = n + max(1, n >> _BATCH_SHIFT)
        checks = self._by_phase[phase]
        if not checks:
            return []
        self._derive()
        produced: list[Finding] = []
        for check in checks:
            if check.code in self._disabled or check.code in self._retired:
                continue
            if check.needs_lora and self.facts.has_lora is False:
                continue
            ctx = self._context(check, phase)
            if ctx is None:
                continue
            try:
                found = list(check.run(ctx))
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
            if found and check.once:
                self._retired.add(check.code)
            produced.extend(found)
        look = Context(self.facts, self.history, self.config, phase, self.step)
        kept = reasoning.run(produced, self.findings, self.facts, self.config, look)
        return [f for f in kept if self._record(f, self._dedup_key(f))]

    def _derive(self) -> None:
        """Derives the facts every check may rely on, when the history has new keys."""
        keys = self.history.key_count
        if keys != self._keys_derived:
            self._keys_derived = keys
            derive_facts(self.facts, self.history.keys())

    def _context(self, check: Check, phase: Phase) -> Context | None:
        """The context of ``check`` at this look, its cursors moved past what it reads; None when
        the check has nothing new to read or its cadence says not yet."""
        triggers = phase in (Phase.LOG, Phase.EVAL) and any(
            r.how is not Read.ALL for r in check.reads
        )
        reads: dict[str, Points] = {}
        fresh = False
        for read in check.reads:
            if read.how is Read.ALL:
                continue
            for key in self._keys(read):
                points = self._read(check.code, key, read)
                reads[key] = points
                fresh = fresh or len(points) > 0
        if triggers and not fresh:
            return None
        ctx = Context(
            facts=self.facts,
            history=self.history,
            config=self.config,
            phase=phase,
            step=self.step,
            state=self._states.get(check.code),
            reads=reads,
        )
        if check.cadence is not None:
            last = float(self.history.last_step)
            if phase is not Phase.END and last < self._next_look.get(check.code, -math.inf):
                return None
            if not check.ready(ctx):
                return None
            self._next_look[check.code] = last * (1 + getattr(self.config, check.cadence.growth))
        return ctx

    def _keys(self, read: Reads) -> list[str]:
        if read.fact:
            return [read.key]
        if "*" not in read.key:
            return [read.key]
        head, _, tail = read.key.partition("*")
        keys = self.history.keys()
        return [k for k in keys if k.startswith(head) and k.endswith(tail)]

    def _read(self, code: str, key: str, read: Reads) -> Points:
        """The points of ``key`` for check ``code`` since its last look; moves its cursor."""
        if read.fact:  # a list of the facts: its new elements, by index
            items = getattr(self.facts, key, None)
            n = len(items) if isinstance(items, list) else 0
            seen = min(self._cursors.get((code, key), 0), n)
            self._cursors[code, key] = n
            new = tuple(range(seen, n))
            return Points(key, new, new, offset=seen)
        n = self.history.count(key)
        seen = min(self._cursors.get((code, key), 0), n)
        self._cursors[code, key] = n
        if read.how is Read.LATEST:
            start = n - 1 if n > seen else n
        else:
            start = max(0, seen - read.lookback(self.config))
        steps, values = self.history.points(key, start)
        return Points(key, steps, values, new_from=max(0, seen - start), offset=start)

    def _dedup_key(self, finding: Finding) -> Hashable:
        check = self._by_slug.get(finding.slug)
        return check.dedup_key(finding) if check is not None else finding.slug

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
        if self.alerts is not None:
            self.alerts.add(finding)
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
        and :meth:`restore_state` rebuilds the history from it (the checks then read it again from
        its first point, which rebuilds what they carry between looks).

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
        self._cursors.clear()
        self._next_look.clear()
        self._next_batch = 0
        self._keys_derived = -1
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
