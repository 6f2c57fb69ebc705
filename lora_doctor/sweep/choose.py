"""The rank sweep's choice rule and its prose: pure (standard library only), no torch.

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

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from lora_doctor.sweep.row import SweepRow

__all__ = ["check_shares", "choose_rank", "fmt", "metric_direction"]

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


@dataclass(frozen=True)
class _Choice:
    """The rule applied: each step's survivors and the numbers the reason quotes.

    Attributes:
        usable: the rows with a finite metric, in rank order.
        sign: 1 when a higher metric is better, else -1 (``sign * metric``: higher is better).
        best: the best usable row (the smaller rank on a tie).
        scale: ``|best metric|`` (1 when it is 0): the unit of every share.
        qualifies: rows within ``1 - quality_share`` of the best.
        fastest, slowest: the shortest and longest training time recorded (seconds), or None.
        time_limit: ``time_share * slowest`` (seconds), None without times.
        cheap: qualifying rows that trained within the time limit.
        kept: ``cheap``, or ``qualifies`` when the time rule was dropped.
        top: the best kept row.
        chosen: the smallest kept row within ``min_gain`` of ``top``.
    """

    usable: list[SweepRow]
    sign: float
    best: SweepRow
    scale: float
    qualifies: list[SweepRow]
    fastest: float | None
    slowest: float | None
    time_limit: float | None
    cheap: list[SweepRow]
    kept: list[SweepRow]
    top: SweepRow
    chosen: SweepRow

    def gap(self, row: SweepRow, to: SweepRow | None = None) -> float:
        """How much worse ``row``'s metric is than ``to``'s (the best by default)."""
        best = to if to is not None else self.best
        return _score(best, self.sign) - _score(row, self.sign)


@dataclass(frozen=True)
class _Shares:
    """The rule's settings and the metric's name, as the reason quotes them."""

    quality: float
    time: float
    min_gain: float
    metric: str


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

    Raises:
        ValueError: when a share is outside its range (see :func:`check_shares`).

    Example:
        >>> from lora_doctor.sweep import SweepRow
        >>> rows = [SweepRow(r, 2 * r, m, t) for r, m, t in [(8, 92, 10), (16, 94, 18), (32, 94.1, 35)]]
        >>> choose_rank(rows, greater_is_better=True)[0]
        16
    """
    check_shares(quality_share, time_share, min_gain)
    rows = sorted(rows, key=lambda row: row.r)
    usable = [row for row in rows if row.usable]
    failed_note = _failed_note([row for row in rows if not row.usable])
    if not usable:
        return None, f"No rank finished with a finite {metric}. {failed_note}".strip()
    shares = _Shares(quality_share, time_share, min_gain, metric)
    choice = _apply(usable, 1.0 if greater_is_better else -1.0, shares)
    parts = [
        _head(choice, shares),
        _time_note(choice, shares),
        _smaller_note(choice, shares),
        _larger_note(choice, shares),
        failed_note,
    ]
    return choice.chosen.r, " ".join(part for part in parts if part)


def _score(row: SweepRow, sign: float) -> float:
    """The row's metric with higher better."""
    return sign * float(row.metric)  # type: ignore[arg-type]


def _within(value: float, limit: float) -> bool:
    """``value <= limit``, up to rounding."""
    return value <= limit or math.isclose(value, limit, rel_tol=1e-9, abs_tol=1e-12)


def _apply(usable: list[SweepRow], sign: float, shares: _Shares) -> _Choice:
    """The three steps of the rule on the usable rows (rank order)."""
    best = max(usable, key=lambda row: (_score(row, sign), -row.r))
    scale = abs(float(best.metric)) or 1.0  # type: ignore[arg-type]
    qualifies = [
        row
        for row in usable
        if _within(_score(best, sign) - _score(row, sign), (1 - shares.quality) * scale)
    ]
    times = [row.train_seconds for row in usable if row.train_seconds is not None]
    slowest = max(times) if times else None
    time_limit = shares.time * slowest if slowest is not None else None
    cheap = [
        row
        for row in qualifies
        if time_limit is not None
        and row.train_seconds is not None
        and _within(row.train_seconds, time_limit)
    ]
    kept = cheap or qualifies
    top = max(kept, key=lambda row: (_score(row, sign), -row.r))
    limit = shares.min_gain * scale
    chosen = next(row for row in kept if _within(_score(top, sign) - _score(row, sign), limit))
    return _Choice(
        usable=usable,
        sign=sign,
        best=best,
        scale=scale,
        qualifies=qualifies,
        fastest=min(times) if times else None,
        slowest=slowest,
        time_limit=time_limit,
        cheap=cheap,
        kept=kept,
        top=top,
        chosen=chosen,
    )


def _head(choice: _Choice, shares: _Shares) -> str:
    """The chosen rank, its metric against the best, and its training time."""
    chosen, best, scale = choice.chosen, choice.best, choice.scale
    text = (
        f"r={chosen.r} (lora_alpha={fmt(chosen.lora_alpha)}): {shares.metric} {fmt(chosen.metric)}"
    )
    if chosen is best or choice.gap(chosen) == 0:
        text += " is the best"
    else:
        text += (
            f", {_pct(choice.gap(chosen) / scale)} worse than the best "
            f"({fmt(best.metric)} at r={best.r}; {_pct(1 - shares.quality)} allowed)"
        )
    if chosen.train_seconds is not None and choice.slowest:
        text += (
            f"; trained in {_secs(chosen.train_seconds)}, "
            f"{_pct(chosen.train_seconds / choice.slowest)} of the slowest rank's "
            f"{_secs(choice.slowest)}"
        )
    return text + "."


def _time_note(choice: _Choice, shares: _Shares) -> str:
    """Why the time rule was dropped, when it was."""
    if choice.cheap:
        return ""
    if choice.time_limit is None or choice.fastest is None:
        return "No training times were recorded: the choice rests on the metric alone."
    if choice.fastest > choice.time_limit:
        return (
            f"Every rank took more than {_pct(shares.time)} of the slowest rank's time "
            f"({_secs(choice.fastest)} to {_secs(choice.slowest)}): rank barely changes the cost "
            "here, so the time rule was dropped and the choice rests on the metric."
        )
    return (
        f"No rank within {_pct(1 - shares.quality)} of the best trained within "
        f"{_pct(shares.time)} of the slowest rank's time ({_secs(choice.time_limit)}): the time "
        "rule was dropped and the choice rests on the metric."
    )


def _smaller_note(choice: _Choice, shares: _Shares) -> str:
    """Why the next smaller rank was not chosen."""
    smaller = [row for row in choice.usable if row.r < choice.chosen.r]
    if not smaller:
        return ""
    below, scale = smaller[-1], choice.scale
    if below not in choice.qualifies:
        why = (
            f"is {_pct(choice.gap(below) / scale)} worse than the best, more than the "
            f"{_pct(1 - shares.quality)} allowed"
        )
    elif below not in choice.kept:
        why = f"took {_secs(below.train_seconds)}, over the limit of {_secs(choice.time_limit)}"
    else:
        top = choice.top
        why = (
            f"is {_pct(choice.gap(below, top) / scale)} worse than r={top.r}, more than the "
            f"{_pct(shares.min_gain)} of the best that a smaller rank may give up"
        )
    return f"r={below.r} ({shares.metric} {fmt(below.metric)}) {why}."


def _larger_note(choice: _Choice, shares: _Shares) -> str:
    """What the next larger rank would have bought, and at what cost."""
    larger = [row for row in choice.usable if row.r > choice.chosen.r]
    if not larger:
        return ""
    above, chosen, scale = larger[0], choice.chosen, choice.scale
    gain = -choice.gap(above, chosen)
    if gain <= 0:
        return f"r={above.r} is no better ({shares.metric} {fmt(above.metric)})."
    cost = ""
    if above.train_seconds and chosen.train_seconds:
        cost = f" for {above.train_seconds / chosen.train_seconds:.2f}x the time"
    if _within(gain, shares.min_gain * scale):
        return (
            f"r={above.r} improves it by only {fmt(gain)} "
            f"({_pct(gain / scale)} of the best){cost}: diminishing returns."
        )
    return (
        f"r={above.r} is better by {_pct(gain / scale)}{cost}, over the "
        f"{_pct(shares.time)} time limit ({_secs(choice.time_limit)})."
    )


def _failed_note(failed: Sequence[SweepRow]) -> str:
    if not failed:
        return ""
    items = "; ".join(
        f"r={row.r} {row.reason or ('has no finite metric' if row.status == 'ok' else 'failed')}"
        for row in failed
    )
    return f"Left out: {items}."


def check_shares(quality_share: float, time_share: float, min_gain: float) -> None:
    """Raises a ValueError naming the first share outside its range: ``quality_share`` and
    ``time_share`` in (0, 1], ``min_gain`` in [0, 1)."""
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


def fmt(value: float | None) -> str:
    """A metric or alpha with 4 significant digits; ``n/a`` for None."""
    return "n/a" if value is None else f"{value:.4g}"


def _pct(share: float) -> str:
    """A share as a percentage: 2 significant digits below 10%, whole percents above."""
    value = 100 * share
    return f"{value:.2g}%" if abs(value) < 10 else f"{value:.0f}%"


def _secs(seconds: float | None) -> str:
    """Seconds with 3 significant digits (whole seconds from 100 s); ``n/a`` for None."""
    if seconds is None:
        return "n/a"
    return f"{seconds:.3g} s" if seconds < 100 else f"{seconds:.0f} s"
