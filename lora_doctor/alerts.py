"""Alerts: each warning or error finding, once, where people watch long runs (opt-in).

With ``DoctorConfig(alerts=True)`` the engine hands every new warning or error finding to
:class:`Alerts`, which sends it as a W&B alert (``wandb.run.alert``: Slack or e-mail, as the user
set up in W&B) when a W&B run is active. A finding made before the run starts (the Trainer's
W&B callback starts it after the doctor's set-up checks) waits and is sent at the next look once
the run is there; each finding is sent once.

Which trackers have an alert API (docs/custom-loops.md lists them for users): W&B does
(``run.alert(title, text, level)``, used here). Trackio has the same shape (``trackio.alert``) but
is pre-1.0 and prints each alert to the console; Comet's ``Experiment.send_notification`` is an
e-mail at the end of an online experiment, without a level; MLflow, Neptune, TensorBoard and
ClearML have none. Those get the findings through their metrics (``lora_doctor/...``) only.

This module imports nothing outside the standard library: ``wandb`` is looked up in
``sys.modules`` (no run can be active unless the user's code or a Trainer callback imported it).
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from lora_doctor.findings import Finding, Severity

__all__ = ["Alerts"]

logger = logging.getLogger("lora_doctor")

#: W&B refuses titles of 64 characters or more.
_TITLE_MAX = 63


def alert_text(finding: Finding) -> str:
    """The body of a finding's alert: what, when, the evidence in words, and the fix."""
    where = f" at step {finding.step}" if finding.step is not None else ""
    lines = [f"lora-doctor {finding.code} {finding.slug}{where}: {finding.message}"]
    rec = finding.recommendation
    if rec is not None:
        lines.append(f"Fix: {rec.summary}")
        lines.extend(f"{i}. {step}" for i, step in enumerate(rec.steps, 1))
        if rec.config_changes:
            changes = ", ".join(f"{k}={v!r}" for k, v in rec.config_changes.items())
            lines.append(f"Config changes: {changes}")
    return "\n".join(lines)


def alert_title(finding: Finding) -> str:
    """The finding's title, cut to what W&B accepts."""
    title = finding.title
    return title if len(title) <= _TITLE_MAX else title[: _TITLE_MAX - 1] + "…"


class _WandB:
    """W&B: ``wandb.run.alert`` while a run is active."""

    name = "W&B"

    def run(self) -> Any:
        """The active W&B run, or None (also when wandb was never imported)."""
        wandb = sys.modules.get("wandb")
        return getattr(wandb, "run", None) if wandb is not None else None

    def send(self, run: Any, finding: Finding) -> None:
        levels = sys.modules["wandb"].AlertLevel
        level = levels.ERROR if finding.severity is Severity.ERROR else levels.WARN
        run.alert(title=alert_title(finding), text=alert_text(finding), level=level)


class Alerts:
    """Sends each warning or error finding once to every tracker with an active run.

    The engine calls :meth:`add` for each new finding and :meth:`flush` at each look (cheap: a
    dictionary lookup while nothing waits). A tracker whose alert call raises is switched off for
    the rest of the run, with one warning line; training is never affected.

    Example:
        >>> alerts = Alerts()
        >>> alerts.pending
        0
    """

    def __init__(self) -> None:
        self._trackers = [_WandB()]
        self._findings: list[Finding] = []
        self._sent: dict[str, int] = {t.name: 0 for t in self._trackers}
        self._off: set[str] = set()

    @property
    def pending(self) -> int:
        """Findings that some tracker still has to get (when a run of it becomes active)."""
        live = [self._sent[t.name] for t in self._trackers if t.name not in self._off]
        return len(self._findings) - min(live, default=len(self._findings))

    def add(self, finding: Finding) -> None:
        """Queues ``finding`` when it is a warning or an error, and sends what can be sent."""
        if finding.severity in (Severity.WARNING, Severity.ERROR):
            self._findings.append(finding)
            self.flush()

    def flush(self) -> None:
        """Sends the queued findings to each tracker whose run is active now, in order."""
        for tracker in self._trackers:
            sent = self._sent[tracker.name]
            if tracker.name in self._off or sent == len(self._findings):
                continue
            try:
                run = tracker.run()
                if run is None:
                    continue
                for finding in self._findings[sent:]:
                    tracker.send(run, finding)
                    self._sent[tracker.name] += 1
            except Exception as exc:
                self._off.add(tracker.name)
                logger.warning(
                    "lora-doctor: could not send an alert to %s (%s: %s); alerts to it are off "
                    "for the rest of the run, training is not affected.",
                    tracker.name,
                    type(exc).__name__,
                    exc,
                )
