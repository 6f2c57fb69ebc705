"""Draws a diagnosis: training loss, eval loss and grad norm, with each finding marked at its step.

matplotlib is an optional dependency (``pip install 'lora-doctor[plot]'``); it is imported only
when a plot is drawn. This module sits below :mod:`lora_doctor.report`: it reads a diagnosis
through :class:`Plottable` (what a plot needs of it), so ``Diagnosis.plot`` can call it without an
import cycle.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from lora_doctor.findings import Finding, Severity
from lora_doctor.history import History

__all__ = ["MISSING_MATPLOTLIB", "Plottable", "check_plot_path", "plot_diagnosis"]

MISSING_MATPLOTLIB = "plotting needs matplotlib: pip install 'lora-doctor[plot]'"

_COLOURS = {Severity.ERROR: "#c62828", Severity.WARNING: "#ef6c00", Severity.INFO: "#1565c0"}


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError(MISSING_MATPLOTLIB) from None
    return plt


class Plottable(Protocol):
    """What a plot reads of a diagnosis (:class:`lora_doctor.Diagnosis` is one)."""

    @property
    def history(self) -> History | None:
        """The curves (None for a diagnosis read back from JSON)."""

    @property
    def findings(self) -> Sequence[Finding]:
        """The findings, each marked at its step."""

    @property
    def run(self) -> Mapping[str, Any]:
        """What is known about the run; ``max_steps`` sets the x range."""


def check_plot_path(path: str | os.PathLike[str]) -> None:
    """Checks, before any work, that matplotlib can write a plot to ``path``: its extension must
    name a format of matplotlib's (``FigureCanvasBase.get_supported_filetypes``), compared
    without case. A path without an extension is refused too: matplotlib would add ``.png`` to it,
    so the file would not be where the caller said.

    Raises:
        ImportError: when matplotlib is not installed (the message says how to install it).
        ValueError: when the extension is missing or not a format matplotlib writes; the message
            lists the formats.

    Example:
        >>> check_plot_path("run.png")
        >>> check_plot_path("run.docx")
        Traceback (most recent call last):
        ...
        ValueError: cannot plot to run.docx: matplotlib does not write '.docx' files (it writes ...
    """
    try:
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError:
        raise ImportError(MISSING_MATPLOTLIB) from None
    formats = sorted(FigureCanvasBase.get_supported_filetypes())
    suffix = Path(path).suffix
    if suffix.lower().lstrip(".") in formats:
        return
    what = f"matplotlib does not write {suffix!r} files" if suffix else "it has no file extension"
    raise ValueError(f"cannot plot to {os.fspath(path)}: {what} (it writes {', '.join(formats)})")


def plot_diagnosis(diagnosis: Plottable, path: str | os.PathLike[str]) -> Path:
    """Draws the curves the diagnosis was made from, each finding marked at its step, to ``path``.

    Top panel: training loss (and its rolling median when the log is noisy) and eval loss. Bottom
    panel: grad norm (log scale). A vertical line per finding, coloured by severity and labelled
    with its code; findings without a step (set-up findings) are listed in the title.

    Raises:
        ImportError: when matplotlib is not installed (the message says how to install it).
        ValueError: when the diagnosis carries no curves (one read back from JSON), or the path's
            extension is not a format matplotlib writes (see :func:`check_plot_path`).

    Example:
        >>> from lora_doctor import diagnose
        >>> diagnose("outputs/checkpoint-500").plot("run.png")  # doctest: +SKIP
    """
    history = diagnosis.history
    if history is None:
        raise ValueError(
            "this diagnosis carries no curves (read back from JSON?): plot one made by "
            "lora_doctor.diagnose() or the callback"
        )
    check_plot_path(path)
    plt = _pyplot()
    loss = history.series("loss").finite()
    evals = history.series("eval_loss").finite()
    grad = history.series("grad_norm").finite()
    has_grad = len(grad) > 0
    fig, axes = plt.subplots(
        2 if has_grad else 1,
        1,
        figsize=(11, 6.5 if has_grad else 4.5),
        sharex=True,
        gridspec_kw={"height_ratios": [2.2, 1]} if has_grad else None,
        squeeze=False,
    )
    ax = axes[0][0]
    if len(loss):
        noisy = len(loss) > 60
        ax.plot(
            loss.steps,
            loss.values,
            color="#90a4ae" if noisy else "#1e88e5",
            lw=0.7,
            label="train loss",
        )
        if noisy:
            width = max(5, len(loss) // 50)
            kernel = np.ones(width) / width
            smooth = np.convolve(loss.values, kernel, mode="valid")
            centre = width // 2  # a centred mean: no lag behind the raw curve
            ax.plot(
                loss.steps[centre : centre + len(smooth)],
                smooth,
                color="#1e88e5",
                lw=1.6,
                label="train loss (mean)",
            )
    if len(evals):
        ax.plot(evals.steps, evals.values, "o-", color="#43a047", ms=3.5, lw=1.4, label="eval loss")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    lower = [ax]
    if has_grad:
        gax = axes[1][0]
        gax.plot(grad.steps, grad.values, color="#8e24aa", lw=0.7, label="grad norm")
        if np.all(grad.values > 0):
            gax.set_yscale("log")
        gax.set_ylabel("grad norm")
        gax.grid(alpha=0.3)
        lower.append(gax)
    lower[-1].set_xlabel("step")
    max_steps = diagnosis.run.get("max_steps") or 0
    if max_steps:
        for a in lower:
            a.set_xlim(0, max(max_steps, history.last_step))
    _mark_findings(diagnosis, lower)
    ax.legend(loc="upper right", fontsize=8)
    setup = [f"{f.code} {f.slug}" for f in diagnosis.findings if f.step is None]
    title = f"lora-doctor: {len(diagnosis.findings)} finding(s)"
    if setup:
        title += " | at set-up: " + ", ".join(setup)
    ax.set_title(title, fontsize=10, loc="left")
    fig.tight_layout()
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(target, dpi=110)
    plt.close(fig)
    return target


def _mark_findings(diagnosis: Plottable, axes: list[Any]) -> None:
    """A dashed line per finding with a step, on every panel; its code and slug on the top one."""
    placed = [(f, f.step) for f in diagnosis.findings if f.step is not None]
    top = axes[0]
    for i, (finding, step) in enumerate(placed):
        colour = _COLOURS.get(finding.severity, "#555555")
        for a in axes:
            a.axvline(step, color=colour, ls="--", lw=1.1, alpha=0.85)
        since = finding.evidence.get("since_step")  # the plateau's window
        if isinstance(since, (int, float)) and since < step:
            top.axvspan(since, step, color=colour, alpha=0.08, lw=0)
        best = finding.evidence.get("best_step")  # the best evaluation before overfitting
        value = finding.evidence.get("best_eval_loss")
        if isinstance(best, (int, float)) and isinstance(value, (int, float)):
            top.plot([best], [value], marker="*", ms=13, color=colour, ls="none", zorder=5)
            top.annotate(
                "best eval",
                xy=(best, value),
                xytext=(0, -14),
                textcoords="offset points",
                fontsize=8,
                color=colour,
                ha="center",
            )
        # stagger the labels so that findings at close steps stay readable
        y = 0.97 - 0.09 * (i % 4)
        top.annotate(
            f"{finding.code} {finding.slug}",
            xy=(step, y),
            xycoords=("data", "axes fraction"),
            xytext=(3, 0),
            textcoords="offset points",
            fontsize=8,
            color=colour,
            va="top",
            bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": colour, "alpha": 0.85},
        )
