"""What the doctor reports: severities, findings and their recommendations.

All objects here are frozen dataclasses made of plain data, so that a finding can be logged, compared,
written to JSON and read back without any framework.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Evidence", "Finding", "Recommendation", "Severity", "to_jsonable"]

#: The numbers a verdict rests on: plain names to JSON-able values.
Evidence = Mapping[str, Any]


class Severity(str, enum.Enum):
    """How serious a finding is. Ordered: ``INFO < WARNING < ERROR``."""

    INFO = "info"
    WARNING = "warning"
    ERROR = "error"

    @property
    def rank(self) -> int:
        return _RANKS[self]

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, Severity):
            return NotImplemented
        return self.rank < other.rank

    def __le__(self, other: object) -> bool:
        if not isinstance(other, Severity):
            return NotImplemented
        return self.rank <= other.rank

    def __gt__(self, other: object) -> bool:
        if not isinstance(other, Severity):
            return NotImplemented
        return self.rank > other.rank

    def __ge__(self, other: object) -> bool:
        if not isinstance(other, Severity):
            return NotImplemented
        return self.rank >= other.rank

    @classmethod
    def parse(cls, value: str | Severity) -> Severity:
        """Returns the severity named by ``value``.

        Raises:
            ValueError: naming the accepted values.
        """
        try:
            return cls(value)
        except ValueError:
            names = ", ".join(s.value for s in cls)
            raise ValueError(f"unknown severity {value!r}: expected one of {names}") from None


_RANKS = {Severity.INFO: 0, Severity.WARNING: 1, Severity.ERROR: 2}


@dataclass(frozen=True)
class Recommendation:
    """What to do about a finding.

    Attributes:
        summary: one line, the gist of the fix.
        steps: the fix in order, each an action with the exact argument to change.
        config_changes: LoRA or training arguments to set, e.g. ``{"r": 16, "lora_alpha": 32}``.
        restart_from_scratch: True when the fix cannot be applied to the running job or a checkpoint
            (a new rank changes the adapter's shapes).
    """

    summary: str
    steps: tuple[str, ...] = ()
    config_changes: Mapping[str, Any] = field(default_factory=dict)
    restart_from_scratch: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "summary": self.summary,
            "steps": list(self.steps),
            "config_changes": to_jsonable(dict(self.config_changes)),
            "restart_from_scratch": self.restart_from_scratch,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Recommendation:
        return cls(
            summary=str(data.get("summary", "")),
            steps=tuple(str(s) for s in data.get("steps", ())),
            config_changes=dict(data.get("config_changes") or {}),
            restart_from_scratch=bool(data.get("restart_from_scratch", False)),
        )


@dataclass(frozen=True)
class Finding:
    """One problem (or notable fact) the doctor found.

    Attributes:
        code: stable code, e.g. ``"LD201"``.
        slug: stable name, e.g. ``"loss-plateau"`` (DESIGN.md lists them).
        severity: how serious it is.
        step: the optimizer step at which it was established, or None before training.
        title: one line that states the problem with its key number.
        message: what was observed, against which threshold, why it matters and what to change.
        evidence: the numbers the verdict rests on.
        recommendation: the fix, or None for a purely informative finding.
    """

    code: str
    slug: str
    severity: Severity
    step: int | None
    title: str
    message: str
    evidence: Evidence = field(default_factory=dict)
    recommendation: Recommendation | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "code": self.code,
            "slug": self.slug,
            "severity": self.severity.value,
            "step": self.step,
            "title": self.title,
            "message": self.message,
            "evidence": to_jsonable(dict(self.evidence)),
            "recommendation": self.recommendation.to_dict() if self.recommendation else None,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Finding:
        """Reads a finding back from :meth:`to_dict`'s form; unknown keys are ignored."""
        rec = data.get("recommendation")
        step = data.get("step")
        return cls(
            code=str(data.get("code", "")),
            slug=str(data.get("slug", "")),
            severity=Severity.parse(data.get("severity", "info")),
            step=int(step) if step is not None else None,
            title=str(data.get("title", "")),
            message=str(data.get("message", "")),
            evidence=dict(data.get("evidence") or {}),
            recommendation=Recommendation.from_dict(rec) if isinstance(rec, Mapping) else None,
        )

    def log_line(self) -> str:
        """The line the logger prints: code, slug, step, title, message and the fix.

        The fix is printed once: its steps, which spell it out, or its summary when it has none
        (the summary, the gist of the steps, stays in the JSON).

        Example:
            >>> fix = Recommendation("Set lora_alpha=32", ("Set lora_alpha=32 in LoraConfig",))
            >>> Finding("LD110", "alpha-rank-ratio", Severity.WARNING, None, "t", "m.", {}, fix).log_line()
            '[LD110 alpha-rank-ratio]: t. m. Fix: (1) Set lora_alpha=32 in LoraConfig'
        """
        where = f" at step {self.step}" if self.step is not None else ""
        text = f"[{self.code} {self.slug}]{where}: {self.title}. {self.message}"
        rec = self.recommendation
        if rec is not None and rec.steps:
            text += " Fix: " + " ".join(f"({i}) {s}" for i, s in enumerate(rec.steps, 1))
        elif rec is not None:
            text += f" Fix: {rec.summary}."
        return text


def to_jsonable(value: Any) -> Any:
    """Converts ``value`` to strict JSON data: non-finite floats become None, numpy scalars and
    arrays become Python numbers and lists, tuples and sets become lists, other objects their str."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, enum.Enum):
        return to_jsonable(value.value)
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value, key=str) if isinstance(value, (set, frozenset)) else value
        return [to_jsonable(v) for v in items]
    tolist = getattr(value, "tolist", None)  # numpy scalars and arrays
    if callable(tolist):
        return to_jsonable(tolist())
    return str(value)
