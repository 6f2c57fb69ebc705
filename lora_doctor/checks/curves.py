"""Curve checks: plateau, overfitting, non-finite values, divergence, zero loss, grad-norm spikes.

They read only the metric history (``loss``, ``eval_loss``, ``grad_norm``), so they run the same way
live (through the callback) and offline (replaying a saved ``log_history``). Each rule is a pure
function of arrays (and, for the rules that scan a series once, the small state they carry from one
look to the next, which the engine keeps); each check declares the series it reads, and the engine
hands it every point since its last look, so a 100,000-entry log costs time linear in its length.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from lora_doctor.advice import go_back
from lora_doctor.checks.base import Cadence, Check, Context, Phase, Read, Reads, finite
from lora_doctor.config import DoctorConfig
from lora_doctor.findings import Finding, Recommendation, Severity
from lora_doctor.stats import TheilSen, theil_sen

__all__ = [
    "CHECKS",
    "DivergenceState",
    "GradNormSpike",
    "LossDivergence",
    "LossPlateau",
    "NonFiniteValues",
    "Overfit",
    "OverfitState",
    "OwnMetric",
    "PlateauLooks",
    "RlRun",
    "Spike",
    "Trend",
    "ZeroLoss",
    "divergence_scan",
    "first_non_finite",
    "flat_window",
    "overfit_scan",
    "past_early_phase",
    "spike_scan",
]

LOSS, EVAL_LOSS, GRAD_NORM = "loss", "eval_loss", "grad_norm"


def _fmt(x: float) -> str:
    return f"{x:.3g}"


def _learner(ctx: Context) -> str:
    """What learns: "the adapter" in a run known to train LoRA, else "the model"."""
    facts = ctx.facts
    lora = facts.has_lora is True or (facts.has_lora is None and (facts.adapters or facts.layers))
    return "the adapter" if lora else "the model"


def _windows(a: np.ndarray, width: int) -> np.ndarray:
    """The windows of ``width`` consecutive points of ``a``, one per row, without a copy."""
    rows = len(a) - width + 1
    return np.lib.stride_tricks.as_strided(
        a, shape=(max(rows, 0), width), strides=(a.strides[0], a.strides[0]), writeable=False
    )


_NOISE_POINTS = 200


def _noise_sd(points: np.ndarray) -> float:
    """The noise of a series: a robust standard deviation from its successive differences (a
    trend or a level shift barely moves it). Gaussian noise: median |diff| = 0.954 sigma."""
    if len(points) < 3:
        return 0.0
    return float(np.median(np.abs(np.diff(points)))) / 0.954


# --- rl ---------------------------------------------------------------------------------------------
class RlRun(Check):
    """A reinforcement-learning or preference run: the loss rules are switched off, once said.

    The loss of GRPO, PPO, DPO, ORPO or KTO is not a likelihood to be driven down: GRPO's loss sits
    near 0 by construction (TRL docs, "GRPO Trainer: logged metrics"), DPO's starts at log 2 and its
    signal is in ``rewards/margins``. The engine derives ``facts.is_rl`` from the trainer's class
    and the keys those trainers log (``reward``, ``rewards/*``, ``logps/*``, ``kl`` ...).
    """

    code, slug, severity = "LD207", "rl-loss-checks-off", Severity.INFO
    phases = frozenset({Phase.SETUP, Phase.LOG, Phase.EVAL})

    def run(self, ctx: Context) -> Iterable[Finding]:
        if not ctx.facts.is_rl:
            return
        keys = ctx.facts.rl_keys
        named = ", ".join(keys[:5]) or f"trainer {ctx.facts.trainer or 'RL'}"
        yield self.finding(
            ctx,
            "Reinforcement-learning or preference run: loss checks are off",
            f"This run logs {named}, the metrics of an RL or preference trainer (GRPO, PPO, DPO, "
            "ORPO, KTO). Their loss is not a likelihood that should fall (GRPO's sits near 0 by "
            "construction), so loss-plateau, overfit, loss-divergence and zero-loss stay quiet; "
            "watch the rewards and the KL instead. Non-finite values and grad-norm spikes are "
            "still reported.",
            evidence={"rl_keys": keys[:10]},
        )


# --- non-finite values --------------------------------------------------------------------------
def first_non_finite(steps: Sequence[float], values: Sequence[float]) -> tuple[float, float] | None:
    """The first (step, value) whose value is NaN or infinite, or None.

    Example:
        >>> first_non_finite([1, 2, 3], [0.5, float("nan"), 0.4])
        (2, nan)
    """
    if all(map(math.isfinite, values)):
        return None
    for step, value in zip(steps, values, strict=True):
        if not math.isfinite(value):
            return step, value
    return None  # pragma: no cover - unreachable: some value is not finite


class NonFiniteValues(Check):
    """NaN or infinity in the loss, the eval loss or the grad norm.

    A non-finite loss means the weights are (or are about to be) NaN: every later step is wasted.
    A non-finite grad norm under fp16 mixed precision can be a skipped step of the loss scaler, but
    repeated ones mean overflow (PyTorch AMP docs, "Gradient scaling"). Reported once per metric,
    at the first occurrence.
    """

    code, slug, severity = "LD203", "non-finite-values", Severity.ERROR
    phases = frozenset({Phase.LOG, Phase.EVAL, Phase.END})
    reads = (Reads(LOSS), Reads(EVAL_LOSS), Reads(GRAD_NORM))
    once = False

    def run(self, ctx: Context) -> Iterable[Finding]:
        for key in (LOSS, EVAL_LOSS, GRAD_NORM):
            points = ctx.points(key)
            bad = first_non_finite(points.new_steps, points.new_values)
            if bad is not None:
                yield self._finding(ctx, key, int(bad[0]), bad[1])

    def _finding(self, ctx: Context, key: str, step: int, value: float) -> Finding:
        is_grad = key == GRAD_NORM
        running = ctx.steps_left != 0
        later = running or ctx.history.last_step > step
        precision = ctx.facts.setup.precision
        if not is_grad:
            why = "the weights are or will soon be NaN" + (
                ", and every later step is wasted" if later else ""
            )
        elif precision in ("bf16", "fp32"):  # no loss scaler to skip the step
            why = (
                f"the gradient is not finite, and in {precision} no loss scaler skips the step: "
                "its update carries the NaN into the weights"
            )
        else:
            why = (
                "the gradient overflowed: under fp16 the loss scaler skips such a step, but "
                "repeated overflows mean the update is unstable"
            )
        return self.finding(
            ctx,
            f"{key} is {value} at step {step}",
            f"The logged {key} became {value} at step {step}: {why}.",
            evidence={"key": key, "value": str(value), "first_step": step},
            recommendation=None
            if is_grad
            else Recommendation(
                summary="Stop training and remove the cause of the NaN"
                if running
                else "Remove the cause of the NaN before training again",
                steps=("Stop training: steps after a NaN loss train nothing",) if running else (),
            ),
            severity=Severity.WARNING if is_grad else Severity.ERROR,
            step=step,
        )

    def dedup_key(self, finding: Finding) -> Hashable:
        return str(finding.evidence.get("key", ""))


class ZeroLoss(Check):
    """A logged training loss of exactly 0.0.

    With ``logging_nan_inf_filter=True`` (the default) the Trainer drops NaN/inf losses from the
    running sum (transformers ``Trainer._inner_training_loop``), so a logging window where every
    step was NaN logs exactly 0.0, usually beside a NaN grad norm. A loss of 0 from the first log
    means no token is trained on: every label is -100 (wrong prompt masking or a collator that
    masks the completion). Cross-entropy on real tokens is never exactly 0.
    """

    code, slug, severity = "LD205", "zero-loss", Severity.ERROR
    phases = frozenset({Phase.LOG, Phase.END})
    reads = (Reads(LOSS), Reads(GRAD_NORM))

    def run(self, ctx: Context) -> Iterable[Finding]:
        loss = ctx.points(LOSS)
        values = loss.new_values
        if ctx.facts.is_rl or 0.0 not in values:
            return
        i = list(values).index(0.0)
        step = loss.new_steps[i]
        grad = ctx.points(GRAD_NORM)
        bad_grad = {
            s for s, v in zip(grad.new_steps, grad.new_values, strict=True) if not math.isfinite(v)
        }
        yield self._finding(
            ctx, int(step), from_start=loss.seen_before + i == 0, hidden_nan=step in bad_grad
        )

    def _finding(self, ctx: Context, step: int, from_start: bool, hidden_nan: bool) -> Finding:
        if hidden_nan:
            title = f"Loss logged as exactly 0.0 beside a non-finite grad norm at step {step}"
            cause = (
                "the grad norm of the same log is NaN or infinite, so the real loss was NaN: the "
                "Trainer's logging_nan_inf_filter (on by default) dropped it and logged 0.0"
            )
            rec = Recommendation(
                summary="Treat it as a NaN loss: non-finite-values ranks its causes",
                steps=("Set logging_nan_inf_filter=False to see the real NaN losses",),
                config_changes={"logging_nan_inf_filter": False},
            )
        elif from_start:
            title = "Loss is exactly 0.0 from the first log"
            cause = (
                "a loss of 0 from the start means nothing is trained on: every label is -100 "
                "(the prompt masking or the data collator masks the whole sequence)"
            )
            rec = Recommendation(
                summary="Fix the labels: some tokens of every example must have a label != -100",
                steps=(
                    "Print one batch: check that labels are not all -100",
                    "With completion-only training, check the response template matches the data",
                    "Check max_length does not cut off the whole completion",
                ),
            )
        else:
            title = f"Loss logged as exactly 0.0 at step {step}"
            cause = (
                "cross-entropy on real tokens is never exactly 0: either every step of that "
                "logging window was NaN and logging_nan_inf_filter hid it, or a batch had all its "
                "labels masked, or the loss is so near 0 that the log rounds it (older "
                "transformers round to 4 decimals), itself a sign of leaked or memorised labels"
            )
            rec = Recommendation(
                summary="Find the NaN or the fully masked batch",
                steps=(
                    "Set logging_nan_inf_filter=False to see NaN losses as they are",
                    "Check that no batch has all labels -100",
                ),
                config_changes={"logging_nan_inf_filter": False},
            )
        return self.finding(
            ctx,
            title,
            f"The training loss logged at step {step} is exactly 0.0: {cause}.",
            evidence={"first_step": step, "from_start": from_start, "beside_nan_grad": hidden_nan},
            recommendation=rec,
            step=step,
        )


@dataclass
class DivergenceState:
    """What the divergence scan carries from one look to the next: the rolling window of the last
    ``divergence_window`` finite losses, the last 200 for the noise, the first and the best rolling
    median (with its step), the lowest median of the first losses (before the window filled, with
    its step) and how many medians in a row have stood high."""

    window: deque[float] = field(default_factory=deque)
    recent: deque[float] = field(default_factory=lambda: deque(maxlen=_NOISE_POINTS))
    first: float | None = None
    best: float = math.inf
    best_step: float = 0.0
    early: float = math.inf
    early_step: float = 0.0
    run: int = 0


@dataclass(frozen=True)
class Divergence:
    """A divergence verdict: the rolling median that stood high, at which step, and the drop."""

    step: int
    level: float
    best: float
    best_step: int
    first: float
    drop: float


def divergence_scan(
    state: DivergenceState, steps: Sequence[float], values: Sequence[float], cfg: DoctorConfig
) -> Divergence | None:
    """Scans new losses for a divergence, carrying ``state`` (updated in place) across calls.

    The rolling median of the last ``divergence_window`` finite losses must stay above its best by
    ``divergence_rise`` of the best, give back ``divergence_giveback`` of the drop achieved, and
    exceed ``divergence_noise`` noise standard deviations, for ``divergence_window`` medians in a
    row. A loss that jumps within the first logs has no rolling best from before the jump, so the
    medians of the first losses (before the window filled) are a second reference: a rolling median
    ``divergence_early_factor`` times the lowest of them, above the noise, stands high too. Returns
    the first verdict, or None.

    Example:
        >>> cfg = DoctorConfig()
        >>> loss = [3.0] * 5 + [1.0] * 20 + [2.9] * 20
        >>> divergence_scan(DivergenceState(), range(len(loss)), loss, cfg).level
        2.9
        >>> jump = [1.5] + [10.4] * 12  # destroyed at the second log
        >>> divergence_scan(DivergenceState(), range(len(jump)), jump, cfg).best
        1.5
    """
    w = cfg.divergence_window
    window, recent = state.window, state.recent
    for step, value in zip(steps, values, strict=True):
        if not math.isfinite(value):
            continue
        window.append(value)
        recent.append(value)
        if len(window) > w:
            window.popleft()
        if len(window) < w:
            with np.errstate(over="ignore"):  # two losses near the float limit: an inf median
                early = float(np.median(window))  # the first medians, of fewer than w losses
            if early < state.early:
                state.early, state.early_step = early, step
            continue
        level = sorted(window)[w // 2]  # the rolling median (w is small)
        if state.first is None:
            state.first = level
        if level <= state.best:
            state.best, state.best_step = level, step
        rise = level - state.best
        drop = max(state.first - state.best, 0.0)
        jump = state.early > 0 and level > cfg.divergence_early_factor * state.early
        ordinary = rise > cfg.divergence_rise * abs(state.best) and rise >= (
            cfg.divergence_giveback * drop
        )
        high = (ordinary or jump) and (
            # rare: only then is the noise level measured
            (rise if ordinary else level - state.early)
            > cfg.divergence_noise * _noise_sd(np.fromiter(recent, float))
        )
        state.run = state.run + 1 if high else 0
        if state.run >= w:
            if ordinary:
                return Divergence(
                    int(step), level, state.best, int(state.best_step), state.first, drop
                )
            early = state.early  # the jump came before the first rolling median
            return Divergence(int(step), level, early, int(state.early_step), early, 0.0)
    return None


class LossDivergence(Check):
    """The training loss climbed well above its best and stays there.

    Uses a rolling median (robust to single spikes) and asks that the rise last: the median of the
    last ``divergence_window`` points must stay above the best median by ``divergence_rise`` (a
    fraction of the best) and give back at least ``divergence_giveback`` of the drop achieved, for
    ``divergence_window`` consecutive points. A learning rate too high for the LoRA scaling is the
    usual cause (Biderman et al. 2024, "LoRA Learns Less and Forgets Less": LoRA is sensitive to
    the learning rate). The rise must also exceed ``divergence_noise`` times the noise of the loss
    (a robust standard deviation of its successive differences), so a tiny, noisy loss is not
    taken for a divergence. A loss that jumps within the first logs (a model destroyed by its
    first updates, e.g. from 1.5 to ln(vocabulary) at the second log) has no rolling best from
    before the jump; it is judged against the medians of the losses logged before the window
    filled, and stands high at ``divergence_early_factor`` (3x) the lowest of them: the runs of
    the wild corpus never hold their rolling median above 1.12x that reference.
    """

    code, slug, severity = "LD204", "loss-divergence", Severity.ERROR
    phases = frozenset({Phase.LOG, Phase.END})
    reads = (Reads(LOSS),)
    State = DivergenceState

    def run(self, ctx: Context) -> Iterable[Finding]:
        if ctx.facts.is_rl:
            return
        points = ctx.points(LOSS)
        verdict = divergence_scan(ctx.state, points.new_steps, points.new_values, ctx.config)
        if verdict is not None:
            yield self._finding(ctx, verdict)

    def _finding(self, ctx: Context, v: Divergence) -> Finding:
        back = go_back(ctx.facts, v.best_step, "the lowest loss")
        running = ctx.steps_left != 0
        if back.step is not None:
            summary = f"Go back to checkpoint-{back.step}, before the loss climbed"
        elif back.known:
            summary = f"Restart from step 0: no checkpoint was saved before step {v.best_step}"
        else:
            summary = f"Go back to a checkpoint saved before step {v.best_step}"
        return self.finding(
            ctx,
            f"Training loss diverged: {_fmt(v.level)} against a best of {_fmt(v.best)}",
            f"The median training loss of the last {ctx.config.divergence_window} logs is "
            f"{_fmt(v.level)}, {_fmt(v.level / v.best if v.best > 0 else math.inf)}x its best "
            f"({_fmt(v.best)} at step {v.best_step}), and has stayed up: the run is undoing what "
            "it learned.",
            evidence={
                "level": v.level,
                "best": v.best,
                "best_step": v.best_step,
                "initial": v.first,
                "drop_before": v.drop,
                "checkpoint": back.step,
            },
            recommendation=Recommendation(
                summary=("Stop and " + summary[0].lower() + summary[1:]) if running else summary,
                steps=(
                    *(
                        (
                            "Stop training: the steps since the best loss are undoing what it learned",
                        )
                        if running
                        else ()
                    ),
                    back.text,
                ),
            ),
            step=v.step,
        )


# --- grad-norm spikes ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Spike:
    """A grad-norm spike: its step and value, the median it is judged against, the factor it had
    to pass (``spike_factor``, or ``spike_early_factor`` for an early one) and how many grad norms
    came before it."""

    step: int
    value: float
    median: float
    factor: float
    before: int


def spike_scan(
    context: Sequence[float],
    steps: Sequence[float],
    values: Sequence[float],
    seen: int,
    cfg: DoctorConfig,
) -> Spike | None:
    """The first new grad norm far above the median of the (up to) ``spike_window`` finite ones
    logged before it; None when there is none.

    Args:
        context: the grad norms logged just before the new ones (``spike_window`` of them, fewer at
            the start of the run).
        steps, values: the new grad norms and their steps.
        seen: how many grad norms came before the first new one: a point is judged against
            ``spike_factor`` once ``spike_min_points`` came before it, and before that against
            ``spike_early_factor`` once ``spike_early_min_points`` did.
        cfg: the thresholds (``spike_factor``, ``spike_window``, ``spike_min_points``,
            ``spike_early_factor``, ``spike_early_min_points``).

    Example:
        >>> norms = [1.0] * 12
        >>> spike_scan(norms, [13], [50.0], 12, DoctorConfig()).factor
        10.0
        >>> spike_scan([8.0, 9.0, 7.0], [4], [11140.0], 3, DoctorConfig()).median
        8.0
    """
    width = cfg.spike_window
    tail = [v for v in context if math.isfinite(v)][-width:]
    x, y = finite(steps, values)
    if not len(y):
        return None
    # no window median is below the smallest value seen: when even that cannot make a spike,
    # skip the medians (the common case)
    lowest = min(float(y.min()), min(tail, default=math.inf))
    if lowest > 0 and float(y.max()) <= cfg.spike_factor * lowest:
        return None
    prev = len(tail)
    joined = np.concatenate([np.asarray(tail, dtype=float), y])
    medians = np.full(len(y), np.nan)
    before = seen + np.arange(len(y))
    factor = np.where(before >= cfg.spike_min_points, cfg.spike_factor, cfg.spike_early_factor)
    judged = before >= min(cfg.spike_early_min_points, cfg.spike_min_points)
    # a median (or the factor times one) beyond the float limit is infinite: no value can be
    # the factor (> 1) times it, so no spike there, which is right
    with np.errstate(invalid="ignore", over="ignore"):
        for j in range(max(prev, 1), min(width, len(joined))):  # the run's first points only
            medians[j - prev] = np.median(joined[:j])
        lo = max(width, prev)
        if len(joined) > lo:
            medians[lo - prev :] = np.median(_windows(joined[:-1], width)[lo - width :], axis=1)
        spikes = np.nonzero(judged & (medians > 0) & (y > factor * medians))[0]
    if not len(spikes):
        return None
    i = int(spikes[0])
    return Spike(int(x[i]), float(y[i]), float(medians[i]), float(factor[i]), int(before[i]))


class GradNormSpike(Check):
    """A grad norm far above its recent level.

    Compares each logged grad norm with the median of the previous ``spike_window`` ones (Lightning's
    ``SpikeDetection`` uses the same running-statistic idea on the loss). A spike of
    ``spike_factor`` times the median is a sign of a bad batch or a learning rate at the edge of
    stability; clipping (``max_grad_norm``) limits the damage of a single one. The first
    ``spike_min_points`` grad norms vary too much for that factor, so they are judged only against
    ``spike_early_factor`` (100x) the median of those before them: in the wild corpus an early grad
    norm of a supervised run reaches at most 15x that median, while a reported run logged 11,140
    among norms near 8 (1,265x) at its ninth log.
    """

    code, slug, severity = "LD206", "grad-norm-spike", Severity.WARNING
    phases = frozenset({Phase.LOG, Phase.END})
    reads = (Reads(GRAD_NORM, before="spike_window"),)

    def run(self, ctx: Context) -> Iterable[Finding]:
        p = ctx.points(GRAD_NORM)
        spike = spike_scan(
            p.values[: p.new_from], p.new_steps, p.new_values, p.seen_before, ctx.config
        )
        if spike is not None:
            yield self._finding(ctx, spike)

    def _finding(self, ctx: Context, spike: Spike) -> Finding:
        step, value, median = spike.step, spike.value, spike.median
        previous = min(spike.before, ctx.config.spike_window)
        return self.finding(
            ctx,
            f"Grad norm spiked to {_fmt(value)} at step {step}, {_fmt(value / median)}x its recent median",
            f"The grad norm at step {step} is {_fmt(value)}, {_fmt(value / median)}x the median "
            f"({_fmt(median)}) of the previous {previous} logs (threshold "
            f"{_fmt(spike.factor)}x). A spike comes from an outlier batch or a learning rate at "
            "the edge of stability; repeated spikes often precede a divergence.",
            evidence={
                "value": value,
                "median": median,
                "factor": value / median,
                "first_step": step,
            },
            step=step,
        )


# --- overfit --------------------------------------------------------------------------------------
#: Evaluations since the best that the steady-rise rule fits (a bound that keeps each evaluation's
#: cost constant on long runs).
_TREND_POINTS = 200


@dataclass
class EvalTrack:
    """One eval metric's running summary: how many finite evaluations, the best one (value, index,
    step), the last ``overfit_patience`` values, the last one, and the values since the best (at
    most ``_TREND_POINTS``)."""

    patience: int
    n: int = 0
    best: float = math.inf
    best_i: int = -1
    best_step: float = 0.0
    tail: deque[float] = field(default_factory=deque)
    since: deque[float] = field(default_factory=lambda: deque(maxlen=_TREND_POINTS))

    @property
    def last(self) -> float:
        return self.tail[-1]


@dataclass
class OverfitState:
    """The running summary of each eval loss (``eval_loss``, ``eval_<name>_loss``)."""

    tracks: dict[str, EvalTrack] = field(default_factory=dict)


@dataclass(frozen=True)
class Rise:
    """An evaluation after which the eval loss counts as risen from its best.

    Attributes:
        step: the evaluation's step.
        trend: the Theil-Sen fit (loss per evaluation) of the evaluations since the best when the
            steady-rise rule established the rise; None when the plain rule (``overfit_min_rise``)
            did.
    """

    step: float
    trend: TheilSen | None = None


def overfit_scan(
    track: EvalTrack, steps: Sequence[float], values: Sequence[float], cfg: DoctorConfig
) -> Iterable[Rise]:
    """Feeds new evaluations to ``track`` (updated in place) and yields each one after which the
    last ``overfit_patience`` evaluations all stand above the best by ``overfit_min_abs_rise``
    (absolute) and either ``overfit_min_rise`` (relative: the plain rule) or
    ``overfit_trend_min_rise`` while the evaluations since the best rise steadily: the
    ``overfit_trend_confidence`` interval of their Theil-Sen slope lies above zero (Sen 1968, the
    interval of Kendall's tau trend test), given at least as many of them as that test needs to
    reject at that confidence (:func:`_fewest_for_trend`: 6 at 0.99). Constant time per evaluation
    (the fit takes at most ``_TREND_POINTS`` values).

    Example:
        >>> cfg = DoctorConfig()
        >>> track = EvalTrack(cfg.overfit_patience)
        >>> [r.step for r in overfit_scan(track, [1, 2, 3, 4, 5], [1.0, 0.8, 0.9, 0.95, 1.0], cfg)]
        [5]
        >>> track = EvalTrack(cfg.overfit_patience)  # a steady 3% climb, under the plain 5%
        >>> climb = [1.0] + [1.02 + 0.001 * i for i in range(8)]
        >>> [r.step for r in overfit_scan(track, range(9), climb, cfg) if r.trend is not None]
        [6, 7, 8]
    """
    patience = cfg.overfit_patience
    for step, value in zip(steps, values, strict=True):
        if not math.isfinite(value):
            continue
        track.n += 1
        track.tail.append(value)
        if len(track.tail) > patience:
            track.tail.popleft()
        if value < track.best:
            track.best, track.best_i, track.best_step = value, track.n - 1, step
            track.since.clear()
        else:
            track.since.append(value)
        if track.n < patience + 1 or track.best_i > track.n - 1 - patience:
            continue
        if all(v > _rise_floor(track.best, cfg.overfit_min_rise, cfg) for v in track.tail):
            yield Rise(step)
        elif len(track.since) >= _fewest_for_trend(cfg.overfit_trend_confidence) and all(
            v > _rise_floor(track.best, cfg.overfit_trend_min_rise, cfg) for v in track.tail
        ):
            since = np.fromiter(track.since, dtype=float)
            fit = theil_sen(since, np.arange(len(since), dtype=float), cfg.overfit_trend_confidence)
            if fit.low_slope > 0:  # NaN (too few evaluations for the interval) is not
                yield Rise(step, fit)


def _fewest_for_trend(confidence: float) -> int:
    """The fewest values whose rising trend Kendall's test can establish at ``confidence``
    (two-sided): a strictly rising run of n values has the one-sided p-value 1/n! (Kendall 1975),
    so n is the smallest with 1/n! <= (1 - confidence)/2. Sen's interval, a normal approximation,
    is not valid below it.

    Example:
        >>> _fewest_for_trend(0.99), _fewest_for_trend(0.95)
        (6, 5)
    """
    n = 2
    while math.factorial(n) * (1 - confidence) / 2 < 1:
        n += 1
    return n


def _rise_floor(best: float, rise: float, cfg: DoctorConfig) -> float:
    """The eval loss above which an evaluation stands ``rise`` (relative) and
    ``overfit_min_abs_rise`` above the best."""
    return max(best * (1 + rise), best + cfg.overfit_min_abs_rise)


#: Training losses compared before and after the best evaluation (a bound that keeps each
#: evaluation's cost constant on long runs).
_TRAIN_POINTS = 1000


def _train_before_after(ctx: Context, best_step: float) -> tuple[float, float]:
    """Median training loss since the best evaluation and over as many logs before it (at most
    ``_TRAIN_POINTS`` each side, at least 3 before); NaN when either side has none."""
    tsteps, train = ctx.history.points(LOSS)
    cut = bisect.bisect_right(tsteps, best_step)  # steps are logged in order
    after = [v for v in train[max(cut, len(train) - _TRAIN_POINTS) :] if math.isfinite(v)]
    width = min(max(len(train) - cut, 3), _TRAIN_POINTS)
    before = [v for v in train[max(0, cut - width) : cut] if math.isfinite(v)]
    if not (before and after):
        return math.nan, math.nan
    return float(np.median(before)), float(np.median(after))


class Overfit(Check):
    """Training loss still falling while the eval loss has risen from its best.

    The classic sign of memorising the training set (Goodfellow et al., "Deep Learning", 7.8 early
    stopping). Established when the last ``overfit_patience`` evaluations are all above the best by
    ``overfit_min_abs_rise`` (absolute: a run whose train and eval losses are both tiny and flat is
    not overfitting) and by ``overfit_min_rise`` (relative, 5%), while the training loss since the
    best evaluation is lower than before it.

    A slower climb counts too: the last ``overfit_patience`` evaluations all above the best by
    ``overfit_trend_min_rise`` (2%) while the evaluations since the best rise steadily, the
    ``overfit_trend_confidence`` (99%) interval of their Theil-Sen slope lying above zero (Sen
    1968, the interval of Kendall's trend test; at least 6 evaluations since the best at 99%). It
    is Prechelt's UP criterion ("Early Stopping - But When?", 1998: stop once the validation error
    has risen over successive strips) made robust to noise. His PQ criterion (generalization loss
    over training progress) would not do: it stands down while the training loss still falls
    fast, which is exactly when these runs memorise. Measured on the fault benchmark's ``overfit``
    scenario, whose GPT-2 runs memorise (training loss 4.1 -> 0.9) while the eval loss creeps 3 to
    4% above its best: the plain 5% rule found 1 of 3, this finds all 3 (at steps 55 to 90 of
    100), with no new report on the healthy controls or on the 12 evaluated runs of the wild
    corpus. On simulated flat evaluations (60 of them, 300 runs each) with independent noise it
    adds a report to 0.3, 1.7, 1.0 and 0% of runs at 0.5, 1, 2 and 3% noise (the 5% rule alone
    fires on 0, 0, 76 and 100%). Noise correlated from one evaluation to the next, a slow wander, is
    its weak spot: AR(1) with phi 0.5 adds 5, 38 and 3% at 0.5, 1 and 2% noise, phi 0.8 at 1%
    adds 74% (a wander of 2% or more that lasts six evaluations reads as a climb; correcting the
    test for the autocorrelation, Hamed and Rao 1998, did not help on so few evaluations).

    Fixes follow practice (DESIGN.md section 3): the best
    checkpoint first (one that was saved: :func:`lora_doctor.advice.go_back`), then a shorter run,
    then for LoRA a smaller r, dropout and weight decay, for a full fine-tune weight decay and a
    lower learning rate. A run that keeps its best model by another metric
    (``metric_for_best_model``, e.g. accuracy) is judged by it too: while that metric still
    improves, the rising loss is information (over-confidence on the examples it gets wrong), not
    a rollback; once it has peaked, the rollback goes to its best. Judging costs constant time per
    evaluation (a running best and the last ``overfit_patience`` values).
    """

    code, slug, severity = "LD202", "overfit", Severity.WARNING
    phases = frozenset({Phase.EVAL})
    # eval_loss, or eval_<name>_loss for each dataset when eval_dataset is a dict
    reads = (Reads("eval_*loss"),)
    once = False
    State = OverfitState

    def run(self, ctx: Context) -> Iterable[Finding]:
        if ctx.facts.is_rl:
            return
        cfg = ctx.config
        for key, points in ctx.reads.items():
            track = ctx.state.tracks.setdefault(key, EvalTrack(cfg.overfit_patience))
            for rise in overfit_scan(track, points.new_steps, points.new_values, cfg):
                then, now = _train_before_after(ctx, track.best_step)
                if now > then:
                    continue  # both rise: that is divergence or noise, not overfitting
                yield self._finding(ctx, key, track, then, now, rise.trend)
                break

    def dedup_key(self, finding: Finding) -> Hashable:
        key = str(finding.evidence.get("key", EVAL_LOSS))
        # the nuanced report (the run's own metric still improves) does not silence the plain one
        # once that metric stops improving too
        return (key, finding.severity.value)

    def _finding(
        self,
        ctx: Context,
        key: str,
        track: EvalTrack,
        then: float,
        now: float,
        trend: TheilSen | None,
    ) -> Finding:
        cfg = ctx.config
        best, best_step, last = track.best, int(track.best_step), track.last
        since = track.n - 1 - track.best_i
        own = _own_metric(ctx, key, best_step)
        if own is not None and own.improving:
            return self._still_improving(ctx, key, track, own)
        target = own.best_step if own is not None else best_step
        epoch = _value_at(ctx, "epoch", target)
        steps, changes, summary = _overfit_fixes(ctx, key, target, epoch, own)
        train_text = (
            f", while the training loss kept falling ({_fmt(then)} -> {_fmt(now)})"
            if math.isfinite(then)
            else ""
        )
        own_text = (
            f" {own.key}, the metric this run keeps its best model by (metric_for_best_model), "
            f"was best at step {own.best_step} ({_fmt(own.best)}) and is now {_fmt(own.last)}."
            if own is not None
            else ""
        )
        trend_text = (
            f" It has risen steadily over the {len(track.since)} evaluations since its best "
            f"(Theil-Sen slope +{_fmt(trend.slope)} per evaluation, "
            f"{_fmt(100 * cfg.overfit_trend_confidence)}% interval {_fmt(trend.low_slope)} to "
            f"{_fmt(trend.high_slope)})."
            if trend is not None
            else ""
        )
        worse = (
            " Every further step makes it worse on new data."
            if ctx.steps_left != 0
            else f" The steps after step {target} made it worse on new data."
        )
        return self.finding(
            ctx,
            f"{key} rose from {_fmt(best)} (step {best_step}) to {_fmt(last)} over {since} evaluations",
            f"The {key} has been above its best ({_fmt(best)} at step {best_step}) for the last "
            f"{cfg.overfit_patience} evaluations, now {_fmt(last)} (+{_fmt(100 * (last / best - 1) if best > 0 else math.inf)}%)"
            f"{train_text}: {_learner(ctx)} is memorising the training set.{trend_text}{own_text}"
            f"{worse}",
            evidence={
                "key": key,
                "best_eval_loss": best,
                "best_step": best_step,
                "eval_loss": last,
                "evals_since_best": since,
                "train_loss_at_best": then,
                "train_loss_now": now,
                "best_epoch": epoch,
                "train_examples": ctx.facts.train_examples,
                **(
                    {"trend_slope": trend.slope, "trend_low_slope": trend.low_slope}
                    if trend is not None
                    else {}
                ),
                **(own.evidence() if own is not None else {}),
            },
            recommendation=Recommendation(
                summary=summary, steps=tuple(steps), config_changes=changes
            ),
        )

    def _still_improving(self, ctx: Context, key: str, track: EvalTrack, own: OwnMetric) -> Finding:
        """The eval loss rises while the metric the run keeps its best model by still improves:
        information, not a rollback."""
        best, best_step, last = track.best, int(track.best_step), track.last
        name = own.key.removeprefix("eval_")
        return self.finding(
            ctx,
            f"{key} rose from {_fmt(best)} (step {best_step}) to {_fmt(last)}, but {own.key} "
            f"still improves ({_fmt(own.best)} at step {own.best_step})",
            f"The {key} has been above its best ({_fmt(best)} at step {best_step}) for the last "
            f"{ctx.config.overfit_patience} evaluations, now {_fmt(last)}, but {own.key}, the "
            "metric this run keeps its best model by (metric_for_best_model), reached its best "
            f"({_fmt(own.best)}) at step {own.best_step}, after the loss turned. By the run's own "
            "measure the model still gets better: a loss that rises while that metric improves "
            "usually means over-confident predictions on the examples it gets wrong, which "
            "matters only where the probabilities themselves are used. No reason to roll back "
            f"yet; it is overfitting once {own.key} stops improving too.",
            evidence={
                "key": key,
                "best_eval_loss": best,
                "best_step": best_step,
                "eval_loss": last,
                **own.evidence(),
            },
            recommendation=Recommendation(
                summary=f"Keep training while {own.key} improves, and keep the best checkpoint "
                "by it",
                steps=(
                    f"Keep load_best_model_at_end=True with metric_for_best_model='{name}', so the "
                    "checkpoint kept is the best by your metric",
                    f"Add EarlyStoppingCallback(early_stopping_patience="
                    f"{ctx.config.overfit_patience}) to stop once {own.key} stops improving",
                ),
                config_changes={"load_best_model_at_end": True, "metric_for_best_model": name},
            ),
            severity=Severity.INFO,
        )


@dataclass(frozen=True)
class OwnMetric:
    """The metric a run keeps its best model by (``metric_for_best_model``), as logged.

    Attributes:
        key: its logged name (``eval_accuracy``).
        greater_is_better: its direction.
        best, best_step: its best value so far and the evaluation step of it.
        last: its latest value.
        improving: its best came after the eval loss's best, within the last
            ``overfit_patience`` evaluations: by the run's own measure the model still improves.
    """

    key: str
    greater_is_better: bool
    best: float
    best_step: int
    last: float
    improving: bool

    def evidence(self) -> dict[str, object]:
        return {
            "metric_for_best_model": self.key,
            "greater_is_better": self.greater_is_better,
            "metric_best": self.best,
            "metric_best_step": self.best_step,
            "metric_now": self.last,
            "metric_improving": self.improving,
        }


def _own_metric(ctx: Context, key: str, loss_best_step: int) -> OwnMetric | None:
    """The run's ``metric_for_best_model`` as logged (None when the run names none, names the
    loss being judged, or has not logged it). Its direction is ``greater_is_better``, else the
    Trainer's default: higher is better unless the name ends in "loss"."""
    setup = ctx.facts.setup
    name = setup.metric_for_best_model
    if not name:
        return None
    metric = name if name.startswith("eval_") else f"eval_{name}"
    if metric == key:
        return None
    steps, values = finite(*ctx.history.points(metric))
    if not len(values):
        return None
    greater = (
        setup.greater_is_better
        if setup.greater_is_better is not None
        else not metric.endswith("loss")
    )
    i = int(np.argmax(values) if greater else np.argmin(values))  # the first best, as the Trainer
    recent = steps[-ctx.config.overfit_patience :]
    improving = bool(steps[i] > loss_best_step and steps[i] >= recent[0])
    return OwnMetric(metric, greater, float(values[i]), int(steps[i]), float(values[-1]), improving)


def _overfit_fixes(
    ctx: Context, key: str, best_step: int, epoch: float | None, own: OwnMetric | None
) -> tuple[list[str], dict[str, object], str]:
    """The overfit fixes in order, with their config changes and the summary: back to the best
    checkpoint, keep the best checkpoint and stop early, a shorter run; then for LoRA a smaller r,
    dropout and (small datasets) weight decay; for a full fine-tune weight decay and a lower
    learning rate (DESIGN.md section 3, "Overfit").

    ``save_strategy='best'`` saves a checkpoint at each new best evaluation, which is what
    ``load_best_model_at_end`` needs whatever the run's evaluation schedule (transformers otherwise
    requires the save and evaluation strategies to match). The run stops at the step of the best
    evaluation through ``max_steps``, which binds both a run bounded by steps and one bounded by
    epochs (``num_train_epochs`` is ignored once ``max_steps`` is set).
    """
    cfg, facts = ctx.config, ctx.facts
    back = go_back(facts, best_step, "the best evaluation")
    # the metric the best checkpoint is chosen by: the run's own, else the loss that rose (the
    # Trainer adds the "eval_" prefix back)
    metric = (own.key if own is not None else key).removeprefix("eval_")
    steps = [
        back.text,
        "Keep the best checkpoint: load_best_model_at_end=True, "
        f"metric_for_best_model='{metric}', save_strategy='best' (a checkpoint at each new best "
        f"evaluation), and add EarlyStoppingCallback(early_stopping_patience={cfg.overfit_patience})",
    ]
    changes: dict[str, object] = {
        "load_best_model_at_end": True,
        "metric_for_best_model": metric,
        "save_strategy": "best",
    }
    summary = (
        f"Go back to checkpoint-{back.step} and stop earlier (early stopping)"
        if back.step is not None
        else "Stop at the best evaluation (early stopping)"
    )
    # max_steps, not num_train_epochs: it applies whether the run sets max_steps or epochs
    when = f", epoch {_fmt(epoch)}" if epoch is not None and epoch > 0 else ""
    steps.append(f"Train fewer steps: max_steps={best_step} (the best evaluation{when})")
    changes["max_steps"] = best_step
    if facts.has_lora is False:
        _full_fine_tuning_fixes(ctx, steps, changes)
    else:
        _lora_fixes(ctx, steps, changes)
    return steps, changes, summary


def _lora_fixes(ctx: Context, steps: list[str], changes: dict[str, object]) -> None:
    """A LoRA run's further overfit fixes: r down to 8, lora_dropout 0.1, weight decay on small
    datasets. Where the run is not known to train LoRA (offline without its adapter config), the
    LoRA settings are one conditional step with no config change."""
    cfg, facts = ctx.config, ctx.facts
    n = facts.train_examples
    if not (facts.has_lora is True or facts.adapters or facts.layers):
        steps.append(
            "If this run trains LoRA: lower the rank to r=4..8 (with lora_alpha = 2r) and set "
            "lora_dropout=0.1"
        )
        if not _decays(ctx):
            steps.append("Add weight decay: weight_decay=0.01 to 0.1")
            changes["weight_decay"] = 0.05
        return
    ranks = [a.r for a in facts.adapters.values() if a.r] or [lf.r for lf in facts.layers if lf.r]
    r = max(ranks) if ranks else None
    if r is not None and r > 8:
        steps.append(f"Lower the rank: r=8 (now {r}), lora_alpha=16")
        changes.update({"r": 8, "lora_alpha": 16})
    elif r is None:
        steps.append("Lower the rank to r=4..8 (with lora_alpha = 2r)")
    dropouts = [a.lora_dropout for a in facts.adapters.values() if a.lora_dropout is not None]
    if not dropouts or min(dropouts) < 0.1:
        steps.append("Set lora_dropout=0.1 (0.1 to 0.2)")
        changes["lora_dropout"] = 0.1
    if n is not None and n < cfg.overfit_small_dataset and not _decays(ctx):
        steps.append(f"With only {n} training examples, add weight_decay=0.01 to 0.1")
        changes["weight_decay"] = 0.05


def _full_fine_tuning_fixes(ctx: Context, steps: list[str], changes: dict[str, object]) -> None:
    """A full fine-tune's further overfit fixes: weight decay and a lower learning rate (no LoRA
    setting applies)."""
    if not _decays(ctx):
        steps.append("Add weight decay: weight_decay=0.01 to 0.1")
        changes["weight_decay"] = 0.05
    lr = ctx.facts.learning_rate
    if lr is not None and lr > 0:
        lower = float(f"{lr / 2:.2g}")
        steps.append(f"Lower the learning rate: learning_rate={lower:g} (now {lr:g})")
        changes["learning_rate"] = lower
    else:
        steps.append("Lower the learning rate (halve it)")


def _decays(ctx: Context) -> bool:
    """True when the run already uses a weight decay of at least 0.01."""
    decay = ctx.facts.setup.weight_decay
    return decay is not None and decay >= 0.01


def _value_at(ctx: Context, key: str, step: float) -> float | None:
    """The last value of ``key`` logged at or before ``step``."""
    steps, values = ctx.history.points(key)
    i = bisect.bisect_right(steps, step)
    return values[i - 1] if i else None


# --- plateau --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Trend:
    """A Theil-Sen fit of the loss over a window, as gains relative to the loss level."""

    start: float
    end: float
    points: int
    level: float
    gain: float
    gain_bound: float


def _binned(x: np.ndarray, y: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray]:
    """At most ``bins`` points: medians of consecutive groups (keeps theilslopes' O(n^2) small)."""
    n = len(x)
    if n <= bins:
        return x, y
    k = -(-n // bins)
    full = (n // k) * k

    def medians(a: np.ndarray) -> np.ndarray:
        out = np.median(a[:full].reshape(-1, k), axis=1)
        return np.append(out, np.median(a[full:])) if full < n else out

    return medians(x), medians(y)


def _trend(x: np.ndarray, y: np.ndarray, horizon: float, cfg: DoctorConfig, points: int) -> Trend:
    """Theil-Sen slope of ``y`` over ``x`` with Sen's confidence interval (from Kendall's tau, as
    in the Mann-Kendall test), turned into the relative loss improvement per 10% of training."""
    fit = theil_sen(y, x, cfg.plateau_confidence)
    slope, low = fit.slope, fit.low_slope
    level = max(float(np.median(y[-max(3, len(y) // 5) :])), 1e-12)
    per = 0.1 * horizon / level
    return Trend(
        start=float(x[0]),
        end=float(x[-1]),
        points=points,
        level=level,
        gain=max(0.0, -float(slope)) * per,
        gain_bound=max(0.0, -float(low)) * per,
    )


def flat_window(x: np.ndarray, y: np.ndarray, horizon: float, cfg: DoctorConfig) -> Trend | None:
    """The earliest window start (every ``plateau_start_stride`` from ``plateau_early_fraction``
    to ``plateau_latest_start`` of ``horizon``) over which the finite loss ``y`` at steps ``x`` is
    flat: a Theil-Sen improvement per 10% of training below ``plateau_max_gain`` whose steepest
    value in the confidence interval is below ``plateau_max_gain_bound``. The points are binned
    once for all starts.

    Example:
        >>> x = np.arange(1.0, 101.0)
        >>> flat_window(x, np.full(100, 2.0), 100.0, DoctorConfig()).start
        10.0
    """
    first = np.searchsorted(x, cfg.plateau_early_fraction * horizon)
    # Losses near the float limit (1e308) would overflow the bin medians and the fit's pairwise
    # differences: fit them divided by a power of two that brings them below 2 (exact, so every
    # verdict is as without it), and scale the level back.
    peak = float(np.max(np.abs(y[first:]), initial=0.0))
    scale = math.ldexp(1.0, max(0, math.frexp(peak)[1] - 1))
    bx, by = _binned(x[first:], y[first:] / scale, cfg.plateau_max_points)
    start = cfg.plateau_early_fraction
    while start <= cfg.plateau_latest_start + 1e-9:
        at = start * horizon
        points = len(x) - int(np.searchsorted(x, at))
        sel = bx >= at
        if (
            points >= cfg.plateau_min_points
            and sel.sum() >= 3
            and np.ptp(bx[sel]) > 0  # a slope needs two distinct steps
            and x[-1] - at >= cfg.plateau_min_span * horizon
        ):
            trend = _trend(bx[sel], by[sel], horizon, cfg, points)
            if trend.gain < cfg.plateau_max_gain and trend.gain_bound < cfg.plateau_max_gain_bound:
                return replace(trend, level=trend.level * scale)
        start += cfg.plateau_start_stride
    return None


def past_early_phase(ctx: Context) -> bool:
    """True once a supervised run is past its early phase by a plateau window: the step has
    reached ``plateau_early_fraction + plateau_min_span`` of training with ``plateau_min_points``
    losses logged. The checks that judge a flat or stuck loss start looking then, together."""
    cfg = ctx.config
    return (
        not ctx.facts.is_rl
        and ctx.history.last_step
        >= (cfg.plateau_early_fraction + cfg.plateau_min_span) * ctx.horizon
        and ctx.history.count(LOSS) >= cfg.plateau_min_points
    )


class PlateauLooks(Check):
    """A check judged at the plateau's looks: the whole loss curve, on the plateau's geometric
    schedule (``plateau_look_growth``), once past the early phase (:func:`past_early_phase`)."""

    phases = frozenset({Phase.LOG, Phase.END})
    reads = (Reads(LOSS, Read.ALL),)
    cadence = Cadence(growth="plateau_look_growth")

    def ready(self, ctx: Context) -> bool:
        return past_early_phase(ctx)


class LossPlateau(PlateauLooks):
    """The training loss is flat, or falls very slowly, after the early phase (underfitting).

    Practice (DESIGN.md section 3): a LoRA run's loss falls fast in the first 10 to 20% of training;
    a loss that then stays flat means the adapter stopped learning. Logged losses are noisy, so two
    points prove nothing: the rule fits a Theil-Sen slope (robust to outliers and spikes; Sen 1968)
    to the loss since the early phase, with Sen's confidence interval from Kendall's tau (the
    Mann-Kendall trend test), and expresses it as the relative improvement per 10% of training. It
    fires when the estimated improvement is below ``plateau_max_gain`` and even the steepest slope
    of the interval stays below ``plateau_max_gain_bound``. Windows start between
    ``plateau_early_fraction`` and ``plateau_latest_start`` of training, so a run that keeps falling
    until late and then flattens (a converged run, a decayed learning rate) is not a plateau: every
    window still sees the fall. A loss already down by ``plateau_converged_drop`` of its first value
    has converged. The engine looks on a geometric schedule (``plateau_look_growth``): each look is a
    chance for noise to pass as a plateau, so there are about ten, whatever the run's length. The
    diagnosis pass stands the finding down when ``zero-loss``, ``loss-divergence`` or
    ``non-finite-values`` explains the flat loss, and ranks its causes.
    """

    code, slug, severity = "LD201", "loss-plateau", Severity.WARNING

    def run(self, ctx: Context) -> Iterable[Finding]:
        cfg = ctx.config
        loss = ctx.series(LOSS)
        x, y = finite(loss.steps, loss.values)
        if len(y) < cfg.plateau_min_points:
            return
        first = float(np.median(y[:3]))
        trend = flat_window(x, y, ctx.horizon, cfg)
        if trend is None:
            return
        if first > 0 and (first - trend.level) / first >= cfg.plateau_converged_drop:
            return
        yield self._finding(ctx, trend, first)

    def _finding(self, ctx: Context, trend: Trend, first: float) -> Finding:
        cfg = ctx.config
        share = 100 * trend.start / ctx.horizon
        left = ctx.steps_left
        if left is None:
            waste = "further steps are mostly wasted"
        elif left > 0:
            waste = f"the remaining {left:,} steps would be mostly wasted"
        else:
            spent = int(ctx.history.last_step - trend.start)
            waste = f"the {spent:,} steps since then were mostly wasted"
        # "a fall" only where the loss fell: a flat start or a rise is told as such
        margin = cfg.plateau_max_gain * trend.level
        if first > trend.level + margin:
            start = f"after a fall from {_fmt(first)}"
        elif first < trend.level - margin:
            start = f"above where it started ({_fmt(first)})"
        else:
            start = f"about where it started ({_fmt(first)})"
        return self.finding(
            ctx,
            f"Training loss has been flat since step {int(trend.start)} ({share:.0f}% of training)",
            f"Since step {int(trend.start)} ({share:.0f}% of training) the training loss stays near "
            f"{_fmt(trend.level)}: a Theil-Sen fit over {trend.points} logs gives a relative "
            f"improvement of {100 * trend.gain:.2g}% per 10% of training (at most "
            f"{100 * trend.gain_bound:.2g}% at {100 * cfg.plateau_confidence:.0f}% "
            f"confidence; threshold {100 * cfg.plateau_max_gain:.2g}%), {start}. "
            f"{_learner(ctx).capitalize()} has stopped learning: {waste}.",
            evidence={
                "since_step": int(trend.start),
                "level": trend.level,
                "first_loss": first,
                "gain_per_10pct": trend.gain,
                "gain_bound_per_10pct": trend.gain_bound,
                "points": trend.points,
            },
        )


CHECKS: tuple[type[Check], ...] = (
    RlRun,
    NonFiniteValues,
    ZeroLoss,
    LossDivergence,
    GradNormSpike,
    Overfit,
    LossPlateau,
)
