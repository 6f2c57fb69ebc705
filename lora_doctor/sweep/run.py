"""Running a rank sweep: :func:`rank_sweep` checks its arguments here (pure), then hands the
training to :mod:`lora_doctor.integrations.hf_sweep`, which needs torch and transformers."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from lora_doctor.sweep.choose import check_shares, metric_direction
from lora_doctor.sweep.results import SweepResult, summary_logs
from lora_doctor.sweep.row import alpha_number

__all__ = ["is_main_process", "rank_sweep"]

logger = logging.getLogger("lora_doctor")


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
    on. The choice follows the rule in :mod:`lora_doctor.sweep.choose`'s docstring.

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
    check_shares(quality_share, time_share, min_gain)
    if (
        not isinstance(alpha_ratio, (int, float))
        or isinstance(alpha_ratio, bool)
        or not math.isfinite(alpha_ratio)
        or alpha_ratio <= 0
    ):
        raise ValueError(f"rank_sweep(alpha_ratio=...) must be a number > 0, got {alpha_ratio!r}")
    from lora_doctor.integrations import hf_sweep

    hf_sweep.check_report_to(report_to)
    alphas = [alpha_number(alpha_ratio * r) for r in rank_list]
    main = is_main_process()
    rows, reporter = hf_sweep.run_sweep(
        build, rank_list, alphas, metric, report_to, progress and main
    )
    result = SweepResult.from_rows(
        rows,
        metric,
        greater_is_better=direction,
        quality_share=quality_share,
        time_share=time_share,
        min_gain=min_gain,
        alpha_ratio=alpha_ratio,
    )
    if main:
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
