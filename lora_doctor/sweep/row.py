"""One rank's run in a sweep: what was measured, and whether the run failed."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from lora_doctor.findings import to_jsonable

__all__ = ["DIVERGENCE_SLUGS", "SweepRow", "alpha_number"]

#: Findings that mark a rank's run as diverged (it is then recorded as failed).
DIVERGENCE_SLUGS = frozenset({"non-finite-values", "loss-divergence"})


def alpha_number(value: float) -> float:
    """An alpha as an int when it is whole (16 rather than 16.0), else the float.

    Example:
        >>> alpha_number(16.0), alpha_number(2.5)
        (16, 2.5)
    """
    return int(value) if float(value).is_integer() else float(value)


@dataclass
class SweepRow:
    """One rank's run in a sweep.

    Attributes:
        r: the LoRA rank.
        lora_alpha: the LoRA alpha the run used (``alpha_ratio * r``).
        metric: the metric's final value, None when the run failed before it.
        train_seconds: wall-clock seconds of ``trainer.train()``.
        peak_memory_bytes: peak CUDA memory allocated by tensors during build, training and
            evaluation; None without CUDA.
        lora_params: LoRA parameters of the adapter, counted at true size.
        findings: the doctor's findings for this run (code, slug, severity, step, title).
        status: ``"ok"`` or ``"failed"``.
        reason: why the run failed (out of memory, diverged), None when it did not.
    """

    r: int
    lora_alpha: float
    metric: float | None = None
    train_seconds: float | None = None
    peak_memory_bytes: int | None = None
    lora_params: int | None = None
    findings: list[dict[str, Any]] = field(default_factory=list)
    status: str = "ok"
    reason: str | None = None

    @property
    def usable(self) -> bool:
        """True when the run finished with a finite metric (the rule considers only these)."""
        return self.status == "ok" and self.metric is not None and math.isfinite(self.metric)

    @property
    def slugs(self) -> list[str]:
        return [str(f.get("slug", "")) for f in self.findings]

    def fail(self, reason: str) -> None:
        """Marks the run as failed; the first reason given is kept."""
        if self.status != "failed":
            self.status, self.reason = "failed", reason

    def check_divergence(self, metric: str) -> None:
        """Marks the run as failed when it diverged: a non-finite metric, or a
        ``non-finite-values`` / ``loss-divergence`` finding."""
        for finding in self.findings:
            if finding.get("slug") in DIVERGENCE_SLUGS:
                self.fail(f"diverged: {finding.get('title') or finding.get('slug')}")
        if self.metric is not None and not math.isfinite(self.metric):
            self.fail(f"diverged: {metric} is {self.metric}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "r": self.r,
            "lora_alpha": self.lora_alpha,
            "metric": to_jsonable(self.metric),
            "train_seconds": to_jsonable(self.train_seconds),
            "peak_memory_bytes": self.peak_memory_bytes,
            "lora_params": self.lora_params,
            "findings": to_jsonable(self.findings),
            "status": self.status,
            "reason": self.reason,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SweepRow:
        """Reads a row back from :meth:`to_dict`'s form; unknown keys are ignored."""

        def number(key: str) -> float | None:
            value = data.get(key)
            return float(value) if isinstance(value, (int, float)) else None

        def count(key: str) -> int | None:
            value = data.get(key)
            return int(value) if isinstance(value, (int, float)) else None

        return cls(
            r=int(data["r"]),
            lora_alpha=alpha_number(float(data.get("lora_alpha", 2 * int(data["r"])))),
            metric=number("metric"),
            train_seconds=number("train_seconds"),
            peak_memory_bytes=count("peak_memory_bytes"),
            lora_params=count("lora_params"),
            findings=[dict(f) for f in data.get("findings") or [] if isinstance(f, Mapping)],
            status=str(data.get("status", "ok")),
            reason=data.get("reason"),
        )
