"""A rank sweep's result: the rows, the choice and its reason, and their files (JSON, CSV, plot)."""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_doctor._version import __version__
from lora_doctor.findings import to_jsonable
from lora_doctor.report import write_json_atomic
from lora_doctor.sweep.choose import choose_rank, fmt
from lora_doctor.sweep.row import SweepRow

__all__ = ["SWEEP_SCHEMA_VERSION", "SweepResult", "summary_logs"]

SWEEP_SCHEMA_VERSION = 1

_CSV_COLUMNS = (
    "r",
    "lora_alpha",
    "metric",
    "train_seconds",
    "peak_memory_bytes",
    "lora_params",
    "status",
    "reason",
    "findings",
    "chosen",
)


@dataclass
class SweepResult:
    """What a rank sweep measured and the rank it chose.

    Attributes:
        rows: one per rank, in rank order.
        metric: the metric's name.
        greater_is_better: the metric's direction.
        chosen_rank: the rank to use, None when every rank failed.
        reason: why, with the numbers.
        rule: the rule's settings (quality_share, time_share, min_gain, alpha_ratio).

    Example:
        >>> rows = [SweepRow(4, 8, 2.1, 10.0), SweepRow(8, 16, 2.0, 12.0)]
        >>> result = SweepResult.from_rows(rows, "eval_loss", greater_is_better=False)
        >>> result.chosen_rank
        4
    """

    rows: list[SweepRow]
    metric: str
    greater_is_better: bool
    chosen_rank: int | None
    reason: str
    rule: dict[str, float] = field(default_factory=dict)
    schema_version: int = SWEEP_SCHEMA_VERSION

    @classmethod
    def from_rows(
        cls,
        rows: Iterable[SweepRow],
        metric: str,
        *,
        greater_is_better: bool,
        quality_share: float = 0.95,
        time_share: float = 0.70,
        min_gain: float = 0.01,
        alpha_ratio: float | None = None,
    ) -> SweepResult:
        """Applies :func:`~lora_doctor.sweep.choose.choose_rank` to ``rows``."""
        rows = sorted(rows, key=lambda row: row.r)
        rank, reason = choose_rank(
            rows,
            greater_is_better=greater_is_better,
            quality_share=quality_share,
            time_share=time_share,
            min_gain=min_gain,
            metric=metric,
        )
        rule: dict[str, float] = {
            "quality_share": quality_share,
            "time_share": time_share,
            "min_gain": min_gain,
        }
        if alpha_ratio is not None:
            rule["alpha_ratio"] = alpha_ratio
        return cls(rows, metric, greater_is_better, rank, reason, rule)

    @property
    def chosen(self) -> SweepRow | None:
        """The chosen rank's row."""
        return next((row for row in self.rows if row.r == self.chosen_rank), None)

    # --- text ---------------------------------------------------------------------------------
    def table(self) -> str:
        """The rows as a Markdown table (readable as plain text), the chosen rank starred."""
        head = ["r", "lora_alpha", self.metric, "train s", "peak mem GiB", "LoRA params", "status"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for row in self.rows:
            mem = (
                f"{row.peak_memory_bytes / 2**30:.2f}" if row.peak_memory_bytes is not None else "-"
            )
            status = row.status if row.status == "ok" else f"failed: {row.reason}"
            if row.status == "ok" and row.findings:
                status += " (" + ", ".join(sorted(set(row.slugs))) + ")"
            cells = [
                f"{row.r}{' *' if row.r == self.chosen_rank else ''}",
                fmt(row.lora_alpha),
                fmt(row.metric),
                f"{row.train_seconds:.1f}" if row.train_seconds is not None else "-",
                mem,
                f"{row.lora_params:,}" if row.lora_params is not None else "-",
                status,
            ]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def summary(self) -> str:
        """The table, the chosen rank and the reason."""
        choice = (
            f"chosen: r={self.chosen_rank}, lora_alpha={fmt(self.chosen.lora_alpha)}"
            if self.chosen is not None
            else "chosen: none"
        )
        return f"lora-doctor rank sweep ({self.metric})\n{self.table()}\n{choice}\n{self.reason}"

    # --- files --------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The result as strict-JSON data (non-finite numbers become None)."""
        chosen = self.chosen
        return {
            "schema_version": self.schema_version,
            "tool": {"name": "lora-doctor", "version": __version__},
            "kind": "rank-sweep",
            "metric": self.metric,
            "greater_is_better": self.greater_is_better,
            "rule": to_jsonable(self.rule),
            "chosen_rank": self.chosen_rank,
            "chosen_lora_alpha": chosen.lora_alpha if chosen is not None else None,
            "reason": self.reason,
            "rows": [row.to_dict() for row in self.rows],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SweepResult:
        """Reads a result back; unknown keys are ignored and missing ones take defaults."""
        chosen = data.get("chosen_rank")
        return cls(
            rows=[SweepRow.from_dict(row) for row in data.get("rows") or []],
            metric=str(data.get("metric", "")),
            greater_is_better=bool(data.get("greater_is_better", False)),
            chosen_rank=int(chosen) if chosen is not None else None,
            reason=str(data.get("reason", "")),
            rule=dict(data.get("rule") or {}),
            schema_version=int(data.get("schema_version", SWEEP_SCHEMA_VERSION)),
        )

    def to_json(self, path: str | os.PathLike[str] | None = None, indent: int = 2) -> str:
        """The result as a JSON string; also written atomically to ``path`` when given.

        Example:
            >>> SweepResult([], "eval_loss", False, None, "").to_json()[:20]
            '{\\n  "schema_version"'
        """
        text = json.dumps(self.to_dict(), indent=indent, allow_nan=False)
        if path is not None:
            write_json_atomic(path, text)
        return text

    def to_csv(self, path: str | os.PathLike[str] | None = None) -> str:
        """The rows as CSV (findings as slugs joined by ``;``); also written atomically to ``path``.

        Example:
            >>> SweepResult([SweepRow(8, 16, 2.0)], "eval_loss", False, 8, "").to_csv().splitlines()[1]
            '8,16,2.0,,,,ok,,,True'
        """
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(_CSV_COLUMNS)
        for row in self.rows:
            data = row.to_dict()
            data["findings"] = ";".join(row.slugs)
            data["chosen"] = row.r == self.chosen_rank
            writer.writerow(["" if data[c] is None else data[c] for c in _CSV_COLUMNS])
        text = buffer.getvalue()
        if path is not None:
            write_json_atomic(path, text.rstrip("\n"))  # an atomic text write, whatever the format
        return text

    def plot(self, path: str | os.PathLike[str]) -> Path:
        """Draws rank against the metric and rank against training time, the choice marked, and
        saves the figure to ``path`` (PNG, SVG or PDF by its suffix). Failed ranks are crossed.

        Raises:
            ImportError: when matplotlib is not installed.

        Example:
            >>> result.plot("sweep.png")  # doctest: +SKIP
        """
        try:
            from matplotlib.figure import Figure
        except ImportError as exc:
            raise ImportError(
                "SweepResult.plot needs matplotlib: pip install 'lora-doctor[plot]'"
            ) from exc
        fig = Figure(figsize=(10, 4), layout="constrained")
        ax_metric, ax_time = fig.subplots(1, 2)
        ok = [row for row in self.rows if row.usable]
        failed = [row for row in self.rows if not row.usable]
        for ax, key, label in (
            (ax_metric, "metric", self.metric),
            (ax_time, "train_seconds", "training time (s)"),
        ):
            points = [(row.r, getattr(row, key)) for row in ok if getattr(row, key) is not None]
            if points:
                ax.plot(*zip(*points, strict=True), "o-", color="tab:blue", label="ranks")
            chosen = self.chosen
            if chosen is not None and getattr(chosen, key) is not None:
                ax.plot(
                    [chosen.r],
                    [getattr(chosen, key)],
                    marker="*",
                    markersize=18,
                    color="tab:orange",
                    linestyle="none",
                    label=f"chosen r={chosen.r}",
                )
            for row in failed:
                ax.axvline(row.r, color="tab:red", linestyle=":", alpha=0.7)
                ax.annotate(
                    f"r={row.r} failed",
                    (row.r, 0.02),
                    xycoords=("data", "axes fraction"),
                    rotation=90,
                    color="tab:red",
                    fontsize=8,
                )
            ax.set_xscale("log", base=2)
            ax.set_xticks([row.r for row in self.rows], [str(row.r) for row in self.rows])
            ax.set_xlabel("LoRA rank r")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        direction = "higher" if self.greater_is_better else "lower"
        ax_metric.set_title(f"{self.metric} ({direction} is better)")
        ax_time.set_title("training time")
        ax_time.set_ylim(bottom=0)
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(target, dpi=120)
        return target


def summary_logs(result: SweepResult) -> dict[str, Any]:
    """The choice and the table as one log entry for the trainers' integrations: the table and the
    reason as text, the chosen rank and each rank's metric, time and memory as numbers."""
    prefix = "lora_doctor/sweep"
    logs: dict[str, Any] = {f"{prefix}/table": result.table(), f"{prefix}/reason": result.reason}
    chosen = result.chosen
    if chosen is not None:
        logs[f"{prefix}/chosen_rank"] = chosen.r
        logs[f"{prefix}/chosen_lora_alpha"] = chosen.lora_alpha
    for row in result.rows:
        if row.usable:
            logs[f"{prefix}/r{row.r}/{result.metric}"] = row.metric
        if row.train_seconds is not None:
            logs[f"{prefix}/r{row.r}/train_seconds"] = row.train_seconds
        if row.peak_memory_bytes is not None:
            logs[f"{prefix}/r{row.r}/peak_memory_gib"] = row.peak_memory_bytes / 2**30
    return logs
