"""Rank sweep: choose the LoRA rank r from measurements, and keep the provenance.

Train a few ranks from scratch on a slice of the data, measure each (the metric, training time, peak
memory, the doctor's findings), and lock the smallest rank that gives most of the quality for much
less time.

This module is pure (standard library only): the choice rule, the result and its files, and the
``lora-doctor sweep`` command. The part that drives Trainers and reads CUDA lives in
:mod:`lora_doctor.integrations.hf_sweep` and is imported when :func:`rank_sweep` runs.

The rule (:func:`choose_rank`), with the defaults:

1. **Quality**: a rank qualifies when its metric is within 5% of ``|best|`` of the best rank's
   (``quality_share=0.95``). For a score where higher is better this is "95% of the best" (accuracy
   89.4 or more when the best is 94.1); for a loss it is "at most 5% above the best loss" (eval
   loss 2.10 or less when the best is 2.00). Measuring the gap against ``|best|`` treats both
   directions, and negative rewards, alike (an absolute 0.05 when the best is exactly 0).
2. **Cost**: among those, keep the ranks that trained within 70% of the slowest rank's training time
   (``time_share=0.70``). When none did (typically because the ranks cost about the same time:
   rank is then not what costs time), the time rule is dropped, and the reason says so.
3. **Diminishing returns**: take the smallest kept rank unless a larger kept rank is better by at
   least 1% of ``|best|`` (``min_gain=0.01``); i.e. the smallest rank within ``min_gain`` of the
   best kept one. Accuracy 92 -> 94 -> 94.1 for r 8 -> 16 -> 32 gives r = 16: the step 8 -> 16
   buys 2.1% of the best, the step 16 -> 32 only 0.1%, and the reason names it.

Ties go to the smaller rank. A rank that failed (out of memory, diverged) is left out and listed.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import importlib.util
import io
import json
import logging
import math
import os
import re
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_doctor import __version__
from lora_doctor.findings import to_jsonable
from lora_doctor.report import write_json_atomic

__all__ = [
    "SWEEP_SCHEMA_VERSION",
    "SweepResult",
    "SweepRow",
    "add_sweep_parser",
    "choose_rank",
    "metric_direction",
    "rank_sweep",
]

logger = logging.getLogger("lora_doctor")

SWEEP_SCHEMA_VERSION = 1

#: Findings that mark a rank's run as diverged (it is then recorded as failed).
DIVERGENCE_SLUGS = frozenset({"non-finite-values", "loss-divergence"})

# Words of a metric's name (split on non-alphanumerics, prefix match) that tell its direction.
_LOWER_IS_BETTER = ("loss", "perplexity", "ppl", "error", "nll", "wer", "cer")
_HIGHER_IS_BETTER = (
    "accuracy",
    "acc",
    "f1",
    "bleu",
    "rouge",
    "reward",
    "exact",
    "precision",
    "recall",
    "auc",
)


# --- the rule (pure) --------------------------------------------------------------------------------
def metric_direction(metric: str, greater_is_better: bool | None = None) -> bool:
    """Whether a higher ``metric`` is better: ``greater_is_better`` when given, else from the name.

    Names with loss, perplexity, ppl, error, nll, wer or cer are lower-is-better; names with
    accuracy, acc, f1, bleu, rouge, reward, exact, precision, recall or auc are higher-is-better.

    Raises:
        ValueError: when the name tells neither direction or both, and ``greater_is_better`` is None.

    Example:
        >>> metric_direction("eval_loss"), metric_direction("eval_rougeL")
        (False, True)
    """
    if not isinstance(metric, str) or not metric:
        raise ValueError(f"rank_sweep(metric=...) must be a non-empty string, got {metric!r}")
    if greater_is_better is not None:
        if not isinstance(greater_is_better, bool):
            raise ValueError(
                "rank_sweep(greater_is_better=...) must be True, False or None (from the metric's "
                f"name), got {greater_is_better!r}"
            )
        return greater_is_better
    words = [w for w in re.split(r"[^a-z0-9]+", metric.lower()) if w]
    lower = sorted({p for w in words for p in _LOWER_IS_BETTER if w.startswith(p)})
    higher = sorted({p for w in words for p in _HIGHER_IS_BETTER if w.startswith(p)})
    if lower and higher:
        raise ValueError(
            f"the metric name {metric!r} reads both ways (lower is better for {lower}, higher for "
            f"{higher}): pass greater_is_better=True or False"
        )
    if not lower and not higher:
        raise ValueError(
            f"cannot tell from the name {metric!r} whether a higher value is better (lower: "
            f"{', '.join(_LOWER_IS_BETTER)}; higher: {', '.join(_HIGHER_IS_BETTER)}): pass "
            "greater_is_better=True or False"
        )
    return bool(higher)


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
            lora_alpha=_alpha_number(float(data.get("lora_alpha", 2 * int(data["r"])))),
            metric=number("metric"),
            train_seconds=number("train_seconds"),
            peak_memory_bytes=count("peak_memory_bytes"),
            lora_params=count("lora_params"),
            findings=[dict(f) for f in data.get("findings") or [] if isinstance(f, Mapping)],
            status=str(data.get("status", "ok")),
            reason=data.get("reason"),
        )


def choose_rank(
    rows: Sequence[SweepRow],
    *,
    greater_is_better: bool,
    quality_share: float = 0.95,
    time_share: float = 0.70,
    min_gain: float = 0.01,
    metric: str = "metric",
) -> tuple[int | None, str]:
    """The rank to use and why, by the rule in this module's docstring.

    Args:
        rows: one per rank; failed rows and rows without a finite metric are left out.
        greater_is_better: the metric's direction (see :func:`metric_direction`).
        quality_share: a rank qualifies when its metric is within ``1 - quality_share`` of
            ``|best|`` of the best metric.
        time_share: a rank is cheap enough when it trained within this share of the slowest
            rank's training time.
        min_gain: a larger rank is worth it only when it improves on a smaller one by at least this
            share of ``|best|``.
        metric: the metric's name, for the reason.

    Returns:
        ``(rank, reason)``; rank is None when no rank finished with a finite metric.

    Example:
        >>> rows = [SweepRow(r, 2 * r, m, t) for r, m, t in [(8, 92, 10), (16, 94, 18), (32, 94.1, 35)]]
        >>> choose_rank(rows, greater_is_better=True)[0]
        16
    """
    _check_shares(quality_share, time_share, min_gain)
    rows = sorted(rows, key=lambda row: row.r)
    failed = [row for row in rows if not row.usable]
    usable = [row for row in rows if row.usable]
    failed_note = _failed_note(failed)
    if not usable:
        return None, f"No rank finished with a finite {metric}. {failed_note}".strip()

    sign = 1.0 if greater_is_better else -1.0

    def score(row: SweepRow) -> float:  # higher is better
        return sign * float(row.metric)  # type: ignore[arg-type]

    best = max(usable, key=lambda row: (score(row), -row.r))
    scale = abs(float(best.metric)) or 1.0  # type: ignore[arg-type]

    def gap(row: SweepRow, to: SweepRow = best) -> float:  # how much worse than ``to``
        return score(to) - score(row)

    def within(value: float, limit: float) -> bool:
        return value <= limit or math.isclose(value, limit, rel_tol=1e-9, abs_tol=1e-12)

    qualifies = [row for row in usable if within(gap(row), (1 - quality_share) * scale)]
    times = [row.train_seconds for row in usable if row.train_seconds is not None]
    slowest = max(times) if times else None
    time_limit = time_share * slowest if slowest is not None else None
    cheap = [
        row
        for row in qualifies
        if time_limit is not None
        and row.train_seconds is not None
        and within(row.train_seconds, time_limit)
    ]
    kept = cheap or qualifies
    top = max(kept, key=lambda row: (score(row), -row.r))
    chosen = next(row for row in kept if within(gap(row, top), min_gain * scale))

    fmt = _fmt
    parts = [
        f"r={chosen.r} (lora_alpha={fmt(chosen.lora_alpha)}): {metric} {fmt(chosen.metric)}"
        + (
            " is the best"
            if chosen is best or gap(chosen) == 0
            else f", {_pct(gap(chosen) / scale)} worse than the best "
            f"({fmt(best.metric)} at r={best.r}; {_pct(1 - quality_share)} allowed)"
        )
    ]
    if chosen.train_seconds is not None and slowest:
        parts[0] += (
            f"; trained in {_secs(chosen.train_seconds)}, "
            f"{_pct(chosen.train_seconds / slowest)} of the slowest rank's {_secs(slowest)}"
        )
    parts[0] += "."
    if not cheap:
        if time_limit is None:
            parts.append("No training times were recorded: the choice rests on the metric alone.")
        elif min(times) > time_limit:
            parts.append(
                f"Every rank took more than {_pct(time_share)} of the slowest rank's time "
                f"({_secs(min(times))} to {_secs(slowest)}): rank barely changes the cost here, so "
                "the time rule was dropped and the choice rests on the metric."
            )
        else:
            parts.append(
                f"No rank within {_pct(1 - quality_share)} of the best trained within "
                f"{_pct(time_share)} of the slowest rank's time ({_secs(time_limit)}): the time "
                "rule was dropped and the choice rests on the metric."
            )
    smaller = [row for row in usable if row.r < chosen.r]
    if smaller:
        below = smaller[-1]
        if below not in qualifies:
            why = (
                f"is {_pct(gap(below) / scale)} worse than the best, more than the "
                f"{_pct(1 - quality_share)} allowed"
            )
        elif below not in kept:
            why = f"took {_secs(below.train_seconds)}, over the limit of {_secs(time_limit)}"
        else:
            why = (
                f"is {_pct(gap(below, top) / scale)} worse than r={top.r}, more than the "
                f"{_pct(min_gain)} of the best that a smaller rank may give up"
            )
        parts.append(f"r={below.r} ({metric} {fmt(below.metric)}) {why}.")
    larger = [row for row in usable if row.r > chosen.r]
    if larger:
        above = larger[0]
        gain = -gap(above, chosen)
        if gain <= 0:
            parts.append(f"r={above.r} is no better ({metric} {fmt(above.metric)}).")
        else:
            cost = ""
            if above.train_seconds and chosen.train_seconds:
                cost = f" for {above.train_seconds / chosen.train_seconds:.2f}x the time"
            if within(gain, min_gain * scale):
                parts.append(
                    f"r={above.r} improves it by only {fmt(gain)} "
                    f"({_pct(gain / scale)} of the best){cost}: diminishing returns."
                )
            else:
                parts.append(
                    f"r={above.r} is better by {_pct(gain / scale)}{cost}, over the "
                    f"{_pct(time_share)} time limit ({_secs(time_limit)})."
                )
    if failed_note:
        parts.append(failed_note)
    return chosen.r, " ".join(parts)


def _failed_note(failed: Sequence[SweepRow]) -> str:
    if not failed:
        return ""
    items = "; ".join(
        f"r={row.r} {row.reason or ('has no finite metric' if row.status == 'ok' else 'failed')}"
        for row in failed
    )
    return f"Left out: {items}."


def _check_shares(quality_share: float, time_share: float, min_gain: float) -> None:
    for name, value, low_open, rule in (
        ("quality_share", quality_share, True, "a number in (0, 1]"),
        ("time_share", time_share, True, "a number in (0, 1]"),
        ("min_gain", min_gain, False, "a number in [0, 1)"),
    ):
        ok = (
            isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        )
        if ok:
            ok = (0 < value <= 1) if low_open else (0 <= value < 1)
        if not ok:
            raise ValueError(f"rank_sweep({name}=...) must be {rule}, got {value!r}")


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def _pct(share: float) -> str:
    value = 100 * share
    return f"{value:.2g}%" if abs(value) < 10 else f"{value:.0f}%"


def _secs(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    return f"{seconds:.3g} s" if seconds < 100 else f"{seconds:.0f} s"


def _alpha_number(value: float) -> float:
    """An alpha as an int when it is whole (16 rather than 16.0), else the float."""
    return int(value) if float(value).is_integer() else float(value)


# --- the result -------------------------------------------------------------------------------------
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
        """Applies :func:`choose_rank` to ``rows``."""
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
                _fmt(row.lora_alpha),
                _fmt(row.metric),
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
            f"chosen: r={self.chosen_rank}, lora_alpha={_fmt(self.chosen.lora_alpha)}"
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


# --- running a sweep ------------------------------------------------------------------------------
def rank_sweep(
    build: Callable[[int, float], Any],
    ranks: Iterable[int] = (4, 8, 16),
    metric: str = "eval_loss",
    *,
    alpha_ratio: float = 2.0,
    greater_is_better: bool | None = None,
    quality_share: float = 0.95,
    time_share: float = 0.70,
    min_gain: float = 0.01,
    report_to: str | Sequence[str] | None = None,
    progress: bool = True,
) -> SweepResult:
    """Trains each rank from scratch and chooses r from the measurements.

    For each rank, ``build(r, lora_alpha)`` must return a fresh ``transformers.Trainer`` (a fresh
    base model with that LoRA config, on the slice of data to compare on, e.g. 10% for 1 to 2
    epochs): a rank never starts from another rank's weights. The sweep adds a
    :class:`~lora_doctor.LoraDoctorCallback` (writing no file) unless the trainer has one, runs
    ``trainer.train()``, then ``trainer.evaluate()`` when the metric is not among the training
    metrics, and records the metric, the training time, the peak CUDA memory and the LoRA
    parameters. A rank that runs out of memory or diverges (a non-finite metric or loss, or a
    ``non-finite-values`` / ``loss-divergence`` finding) is recorded as failed, and the sweep goes
    on. The choice follows the rule in :mod:`lora_doctor.sweep`'s docstring.

    The table and the choice are logged once at the end, through the integrations
    (``report_to``: TensorBoard, W&B ...) of the last trainer that trained, under
    ``lora_doctor/sweep/...``: the run keeps the rank's provenance.

    Args:
        build: ``build(r, lora_alpha) -> transformers.Trainer``.
        ranks: the ranks to try (positive, distinct); run from the smallest.
        metric: the metric to compare, as the Trainer reports it (``eval_loss``,
            ``eval_accuracy``, ``train_loss`` ...; ``accuracy`` also finds ``eval_accuracy``).
        alpha_ratio: ``lora_alpha = alpha_ratio * r`` (2 by default: alpha = 2r).
        greater_is_better: the metric's direction; from its name when None.
        quality_share: a rank qualifies within ``1 - quality_share`` of the best (0.95: 5%).
        time_share: ranks that trained within this share of the slowest rank's time are preferred.
        min_gain: a larger rank must beat a smaller one by this share of the best to be chosen.
        report_to: the integrations to log the result through: None for the trainers' own
            ``report_to``, ``"none"`` for none, or a list such as ``["tensorboard"]``.
        progress: show a progress bar over the ranks.

    Returns:
        The rows, the chosen rank and the reason.

    Raises:
        ValueError: for a bad argument, a build that returns no Trainer, or a metric the runs do not
            report; each names the argument and the value. Any other error of ``build`` or of
            training (not out of memory) stops the sweep as it would stop a run.

    The sweep runs in one process; under ``torchrun`` every process runs it, and only the main
    one (``RANK`` 0) shows the progress bar and logs the result.

    Example:
        >>> def build(r, lora_alpha):
        ...     model = get_peft_model(AutoModelForCausalLM.from_pretrained(name),
        ...                            LoraConfig(r=r, lora_alpha=lora_alpha, target_modules="all-linear"))
        ...     return Trainer(model=model, args=args, train_dataset=train_slice, eval_dataset=val)
        >>> result = rank_sweep(build, ranks=(4, 8, 16, 32))  # doctest: +SKIP
        >>> result.chosen_rank, result.reason  # doctest: +SKIP
    """
    if not callable(build):
        raise ValueError(
            f"rank_sweep(build=...) must be a function build(r, lora_alpha) -> Trainer, got {build!r}"
        )
    rank_list = _check_ranks(ranks)
    direction = metric_direction(metric, greater_is_better)
    _check_shares(quality_share, time_share, min_gain)
    if (
        not isinstance(alpha_ratio, (int, float))
        or isinstance(alpha_ratio, bool)
        or not math.isfinite(alpha_ratio)
        or alpha_ratio <= 0
    ):
        raise ValueError(f"rank_sweep(alpha_ratio=...) must be a number > 0, got {alpha_ratio!r}")
    from lora_doctor.integrations import hf_sweep

    hf_sweep.check_report_to(report_to)
    alphas = [_alpha_number(alpha_ratio * r) for r in rank_list]
    rows, reporter = hf_sweep.run_sweep(build, rank_list, alphas, metric, report_to, progress)
    result = SweepResult.from_rows(
        rows,
        metric,
        greater_is_better=direction,
        quality_share=quality_share,
        time_share=time_share,
        min_gain=min_gain,
        alpha_ratio=alpha_ratio,
    )
    if is_main_process():
        logger.info("%s", result.summary())
    if reporter is not None:
        hf_sweep.log_summary(reporter, summary_logs(result))
    return result


def is_main_process() -> bool:
    """False on the non-main processes of a distributed launch (``torchrun`` sets ``RANK``)."""
    return os.environ.get("RANK", "0") == "0"


def _check_ranks(ranks: Iterable[int]) -> list[int]:
    try:
        items = list(ranks)
    except TypeError:
        items = [ranks]  # type: ignore[list-item]
    bad = [r for r in items if not isinstance(r, int) or isinstance(r, bool) or r < 1]
    if not items or bad:
        raise ValueError(
            f"rank_sweep(ranks=...) must be one or more integers >= 1, got {list(items)!r}"
        )
    if len(set(items)) != len(items):
        raise ValueError(f"rank_sweep(ranks=...) must be distinct, got {items!r}")
    return sorted(items)


# --- the command line -----------------------------------------------------------------------------
def add_sweep_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Adds ``lora-doctor sweep`` to the command's subparsers (``argparse`` ``add_subparsers()``)."""
    parser = subparsers.add_parser(
        "sweep",
        help="train a few LoRA ranks from scratch and choose r from the measurements",
        description=(
            "Trains each rank from scratch with the trainer that MODULE:FUNCTION builds "
            "(FUNCTION(r, lora_alpha) returns a fresh transformers.Trainer), and chooses the "
            "smallest rank that reaches 95%% of the best metric within 70%% of the slowest rank's "
            "training time. Exit 0: a rank was chosen; 1: every rank failed; 2: bad input."
        ),
    )
    parser.add_argument(
        "build",
        metavar="MODULE:FUNCTION",
        help="the build function, in an importable module (pkg.train:build) or a file "
        "(path/to/train.py:build)",
    )
    parser.add_argument("--ranks", type=int, nargs="+", default=[4, 8, 16], metavar="R")
    parser.add_argument("--metric", default="eval_loss", help="metric to compare (eval_loss)")
    parser.add_argument("--alpha-ratio", type=float, default=2.0, help="lora_alpha = ratio * r (2)")
    direction = parser.add_mutually_exclusive_group()
    direction.add_argument(
        "--greater-is-better",
        dest="greater_is_better",
        action="store_const",
        const=True,
        help="a higher metric is better (default: from the metric's name)",
    )
    direction.add_argument(
        "--lower-is-better", dest="greater_is_better", action="store_const", const=False
    )
    parser.add_argument("--quality-share", type=float, default=0.95)
    parser.add_argument("--time-share", type=float, default=0.70)
    parser.add_argument("--min-gain", type=float, default=0.01)
    parser.add_argument(
        "--out", metavar="DIR", help="write sweep.json, sweep.csv and sweep.png into DIR"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(handler=run_sweep_command)
    return parser


def run_sweep_command(args: argparse.Namespace) -> int:
    """Runs ``lora-doctor sweep``; returns the exit code."""
    try:
        build = load_build(args.build)
        result = rank_sweep(
            build,
            args.ranks,
            args.metric,
            alpha_ratio=args.alpha_ratio,
            greater_is_better=args.greater_is_better,
            quality_share=args.quality_share,
            time_share=args.time_share,
            min_gain=args.min_gain,
            progress=not args.no_progress,
        )
    except ValueError as exc:
        print(f"lora-doctor sweep: {exc}", file=sys.stderr)
        return 2
    print(result.summary())
    if args.out:
        out = Path(args.out)
        result.to_json(out / "sweep.json")
        result.to_csv(out / "sweep.csv")
        written = [out / "sweep.json", out / "sweep.csv"]
        try:
            written.append(result.plot(out / "sweep.png"))
        except ImportError as exc:
            print(f"lora-doctor sweep: no plot: {exc}", file=sys.stderr)
        print("written: " + ", ".join(str(p) for p in written))
    return 0 if result.chosen_rank is not None else 1


def load_build(spec: str) -> Callable[..., Any]:
    """The function named by ``MODULE:FUNCTION``, MODULE being importable or a ``.py`` file.

    Raises:
        ValueError: with one line saying what could not be found or loaded.

    Example:
        >>> load_build("os.path:join")("a", "b")
        'a/b'
    """
    module_name, sep, func_name = spec.rpartition(":")
    if not sep or not module_name or not func_name:
        raise ValueError(
            f"expected MODULE:FUNCTION (e.g. my_train:build or path/to/train.py:build), got {spec!r}"
        )
    try:
        if module_name.endswith(".py") or "/" in module_name or os.sep in module_name:
            module = _load_file(Path(module_name))
        else:
            if os.getcwd() not in sys.path and "" not in sys.path:
                sys.path.insert(0, os.getcwd())  # as `python -m` does
            module = importlib.import_module(module_name)
    except ValueError:
        raise
    except Exception as exc:
        raise ValueError(f"cannot load {module_name!r}: {type(exc).__name__}: {exc}") from None
    func = getattr(module, func_name, None)
    if not callable(func):
        raise ValueError(f"{module_name!r} has no function {func_name!r}")
    return func  # type: ignore[no-any-return]


def _load_file(path: Path) -> Any:
    if not path.is_file():
        raise ValueError(f"no such file: {path}")
    name = f"_lora_doctor_build_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ValueError(f"cannot load {path} as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.resolve().parent))  # its sibling modules import, as `python file`
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
