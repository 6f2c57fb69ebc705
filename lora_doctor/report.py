"""Diagnosis: the versioned JSON report, its text summary, and how it is written."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_doctor._version import __version__
from lora_doctor.facts import RunFacts
from lora_doctor.findings import Finding, Severity, to_jsonable
from lora_doctor.history import History

__all__ = ["SCHEMA_VERSION", "Diagnosis", "load_schema", "write_json_atomic"]

SCHEMA_VERSION = 1


def load_schema() -> dict[str, Any]:
    """The JSON Schema of the diagnosis file (shipped in the package as
    ``lora_doctor/schema/diagnosis.schema.json``).

    Example:
        >>> load_schema()["properties"]["schema_version"]
        {'const': 1}
    """
    from importlib.resources import files

    text = files("lora_doctor").joinpath("schema/diagnosis.schema.json").read_text("utf-8")
    data: dict[str, Any] = json.loads(text)
    return data


@dataclass
class Diagnosis:
    """A run's diagnosis: what is known about the run and every finding, in the order found.

    Example:
        >>> d = Diagnosis(run={"global_step": 0}, findings=[])
        >>> d.to_dict()["schema_version"]
        1
    """

    run: dict[str, Any] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)
    source: str = "live"
    schema_version: int = SCHEMA_VERSION
    tool_version: str = __version__
    #: The curves the diagnosis was made from (not written to JSON; used by :meth:`plot`).
    history: History | None = field(default=None, repr=False, compare=False)

    @classmethod
    def build(
        cls, facts: RunFacts, findings: Iterable[Finding], source: str, global_step: int
    ) -> Diagnosis:
        run: dict[str, Any] = {"global_step": global_step}
        run.update(facts.to_dict())
        return cls(run=run, findings=list(findings), source=source)

    # --- reading ----------------------------------------------------------------------------------
    @property
    def worst(self) -> Severity | None:
        """The highest severity among the findings, None when there are none."""
        return max((f.severity for f in self.findings), default=None)

    def by_slug(self, slug: str) -> list[Finding]:
        return [f for f in self.findings if f.slug == slug]

    @property
    def slugs(self) -> set[str]:
        return {f.slug for f in self.findings}

    # --- writing ----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The diagnosis as strict-JSON data (non-finite numbers become None)."""
        return {
            "schema_version": self.schema_version,
            "tool": {"name": "lora-doctor", "version": self.tool_version},
            "source": self.source,
            "run": to_jsonable(self.run),
            "findings": [f.to_dict() for f in self.findings],
        }

    def to_json(self, path: str | os.PathLike[str] | None = None, indent: int = 2) -> str:
        """The diagnosis as a JSON string; also written atomically to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=indent, allow_nan=False)
        if path is not None:
            write_json_atomic(path, text)
        return text

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Diagnosis:
        """Reads a diagnosis back; unknown keys are ignored and missing ones take defaults."""
        tool = data.get("tool") or {}
        return cls(
            run=dict(data.get("run") or {}),
            findings=[
                Finding.from_dict(f) for f in data.get("findings") or [] if isinstance(f, Mapping)
            ],
            source=str(data.get("source", "live")),
            schema_version=int(data.get("schema_version", SCHEMA_VERSION)),
            tool_version=str(tool.get("version", __version__))
            if isinstance(tool, Mapping)
            else __version__,
        )

    def plot(self, path: str | os.PathLike[str]) -> Path:
        """Draws loss, eval loss and grad norm with each finding marked at its step, to ``path``.

        Needs matplotlib (``pip install 'lora-doctor[plot]'``); see :func:`lora_doctor.plot.plot_diagnosis`.
        """
        from lora_doctor.plot import plot_diagnosis

        return plot_diagnosis(self, path)

    def summary(self) -> str:
        """A short human-readable report: one line per finding, worst first."""
        step = self.run.get("global_step")
        head = f"lora-doctor: {len(self.findings)} finding(s)"
        if step:
            head += f" after step {step}"
        if not self.findings:
            return head + ": nothing wrong found."
        lines = [head + ":"]
        for f in sorted(self.findings, key=lambda f: -f.severity.rank):
            where = f" (step {f.step})" if f.step is not None else ""
            lines.append(f"  {f.severity.value.upper():7} {f.code} {f.slug}{where}: {f.title}")
            if f.recommendation is not None:
                lines.append(f"          fix: {f.recommendation.summary}")
        return "\n".join(lines)


def write_json_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Writes ``text`` to ``path`` through a temporary file in the same folder, then a rename, so
    that a reader never sees a half-written file."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.write("\n")
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target
