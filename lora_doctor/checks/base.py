"""The shape of a check: a small class with a stable code and slug, and a pure ``run``."""

from __future__ import annotations

import enum
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from lora_doctor.config import DoctorConfig
from lora_doctor.facts import RunFacts
from lora_doctor.findings import Finding, Recommendation, Severity
from lora_doctor.history import History

__all__ = ["Check", "Context", "Phase"]


class Phase(str, enum.Enum):
    """When a check runs.

    SETUP: at the start of training, from the model and its configuration (offline: from
        adapter_config.json).
    FIRST_STEPS: once, after ``check_after_steps`` optimizer steps (gradients, moved weights, shapes).
    LOG: each time the Trainer logs (offline: for each entry of log_history, in order).
    EVAL: after each evaluation.
    END: once, when training ends (or dies).
    """

    SETUP = "setup"
    FIRST_STEPS = "first_steps"
    LOG = "log"
    EVAL = "eval"
    END = "end"


@dataclass
class Context:
    """What a check reads: the run's facts, its metric history, the config and the moment.

    ``findings`` holds what was reported so far (checks may build on each other's verdicts, e.g. the
    plateau's differential diagnosis reads ``rank-saturated``).
    """

    facts: RunFacts
    history: History
    config: DoctorConfig
    phase: Phase
    step: int
    findings: list[Finding] = field(default_factory=list)

    def found(self, slug: str) -> Finding | None:
        """The finding of ``slug`` reported so far, if any (the latest)."""
        for f in reversed(self.findings):
            if f.slug == slug:
                return f
        return None


class Check:
    """Base class of every rule.

    Subclasses set ``code``, ``slug``, ``severity`` and ``phases`` and implement :meth:`run`, which
    reads the context and yields findings (built with :meth:`finding`). A check instance lives as
    long as one run's doctor, so it may keep state between calls on ``self``.

    Example:
        >>> class LossIsFive(Check):
        ...     code, slug, severity = "LD999", "loss-is-five", Severity.INFO
        ...     phases = frozenset({Phase.LOG})
        ...     def run(self, ctx):
        ...         if 5.0 in ctx.history.series("loss").values:
        ...             yield self.finding(ctx, "Loss hit 5", "It did.")
    """

    code: ClassVar[str]
    slug: ClassVar[str]
    severity: ClassVar[Severity] = Severity.WARNING
    phases: ClassVar[frozenset[Phase]] = frozenset()
    #: Checks that read the model or its config: switched off when the model has no LoRA layers.
    needs_lora: ClassVar[bool] = False
    #: Incremental LOG checks that read only the points logged since their last run: past the first
    #: 256 log entries the engine runs them once per n/256 new entries; their findings carry the
    #: step of the point that made them, so live and offline agree.
    batched: ClassVar[bool] = False

    def run(self, ctx: Context) -> Iterable[Finding]:
        raise NotImplementedError

    def dedup_key(self, finding: Finding) -> Hashable:
        """Findings with the same key are reported once per run. Default: once per slug."""
        return finding.slug

    def finding(
        self,
        ctx: Context,
        title: str,
        message: str,
        evidence: Mapping[str, Any] | None = None,
        recommendation: Recommendation | None = None,
        *,
        severity: Severity | None = None,
        step: int | None = None,
    ) -> Finding:
        """Builds a finding of this check, at the context's step unless ``step`` is given."""
        if step is None and ctx.phase is not Phase.SETUP:
            step = ctx.step
        return Finding(
            code=self.code,
            slug=self.slug,
            severity=severity or self.severity,
            step=step,
            title=title,
            message=message,
            evidence=dict(evidence or {}),
            recommendation=recommendation,
        )
