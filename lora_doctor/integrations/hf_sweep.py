"""The Trainer side of the rank sweep: trains each rank, reads CUDA memory, logs the result to the
trainers' integrations. :func:`lora_doctor.rank_sweep` is the entry point; the rule and the result
are in :mod:`lora_doctor.sweep`, which imports this module only when a sweep runs.
"""

from __future__ import annotations

import gc
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import Trainer
from transformers.integrations import (
    get_available_reporting_integrations,
    get_reporting_integration_callbacks,
)

from lora_doctor.integrations.hf import LoraDoctorCallback
from lora_doctor.sweep.row import SweepRow

__all__ = ["check_report_to", "log_summary", "run_sweep"]

logger = logging.getLogger("lora_doctor")

_OOM_ERRORS: tuple[type[BaseException], ...] = tuple(
    {getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError), torch.cuda.OutOfMemoryError}
)


@dataclass
class Reporter:
    """What it takes to log through a finished trainer's integrations, without its model."""

    args: Any
    state: Any
    control: Any
    callbacks: list[Any]


def _integrations(report_to: str | Sequence[str] | None) -> list[str]:
    """``report_to`` as a list of integration names, as ``TrainingArguments`` reads it: ``"none"``
    is none, ``"all"`` every installed one (transformers 4.x iterates over a plain string's
    letters)."""
    if isinstance(report_to, str):
        if report_to == "none":
            return []
        return list(get_available_reporting_integrations()) if report_to == "all" else [report_to]
    return [name for name in report_to or [] if name != "none"]


def check_report_to(report_to: str | Sequence[str] | None) -> None:
    """Raises a ValueError naming the supported integrations when ``report_to`` names another."""
    if report_to is None:
        return
    try:
        get_reporting_integration_callbacks(_integrations(report_to))
    except ValueError as exc:
        raise ValueError(f"rank_sweep(report_to={report_to!r}): {exc}") from None


def run_sweep(
    build: Callable[[int, float], Any],
    ranks: Sequence[int],
    alphas: Sequence[float],
    metric: str,
    report_to: str | Sequence[str] | None,
    progress: bool,
) -> tuple[list[SweepRow], Reporter | None]:
    """Trains each rank from scratch, in order, freeing memory in between; returns the rows and the
    integrations of the last trainer that trained (to log the summary through). ``progress``: show
    a progress bar (the caller passes False on the non-main processes)."""
    from tqdm.auto import tqdm

    rows: list[SweepRow] = []
    reporter: Reporter | None = None
    bar = tqdm(
        list(zip(ranks, alphas, strict=True)),
        desc="lora-doctor rank sweep",
        unit="rank",
        disable=not progress,
    )
    for r, alpha in bar:
        bar.set_postfix_str(f"r={r}")
        row, rank_reporter = _run_rank(build, r, alpha, metric, report_to)
        rows.append(row)
        reporter = rank_reporter or reporter
        _free_memory()
    bar.close()
    return rows, reporter


def _run_rank(
    build: Callable[[int, float], Any],
    r: int,
    lora_alpha: float,
    metric: str,
    report_to: str | Sequence[str] | None,
) -> tuple[SweepRow, Reporter | None]:
    """One rank: build a fresh trainer, train it, evaluate when the metric needs it, measure."""
    row = SweepRow(r=r, lora_alpha=lora_alpha)
    cuda = _cuda_ready()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer: Any = None
    doctor: LoraDoctorCallback | None = None
    try:
        trainer = build(r, lora_alpha)
        if not isinstance(trainer, Trainer):
            raise ValueError(
                f"rank_sweep: build(r={r}, lora_alpha={lora_alpha}) must return a "
                f"transformers.Trainer, got {type(trainer).__name__}"
            )
        doctor = _attach_doctor(trainer)
        start = time.perf_counter()
        output = trainer.train()
        if cuda:
            torch.cuda.synchronize()
        row.train_seconds = time.perf_counter() - start
        train_loss = getattr(output, "training_loss", None)
        if isinstance(train_loss, float) and not math.isfinite(train_loss):
            row.fail(f"diverged: training loss is {train_loss}")
        row.metric = _read_metric(trainer, dict(output.metrics or {}), metric)
    except Exception as exc:
        if not _is_oom(exc):
            raise
        row.fail(f"out of memory: {_first_line(exc)}")
    if cuda:
        row.peak_memory_bytes = _peak_memory()
    if doctor is not None and doctor.doctor is not None:
        facts = doctor.doctor.facts
        row.lora_params = facts.lora_params if facts.has_lora else None
        row.findings = [
            {k: f.to_dict()[k] for k in ("code", "slug", "severity", "step", "title")}
            for f in doctor.doctor.findings
        ]
    row.check_divergence(metric)
    return row, (_reporter(trainer, report_to) if trainer is not None else None)


def _attach_doctor(trainer: Any) -> LoraDoctorCallback:
    """The trainer's LoraDoctorCallback; one that writes no file is added when it has none."""
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, LoraDoctorCallback):
            return callback
    callback = LoraDoctorCallback(report_path=False)
    trainer.add_callback(callback)
    return callback


def _read_metric(trainer: Any, metrics: dict[str, Any], metric: str) -> float:
    """The metric from the training metrics, else from ``trainer.evaluate()``."""
    value = _lookup(metrics, metric)
    if value is None:
        metrics.update(trainer.evaluate())
        value = _lookup(metrics, metric)
    if value is None:
        raise ValueError(
            f"rank_sweep(metric={metric!r}): the run reported no such metric; it reported "
            f"{sorted(metrics)}"
        )
    return value


def _lookup(metrics: dict[str, Any], metric: str) -> float | None:
    for key in (metric, f"eval_{metric}"):
        value = metrics.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, _OOM_ERRORS):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else type(exc).__name__
    return line if len(line) <= 200 else line[:197] + "..."


def _cuda_ready() -> bool:
    """True when CUDA can be used (a CPU build of torch answers False, or raises in its stubs)."""
    try:
        return bool(torch.cuda.is_available())
    except Exception:
        return False


def _peak_memory() -> int | None:
    try:
        return int(torch.cuda.max_memory_allocated())
    except Exception:
        return None


def _free_memory() -> None:
    gc.collect()
    if _cuda_ready():
        torch.cuda.empty_cache()


def _reporter(trainer: Any, report_to: str | Sequence[str] | None) -> Reporter | None:
    names = trainer.args.report_to if report_to is None else report_to
    classes = tuple(get_reporting_integration_callbacks(_integrations(names)))
    callbacks = [
        c for c in trainer.callback_handler.callbacks if classes and isinstance(c, classes)
    ]
    if not callbacks:
        return None
    return Reporter(trainer.args, trainer.state, trainer.control, callbacks)


def log_summary(reporter: Reporter, logs: dict[str, Any]) -> None:
    """Logs the sweep's table and choice through each integration callback (TensorBoard, W&B ...)
    of the last trainer; a failure there is logged and never fails the sweep."""
    for callback in reporter.callbacks:
        try:
            callback.on_log(reporter.args, reporter.state, reporter.control, logs=dict(logs))
            writer = getattr(callback, "tb_writer", None)
            if writer is not None:  # TensorBoard reopened the writer its on_train_end had closed
                writer.close()
                callback.tb_writer = None
        except Exception:
            logger.warning(
                "lora-doctor: could not log the rank sweep through %s; the result is unaffected.",
                type(callback).__name__,
                exc_info=True,
            )
