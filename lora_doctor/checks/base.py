"""The check contract: what a check declares, and the context the engine hands it at each look.

Three layers, each with one job (DESIGN.md section 1, "The check contract"):

1. **Rules** are pure functions of arrays and facts that return a verdict (they live beside the
   checks that use them and are tested on arrays alone).
2. **Checks** are small stateless classes: a stable ``code`` and ``slug``, a default severity, the
   phases they run in, and a declaration of what they read (:class:`Reads`): every point of a
   series since their last look (``Read.NEW``, with ``before`` points of context), only its latest
   value (``Read.LATEST``), or the whole series (``Read.ALL``). The engine owns the cursors and the
   one schedule, so no check can skip a point it was meant to see. A check that must carry
   something from one look to the next (a running best, a rolling window) declares a ``State``
   dataclass; the engine keeps one instance per run and hands it over as ``ctx.state``.
3. **The diagnosis pass** (:mod:`lora_doctor.diagnosis`) runs after the checks of a look, over all
   findings and facts: a check never reads another check's findings.
"""

from __future__ import annotations

import enum
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from lora_doctor.config import DoctorConfig
from lora_doctor.facts import RunFacts
from lora_doctor.findings import Finding, Recommendation, Severity
from lora_doctor.history import History, Series

__all__ = ["Cadence", "Check", "Context", "Phase", "Points", "Read", "Reads"]


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


class Read(str, enum.Enum):
    """How a check reads a series.

    NEW: every point logged since the check's last look (plus ``Reads.before`` earlier points as
        context); a look with no new point of any NEW or LATEST series skips the check.
    LATEST: only the latest point; a look with no new point skips the check.
    ALL: the whole series, as cached numpy arrays (context only: it never triggers a look).
    """

    NEW = "new"
    LATEST = "latest"
    ALL = "all"


@dataclass(frozen=True)
class Reads:
    """One series a check reads, and how.

    Attributes:
        key: the logged metric's key (``"loss"``), or a pattern with ``*`` matching several keys
            (``"eval_*loss"``), or, with ``fact=True``, the name of a list field of
            :class:`~lora_doctor.facts.RunFacts` (``"spectrum"``: a new element counts as a new
            point).
        how: see :class:`Read`.
        before: with ``Read.NEW``, how many points logged before the new ones to hand over too
            (rolling windows); an int, or the name of an int :class:`~lora_doctor.DoctorConfig`
            field.
        fact: the key names a list of the run facts instead of a logged series.
    """

    key: str
    how: Read = Read.NEW
    before: int | str = 0
    fact: bool = False

    def lookback(self, config: DoctorConfig) -> int:
        """``before`` as a number of points."""
        value = getattr(config, self.before) if isinstance(self.before, str) else self.before
        return max(int(value), 0)


@dataclass(frozen=True)
class Cadence:
    """When a check looks, beyond "at every look of its phases".

    ``growth`` names a :class:`~lora_doctor.DoctorConfig` field: once :meth:`Check.ready` first
    holds, the check looks at that step and then again only once the step has grown by that share
    (a geometric schedule: about ten looks whatever the run's length, each one a chance for noise
    to pass a statistical test). The END phase always looks.
    """

    growth: str


@dataclass(frozen=True)
class Points:
    """The points of one series handed to a check at a look.

    ``steps`` and ``values`` hold the ``before`` context points first, then the new ones from index
    ``new_from``; ``offset`` is the position of ``steps[0]`` in the whole series (so
    ``offset + new_from`` is how many points came before the first new one). Values may be NaN or
    infinite; steps are in log order.
    """

    key: str
    steps: Sequence[float]
    values: Sequence[float]
    new_from: int = 0
    offset: int = 0

    @property
    def new_steps(self) -> Sequence[float]:
        return self.steps[self.new_from :]

    @property
    def new_values(self) -> Sequence[float]:
        return self.values[self.new_from :]

    @property
    def seen_before(self) -> int:
        """How many points of the series were logged before the first new one."""
        return self.offset + self.new_from

    def __len__(self) -> int:
        return len(self.values) - self.new_from


_NO_POINTS = Points("", (), ())


@dataclass
class Context:
    """What a check reads at one look: the facts, the series it declared, the config and the moment.

    Attributes:
        facts: the run's facts (read-only for checks: the engine derives facts before the checks).
        history: the whole metric history (prefer the declared reads: :meth:`points`,
            :meth:`series`).
        config: the thresholds; every rule and estimate takes them from here.
        phase: the phase of this look.
        step: the run's optimizer step at this look.
        state: the check's own ``State`` instance, kept by the engine between looks (None when the
            check declares none).
        reads: the declared series, by key, as handed to the check at this look.
    """

    facts: RunFacts
    history: History
    config: DoctorConfig
    phase: Phase
    step: int
    state: Any = None
    reads: Mapping[str, Points] = field(default_factory=dict)

    def points(self, key: str) -> Points:
        """The points of ``key`` handed to the check (empty when the key has none to hand over)."""
        return self.reads.get(key, _NO_POINTS)

    def matching(self, prefix: str = "", suffix: str = "") -> dict[str, Points]:
        """The handed-over series whose key starts with ``prefix`` and ends with ``suffix``."""
        return {k: p for k, p in self.reads.items() if k.startswith(prefix) and k.endswith(suffix)}

    def series(self, key: str) -> Series:
        """The whole series of ``key`` as numpy arrays (cached by the history)."""
        return self.history.series(key)

    @property
    def horizon(self) -> float:
        """The run's planned length in steps: ``max_steps``, or the steps seen so far."""
        return float(self.facts.max_steps or max(self.step, self.history.last_step, 1))

    @property
    def steps_left(self) -> int | None:
        """Optimizer steps the run still has to go: 0 at the end and offline (a saved run is
        over), None when its plan is unknown. A fix says "stop training" or "the remaining steps
        are wasted" only when steps remain."""
        if self.phase is Phase.END or self.facts.saved_global_step is not None:
            return 0
        if not self.facts.max_steps:
            return None
        return max(self.facts.max_steps - self.step, 0)


class Check:
    """Base class of every check.

    Subclasses set ``code``, ``slug``, ``severity``, ``phases`` and ``reads`` and implement
    :meth:`run`, which reads the context and yields findings (built with :meth:`finding`). A check
    keeps nothing on ``self``: what it carries between looks lives in ``ctx.state`` (declare a
    ``State`` dataclass), and the engine decides when it looks.

    Example:
        >>> class LossIsFive(Check):
        ...     code, slug, severity = "LD999", "loss-is-five", Severity.INFO
        ...     phases = frozenset({Phase.LOG})
        ...     reads = (Reads("loss"),)
        ...     def run(self, ctx):
        ...         pts = ctx.points("loss")
        ...         if 5.0 in pts.new_values:
        ...             yield self.finding(ctx, "Loss hit 5", "It did.")
    """

    code: ClassVar[str]
    slug: ClassVar[str]
    severity: ClassVar[Severity] = Severity.WARNING
    phases: ClassVar[frozenset[Phase]] = frozenset()
    #: The series the check reads (see :class:`Reads`). A check with NEW or LATEST reads looks only
    #: when one of them has a new point (and at END); a check without any looks at every call of
    #: its phases.
    reads: ClassVar[tuple[Reads, ...]] = ()
    #: A geometric look schedule (see :class:`Cadence`); None: every look of its phases.
    cadence: ClassVar[Cadence | None] = None
    #: Checks that read the model or its config: switched off when the model has no LoRA layers.
    needs_lora: ClassVar[bool] = False
    #: True (the default) for checks that report once per run: the engine stops running them after
    #: their first finding. Checks that report once per key (per adapter, per metric) set False and
    #: override :meth:`dedup_key`.
    once: ClassVar[bool] = True
    #: What the check carries between looks, as a dataclass type (instantiated with no argument).
    State: ClassVar[type | None] = None

    def run(self, ctx: Context) -> Iterable[Finding]:
        raise NotImplementedError

    def ready(self, ctx: Context) -> bool:
        """With a :attr:`cadence`: whether the geometric schedule may start at this look."""
        return True

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


def finite(
    steps: Sequence[float] | np.ndarray, values: Sequence[float] | np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The finite points of a series, as float arrays.

    Example:
        >>> finite([1, 2, 3], [1.0, float("nan"), 3.0])[1].tolist()
        [1.0, 3.0]
    """
    x, y = np.asarray(steps, dtype=float), np.asarray(values, dtype=float)
    keep = np.isfinite(y)
    return x[keep], y[keep]
