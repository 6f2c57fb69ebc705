"""Curve checks: plateau, overfitting, non-finite values, divergence, zero loss, grad-norm spikes.

They read only the metric history (``loss``, ``eval_loss``, ``grad_norm``), so they run the same way
live (through the callback) and offline (replaying a saved ``log_history``). Each keeps a little
state between calls and reads only the points logged since its last call, or runs its statistics on
a schedule, so that a 100,000-entry log costs time linear in its length.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, replace

import numpy as np
from scipy import stats

from lora_doctor.checks.base import Check, Context, Phase
from lora_doctor.facts import RunFacts
from lora_doctor.findings import Finding, Recommendation, Severity
from lora_doctor.memory_estimate import rank_memory_step

__all__ = [
    "CHECKS",
    "GradNormSpike",
    "LossDivergence",
    "LossPlateau",
    "NonFiniteValues",
    "Overfit",
    "RlRun",
    "ZeroLoss",
    "is_rl_key",
]

LOSS, EVAL_LOSS, GRAD_NORM = "loss", "eval_loss", "grad_norm"

#: Keys that only reinforcement-learning and preference trainers log (TRL's GRPO, PPO, DPO, ORPO,
#: KTO, RLOO): rewards, log-probabilities, KL, clipping ratios, completion statistics.
_RL_KEYS = frozenset({"reward", "reward_std", "kl", "frac_reward_zero_std", "odds_ratio_loss"})
_RL_PREFIXES = (
    "rewards/",
    "reward/",
    "logps/",
    "logits/chosen",
    "logits/rejected",
    "completions/",
    "clip_ratio",
    "objective/",
    "policy/",
    "kl/",
)


def is_rl_key(key: str) -> bool:
    """True for a metric only RL or preference trainers log (``eval_`` prefix ignored).

    Example:
        >>> is_rl_key("rewards/chosen"), is_rl_key("eval_kl"), is_rl_key("loss")
        (True, True, False)
    """
    key = key.removeprefix("eval_")
    return key in _RL_KEYS or key.startswith(_RL_PREFIXES)


def _fmt(x: float) -> str:
    return f"{x:.3g}"


def _finite(steps: Sequence[float], values: Sequence[float]) -> tuple[list[float], list[float]]:
    keep = [i for i, v in enumerate(values) if math.isfinite(v)]
    return [steps[i] for i in keep], [values[i] for i in keep]


def _horizon(ctx: Context) -> float:
    """The run's planned length in steps: max_steps, or the steps seen so far when unknown."""
    return float(ctx.facts.max_steps or max(ctx.step, ctx.history.last_step, 1))


class _Cursor:
    """Reads the points of one key that arrived since the last read (incremental checks)."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.seen = 0

    def new(self, ctx: Context) -> tuple[Sequence[float], Sequence[float]]:
        steps, values = ctx.history.points(self.key, self.seen)
        self.seen += len(values)
        return steps, values


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


class RlRun(Check):
    """A reinforcement-learning or preference run: the loss rules are switched off, once said.

    The loss of GRPO, PPO, DPO, ORPO or KTO is not a likelihood to be driven down: GRPO's loss sits
    near 0 by construction (TRL docs, "GRPO Trainer: logged metrics"), DPO's starts at log 2 and its
    signal is in ``rewards/margins``. Detected from the keys those trainers log (``reward``,
    ``rewards/*``, ``logps/*``, ``kl`` ...); sets ``facts.is_rl`` for every other check.
    """

    code, slug, severity = "LD207", "rl-loss-checks-off", Severity.INFO
    phases = frozenset({Phase.SETUP, Phase.LOG, Phase.EVAL})
    batched = True

    def __init__(self) -> None:
        self._keys_seen = 0
        self._rl_keys: list[str] = []
        self._said = False

    def run(self, ctx: Context) -> Iterable[Finding]:
        if self._said:
            return
        if not ctx.facts.is_rl:
            keys = list(ctx.history.keys())
            if len(keys) == self._keys_seen:
                return
            self._keys_seen = len(keys)
            self._rl_keys = [k for k in keys if is_rl_key(k)]
            if not self._rl_keys:
                return
            ctx.facts.is_rl = True
        self._said = True
        named = ", ".join(self._rl_keys[:5]) or f"trainer {ctx.facts.trainer or 'RL'}"
        yield self.finding(
            ctx,
            "Reinforcement-learning or preference run: loss checks are off",
            f"This run logs {named}, the metrics of an RL or preference trainer (GRPO, PPO, DPO, "
            "ORPO, KTO). Their loss is not a likelihood that should fall (GRPO's sits near 0 by "
            "construction), so loss-plateau, overfit, loss-divergence and zero-loss stay quiet; "
            "watch the rewards and the KL instead. Non-finite values and grad-norm spikes are "
            "still reported.",
            evidence={"rl_keys": self._rl_keys[:10]},
        )


class NonFiniteValues(Check):
    """NaN or infinity in the loss, the eval loss or the grad norm.

    A non-finite loss means the weights are (or are about to be) NaN: every later step is wasted.
    A non-finite grad norm under fp16 mixed precision can be a skipped step of the loss scaler, but
    repeated ones mean overflow (PyTorch AMP docs, "Gradient scaling"). Reported once per metric,
    at the first occurrence.
    """

    code, slug, severity = "LD203", "non-finite-values", Severity.ERROR
    phases = frozenset({Phase.LOG, Phase.EVAL, Phase.END})
    batched = True
    _KEYS = (LOSS, EVAL_LOSS, GRAD_NORM)

    def __init__(self) -> None:
        self._cursors = {k: _Cursor(k) for k in self._KEYS}
        self._done: set[str] = set()

    def run(self, ctx: Context) -> Iterable[Finding]:
        for key, cursor in self._cursors.items():
            steps, values = cursor.new(ctx)
            if key in self._done or all(map(math.isfinite, values)):
                continue
            bad = [(s, v) for s, v in zip(steps, values, strict=True) if not math.isfinite(v)]
            if not bad:
                continue
            self._done.add(key)
            step, value = bad[0]
            yield self._finding(ctx, key, int(step), value)

    def _finding(self, ctx: Context, key: str, step: int, value: float) -> Finding:
        is_grad = key == GRAD_NORM
        why = (
            "the gradient overflowed: under fp16 the loss scaler skips such a step, but repeated "
            "overflows mean the update is unstable"
            if is_grad
            else "the weights are or will soon be NaN, and every later step is wasted"
        )
        return self.finding(
            ctx,
            f"{key} is {value} at step {step}",
            f"The logged {key} became {value} at step {step}: {why}. Lower the learning rate "
            "(halve it), keep max_grad_norm=1.0, train in bf16 rather than fp16 where the GPU "
            "supports it, and check the data for empty or extreme examples.",
            evidence={"key": key, "value": str(value), "first_step": step},
            recommendation=Recommendation(
                summary="Lower the learning rate and use bf16 with gradient clipping",
                steps=(
                    "Halve learning_rate in TrainingArguments",
                    "Keep max_grad_norm=1.0 (gradient clipping)",
                    "Use bf16=True instead of fp16=True where the GPU supports it",
                    "Check the training data for empty or extremely long examples",
                ),
                config_changes={"max_grad_norm": 1.0},
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
    batched = True

    def __init__(self) -> None:
        self._loss = _Cursor(LOSS)
        self._grad = _Cursor(GRAD_NORM)
        self._bad_grad_steps: set[float] = set()

    def run(self, ctx: Context) -> Iterable[Finding]:
        gsteps, gvalues = self._grad.new(ctx)
        if not all(map(math.isfinite, gvalues)):
            self._bad_grad_steps.update(
                s for s, v in zip(gsteps, gvalues, strict=True) if not math.isfinite(v)
            )
        before = self._loss.seen
        steps, values = self._loss.new(ctx)
        if ctx.facts.is_rl or 0.0 not in values:
            return
        i = values.index(0.0)
        step = steps[i]
        yield self._finding(
            ctx, int(step), from_start=before + i == 0, hidden_nan=step in self._bad_grad_steps
        )

    def _finding(self, ctx: Context, step: int, from_start: bool, hidden_nan: bool) -> Finding:
        if hidden_nan:
            title = f"Loss logged as exactly 0.0 beside a non-finite grad norm at step {step}"
            cause = (
                "the grad norm of the same log is NaN or infinite, so the real loss was NaN: the "
                "Trainer's logging_nan_inf_filter (on by default) dropped it and logged 0.0"
            )
            rec = Recommendation(
                summary="Treat it as a NaN loss: lower the learning rate, use bf16, clip gradients",
                steps=(
                    "Set logging_nan_inf_filter=False to see the real NaN losses",
                    "Halve learning_rate and keep max_grad_norm=1.0",
                    "Use bf16=True instead of fp16=True where the GPU supports it",
                ),
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


class LossDivergence(Check):
    """The training loss climbed well above its best and stays there.

    Uses a rolling median (robust to single spikes) and asks that the rise last: the median of the
    last ``divergence_window`` points must stay above the best median by ``divergence_rise`` (a
    fraction of the best) and give back at least ``divergence_giveback`` of the drop achieved, for
    ``divergence_window`` consecutive points. A learning rate too high for the LoRA scaling is the
    usual cause (Biderman et al. 2024, "LoRA Learns Less and Forgets Less": LoRA is sensitive to
    the learning rate). The rise must also exceed ``divergence_noise`` times the noise of the loss
    (a robust standard deviation of its successive differences), so a tiny, noisy loss is not
    taken for a divergence.
    """

    code, slug, severity = "LD204", "loss-divergence", Severity.ERROR
    phases = frozenset({Phase.LOG, Phase.END})
    batched = True

    def __init__(self) -> None:
        self._cursor = _Cursor(LOSS)
        self._window: deque[float] = deque()
        self._recent: deque[float] = deque(maxlen=_NOISE_POINTS)
        self._first: float | None = None
        self._best = math.inf
        self._best_step = 0.0
        self._run = 0
        self._done = False

    def run(self, ctx: Context) -> Iterable[Finding]:
        steps, values = self._cursor.new(ctx)
        if ctx.facts.is_rl or self._done or not values:
            return
        cfg = ctx.config
        w = cfg.divergence_window
        window, recent = self._window, self._recent
        for step, value in zip(steps, values, strict=True):
            if not math.isfinite(value):
                continue
            window.append(value)
            recent.append(value)
            if len(window) > w:
                window.popleft()
            if len(window) < w:
                continue
            level = sorted(window)[w // 2]  # the rolling median (w is small)
            if self._first is None:
                self._first = level
            if level <= self._best:
                self._best, self._best_step, self._run = level, step, 0
                continue
            rise = level - self._best
            drop = max(self._first - self._best, 0.0)
            high = (
                rise > cfg.divergence_rise * abs(self._best)
                and rise >= cfg.divergence_giveback * drop
                # rare: only then is the noise level measured
                and rise > cfg.divergence_noise * _noise_sd(np.fromiter(recent, float))
            )
            self._run = self._run + 1 if high else 0
            if self._run >= w:
                self._done = True
                yield self._finding(ctx, int(step), level, drop)
                return

    def _finding(self, ctx: Context, step: int, level: float, drop: float) -> Finding:
        lr = ctx.facts.learning_rate
        lr_text = f" (learning_rate={_fmt(lr)})" if lr else ""
        return self.finding(
            ctx,
            f"Training loss diverged: {_fmt(level)} against a best of {_fmt(self._best)}",
            f"The median training loss of the last {ctx.config.divergence_window} logs is "
            f"{_fmt(level)}, {_fmt(level / self._best if self._best > 0 else math.inf)}x its best "
            f"({_fmt(self._best)} at step {int(self._best_step)}), and has stayed up: the run is "
            f"undoing what it learned. The usual cause is a learning rate too high for the LoRA "
            f"scaling{lr_text}. Roll back to the checkpoint before step {int(self._best_step)} "
            "or restart with half the learning rate and max_grad_norm=1.0.",
            evidence={
                "level": level,
                "best": self._best,
                "best_step": int(self._best_step),
                "initial": self._first,
                "drop_before": drop,
            },
            recommendation=Recommendation(
                summary="Halve the learning rate and restart from the last good checkpoint",
                steps=(
                    "Stop training",
                    f"Resume from the last checkpoint before step {int(self._best_step)}, or "
                    "restart",
                    "Halve learning_rate and keep max_grad_norm=1.0",
                ),
                config_changes={"learning_rate": lr / 2} if lr else {},
            ),
            step=step,
        )


class GradNormSpike(Check):
    """A grad norm far above its recent level.

    Compares each logged grad norm with the median of the previous ``spike_window`` ones (Lightning's
    ``SpikeDetection`` uses the same running-statistic idea on the loss). A spike of
    ``spike_factor`` times the median is a sign of a bad batch or a learning rate at the edge of
    stability; clipping (``max_grad_norm``) limits the damage of a single one.
    """

    code, slug, severity = "LD206", "grad-norm-spike", Severity.WARNING
    phases = frozenset({Phase.LOG, Phase.END})
    batched = True

    def __init__(self) -> None:
        self._cursor = _Cursor(GRAD_NORM)
        self._tail: list[float] = []
        self._count = 0
        self._done = False

    def run(self, ctx: Context) -> Iterable[Finding]:
        cfg = ctx.config
        steps, values = self._cursor.new(ctx)
        if self._done or not values:
            return
        if not all(map(math.isfinite, values)):
            steps, values = _finite(steps, values)
            if not values:
                return
        # no window median is below the smallest value seen: when even that cannot make a spike,
        # skip the medians (the common case, without numpy)
        lowest = min(min(values), min(self._tail, default=math.inf))
        if lowest > 0 and max(values) <= cfg.spike_factor * lowest:
            self._tail = (self._tail + list(values))[-cfg.spike_window :]
            self._count += len(values)
            return
        x, y = np.asarray(steps, dtype=float), np.asarray(values, dtype=float)
        enough = self._count + np.arange(len(y)) >= cfg.spike_min_points
        self._count += len(y)
        # a median (or spike_factor times one) beyond the float limit is infinite: no value can be
        # spike_factor (> 1) times it, so no spike there, which is right
        with np.errstate(invalid="ignore", over="ignore"):
            medians = self._medians_before(y, cfg.spike_window)
            spikes = np.nonzero(enough & (medians > 0) & (y > cfg.spike_factor * medians))[0]
        if len(spikes):
            i = int(spikes[0])
            self._done = True
            yield self._finding(ctx, int(x[i]), float(y[i]), float(medians[i]))

    def _medians_before(self, y: np.ndarray, width: int) -> np.ndarray:
        """For each new point, the median of the (up to) ``width`` points logged before it."""
        prev = len(self._tail)
        joined = np.concatenate([np.asarray(self._tail, dtype=float), y])
        self._tail = joined[-width:].tolist()
        out = np.full(len(y), np.nan)
        for j in range(max(prev, 1), min(width, len(joined))):  # the run's first points only
            out[j - prev] = np.median(joined[:j])
        lo = max(width, prev)
        if len(joined) > lo:
            out[lo - prev :] = np.median(_windows(joined[:-1], width)[lo - width :], axis=1)
        return out

    def _finding(self, ctx: Context, step: int, value: float, median: float) -> Finding:
        cfg = ctx.config
        return self.finding(
            ctx,
            f"Grad norm spiked to {_fmt(value)} at step {step}, {_fmt(value / median)}x its recent median",
            f"The grad norm at step {step} is {_fmt(value)}, {_fmt(value / median)}x the median "
            f"({_fmt(median)}) of the previous {cfg.spike_window} logs (threshold "
            f"{_fmt(cfg.spike_factor)}x). A spike comes from an outlier batch or a learning rate at "
            "the edge of stability; repeated spikes often precede a divergence. Keep "
            "max_grad_norm=1.0, and lower the learning rate or lengthen warmup if they repeat.",
            evidence={"value": value, "median": median, "factor": value / median},
            recommendation=Recommendation(
                summary="Keep gradient clipping on; lower the learning rate if spikes repeat",
                steps=(
                    "Keep max_grad_norm=1.0",
                    "Inspect the batch around this step for outliers",
                    "If spikes repeat, lower learning_rate or set warmup_ratio=0.05",
                ),
            ),
            step=step,
        )


# --- overfit --------------------------------------------------------------------------------------
class Overfit(Check):
    """Training loss still falling while the eval loss has risen from its best.

    The classic sign of memorising the training set (Goodfellow et al., "Deep Learning", 7.8 early
    stopping). Established when the last ``overfit_patience`` evaluations are all above the best by
    ``overfit_min_rise`` (relative) and ``overfit_min_abs_rise`` (absolute: a run whose train and
    eval losses are both tiny and flat is not overfitting), while the training loss since the best
    evaluation is lower than before it. Fixes follow practice for LoRA (DESIGN.md section 3): the
    best checkpoint first, then fewer epochs, then a smaller r, dropout and weight decay.
    """

    code, slug, severity = "LD202", "overfit", Severity.WARNING
    phases = frozenset({Phase.EVAL})

    def __init__(self) -> None:
        self._done: set[str] = set()

    def run(self, ctx: Context) -> Iterable[Finding]:
        if ctx.facts.is_rl:
            return
        # eval_loss, or eval_<name>_loss for each dataset when eval_dataset is a dict
        for key in ctx.history.keys():  # noqa: SIM118 (History has keys(), no __iter__)
            if key.startswith("eval_") and key.endswith("loss") and key not in self._done:
                finding = self._judge(ctx, key)
                if finding is not None:
                    self._done.add(key)
                    yield finding

    def _judge(self, ctx: Context, key: str) -> Finding | None:
        cfg = ctx.config
        esteps, evals = _finite(*ctx.history.points(key))
        if len(evals) < cfg.overfit_patience + 1:
            return None
        best_i = int(np.argmin(evals))
        best = evals[best_i]
        tail = evals[-cfg.overfit_patience :]
        if best_i > len(evals) - 1 - cfg.overfit_patience:
            return None
        threshold = max(best * (1 + cfg.overfit_min_rise), best + cfg.overfit_min_abs_rise)
        if not all(v > threshold for v in tail):
            return None
        best_step = esteps[best_i]
        tsteps, train = ctx.history.points(LOSS)
        cut = bisect.bisect_right(tsteps, best_step)  # steps are logged in order
        after = [v for v in train[cut:] if math.isfinite(v)]
        before = [v for v in train[max(0, cut - max(len(after), 3)) : cut] if math.isfinite(v)]
        if before and after:
            then, now = float(np.median(before)), float(np.median(after))
            if now > then:
                return None  # both rise: that is divergence or noise, not overfitting
        else:
            then = now = math.nan
        return self._finding(ctx, key, esteps, evals, best_i, then, now)

    def dedup_key(self, finding: Finding) -> Hashable:
        return str(finding.evidence.get("key", EVAL_LOSS))

    def _finding(
        self,
        ctx: Context,
        key: str,
        esteps: list[float],
        evals: list[float],
        best_i: int,
        then: float,
        now: float,
    ) -> Finding:
        cfg, facts = ctx.config, ctx.facts
        best, best_step, last = evals[best_i], int(esteps[best_i]), evals[-1]
        since = len(evals) - 1 - best_i
        epoch = _value_at(ctx, "epoch", best_step)
        metric = key.removeprefix("eval_")  # the Trainer adds the prefix back
        steps = [
            "Keep the best checkpoint: load_best_model_at_end=True, "
            f"metric_for_best_model='{metric}', save_strategy equal to eval_strategy, and add "
            f"EarlyStoppingCallback(early_stopping_patience={cfg.overfit_patience})",
        ]
        changes: dict[str, object] = {
            "load_best_model_at_end": True,
            "metric_for_best_model": metric,
        }
        if epoch is not None and epoch > 0:
            epochs = max(1, math.ceil(epoch))
            steps.append(
                f"Train fewer epochs: num_train_epochs={epochs} (the best eval was at epoch {_fmt(epoch)})"
            )
            changes["num_train_epochs"] = epochs
        else:
            steps.append(f"Train fewer steps: stop near step {best_step}")
        ranks = [a.r for a in facts.adapters.values() if a.r] or [
            lf.r for lf in facts.layers if lf.r
        ]
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
        n = facts.train_examples
        small = n is not None and n < cfg.overfit_small_dataset
        if small:
            steps.append(f"With only {n} training examples, add weight_decay=0.01 to 0.1")
            changes["weight_decay"] = 0.05
        train_text = (
            f", while the training loss kept falling ({_fmt(then)} -> {_fmt(now)})"
            if math.isfinite(then)
            else ""
        )
        return self.finding(
            ctx,
            f"{key} rose from {_fmt(best)} (step {best_step}) to {_fmt(last)} over {since} evaluations",
            f"The {key} has been above its best ({_fmt(best)} at step {best_step}) for the last "
            f"{cfg.overfit_patience} evaluations, now {_fmt(last)} (+{_fmt(100 * (last / best - 1) if best > 0 else math.inf)}%)"
            f"{train_text}: the adapter is memorising the training set. Every further step makes "
            "the model worse on new data. Use the checkpoint of the best evaluation.",
            evidence={
                "key": key,
                "best_eval_loss": best,
                "best_step": best_step,
                "eval_loss": last,
                "evals_since_best": since,
                "train_loss_at_best": then,
                "train_loss_now": now,
                "best_epoch": epoch,
                "train_examples": n,
            },
            recommendation=Recommendation(
                summary=f"Use the checkpoint of step {best_step} and stop earlier (early stopping)",
                steps=tuple(steps),
                config_changes=changes,
            ),
        )


def _value_at(ctx: Context, key: str, step: float) -> float | None:
    """The last value of ``key`` logged at or before ``step``."""
    steps, values = ctx.history.points(key)
    i = bisect.bisect_right(steps, step)
    return values[i - 1] if i else None


# --- plateau --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Trend:
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


def _trend(x: np.ndarray, y: np.ndarray, horizon: float, ctx: Context, points: int) -> _Trend:
    """Theil-Sen slope of ``y`` over ``x`` with Sen's confidence interval (from Kendall's tau, as
    in the Mann-Kendall test), turned into the relative loss improvement per 10% of training."""
    slope, _intercept, low, _high = stats.theilslopes(y, x, alpha=ctx.config.plateau_confidence)
    level = max(float(np.median(y[-max(3, len(y) // 5) :])), 1e-12)
    per = 0.1 * horizon / level
    return _Trend(
        start=float(x[0]),
        end=float(x[-1]),
        points=points,
        level=level,
        gain=max(0.0, -float(slope)) * per,
        gain_bound=max(0.0, -float(low)) * per,
    )


#: Findings that explain a flat loss better than underfitting: a zero loss (masked labels or a
#: hidden NaN), a diverged loss that stays high, non-finite values.
_PLATEAU_PRE_EMPTED = ("zero-loss", "loss-divergence", "non-finite-values")


class LossPlateau(Check):
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
    has converged. The statistics run on a geometric schedule (``plateau_look_growth``): each look
    is a chance for noise to pass as a plateau, so there are about ten, whatever the run's length.
    The check stands down once ``zero-loss``, ``loss-divergence`` or ``non-finite-values`` is
    reported: a flat loss there has another cause, and raising r or the learning rate would mislead.
    """

    code, slug, severity = "LD201", "loss-plateau", Severity.WARNING
    phases = frozenset({Phase.LOG, Phase.END})
    batched = True

    def __init__(self) -> None:
        self._next = -math.inf
        self._found = False
        self._cursor = _Cursor(LOSS)
        self._x = np.empty(0)
        self._y = np.empty(0)

    def run(self, ctx: Context) -> Iterable[Finding]:
        if ctx.facts.is_rl or self._found:
            return
        if any(ctx.found(slug) is not None for slug in _PLATEAU_PRE_EMPTED):
            return  # a flat loss there has another cause, and the plateau's advice would mislead
        cfg = ctx.config
        horizon = _horizon(ctx)
        step = float(ctx.history.last_step)
        if step < self._next and ctx.phase is not Phase.END:
            return
        if step < (cfg.plateau_early_fraction + cfg.plateau_min_span) * horizon:
            return
        if ctx.history.count(LOSS) < cfg.plateau_min_points:
            return
        # the next look once the step has grown by plateau_look_growth (a geometric schedule):
        # about ten looks whatever the run's length
        self._next = step * (1 + cfg.plateau_look_growth)
        x, y = self._points(ctx)
        if len(y) < cfg.plateau_min_points:
            return
        first = float(np.median(y[:3]))
        trend = self._flat_window(x, y, horizon, ctx)
        if trend is None:
            return
        if first > 0 and (first - trend.level) / first >= cfg.plateau_converged_drop:
            return
        self._found = True
        yield self._finding(ctx, trend, first, horizon)

    def _points(self, ctx: Context) -> tuple[np.ndarray, np.ndarray]:
        """The finite loss points so far, appended to the check's own arrays since the last look."""
        steps, values = ctx.history.points(LOSS, self._cursor.seen)
        self._cursor.seen += len(values)
        if values:
            x, y = np.asarray(steps, dtype=float), np.asarray(values, dtype=float)
            keep = np.isfinite(y)
            self._x = np.concatenate([self._x, x[keep]])
            self._y = np.concatenate([self._y, y[keep]])
        return self._x, self._y

    def _flat_window(
        self, x: np.ndarray, y: np.ndarray, horizon: float, ctx: Context
    ) -> _Trend | None:
        """The earliest window start (every plateau_start_stride from plateau_early_fraction to
        plateau_latest_start) whose loss is flat. The points are binned once for all starts."""
        cfg = ctx.config
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
                trend = _trend(bx[sel], by[sel], horizon, ctx, points)
                if (
                    trend.gain < cfg.plateau_max_gain
                    and trend.gain_bound < cfg.plateau_max_gain_bound
                ):
                    return replace(trend, level=trend.level * scale)
            start += cfg.plateau_start_stride
        return None

    def _finding(self, ctx: Context, trend: _Trend, first: float, horizon: float) -> Finding:
        share = 100 * trend.start / horizon
        causes = plateau_causes(ctx)
        top = causes[0]
        others = [c.name for c in causes[1:]]
        message = (
            f"Since step {int(trend.start)} ({share:.0f}% of training) the training loss stays near "
            f"{_fmt(trend.level)}: a Theil-Sen fit over {trend.points} logs gives a relative "
            f"improvement of {100 * trend.gain:.2g}% per 10% of training (at most "
            f"{100 * trend.gain_bound:.2g}% at {100 * ctx.config.plateau_confidence:.0f}% "
            f"confidence; threshold {100 * ctx.config.plateau_max_gain:.2g}%), after a fall from "
            f"{_fmt(first)}. The adapter has stopped learning: the remaining steps are mostly "
            f"wasted. Most likely cause: {top.name} ({top.evidence})."
        )
        if others:
            message += " Other causes that would explain the curve: " + "; ".join(others) + "."
        return self.finding(
            ctx,
            f"Training loss has been flat since step {int(trend.start)} ({share:.0f}% of training)",
            message,
            evidence={
                "since_step": int(trend.start),
                "level": trend.level,
                "first_loss": first,
                "gain_per_10pct": trend.gain,
                "gain_bound_per_10pct": trend.gain_bound,
                "points": trend.points,
                "causes": [c.name for c in causes],
            },
            recommendation=top.recommendation,
        )


# --- differential diagnosis -------------------------------------------------------------------------
@dataclass(frozen=True)
class Cause:
    """One candidate explanation of a plateau, with the evidence for it and its fix."""

    name: str
    evidence: str
    recommendation: Recommendation


def _rank_and_alpha(ctx: Context) -> tuple[int | None, float | None, float | None]:
    """The adapter's r, lora_alpha and effective scaling, from the live layers or the config."""
    for lf in ctx.facts.layers:
        if lf.r:
            return lf.r, lf.lora_alpha, lf.scaling or None
    for a in ctx.facts.adapters.values():
        if a.r and a.lora_alpha is not None:
            scale = a.lora_alpha / (math.sqrt(a.r) if a.use_rslora else a.r)
            return a.r, a.lora_alpha, scale
    return None, None, None


def plateau_causes(ctx: Context) -> list[Cause]:
    """The candidate causes of a plateau, most supported by the evidence first.

    Order: adapters that do not learn, a learning rate far below LoRA's usual range, an alpha that
    scales the update down, adapters on attention only, and then the rank (doubled only when no
    ``rank-underused`` finding says the rank is not the limit).

    Example:
        >>> from lora_doctor.checks.base import Context, Phase
        >>> from lora_doctor.config import DoctorConfig
        >>> from lora_doctor.facts import RunFacts
        >>> from lora_doctor.history import History
        >>> ctx = Context(RunFacts(learning_rate=1e-5), History(), DoctorConfig(), Phase.LOG, 0)
        >>> plateau_causes(ctx)[0].name
        'learning rate too low for LoRA'
    """
    cfg, facts = ctx.config, ctx.facts
    causes: list[Cause] = []
    stuck = ctx.found("adapter-not-learning")
    frozen = facts.no_grad_layers or facts.b_still_zero_layers
    if stuck is not None or frozen:
        detail = stuck.title if stuck is not None else f"{len(frozen)} LoRA layers got no update"
        causes.append(
            Cause(
                "adapters not learning",
                detail,
                Recommendation(
                    summary="Make the LoRA parameters train before anything else",
                    steps=(
                        "Check model.print_trainable_parameters() shows the LoRA parameters",
                        "Build the optimizer after get_peft_model (let the Trainer build it)",
                        "Do not freeze the model after wrapping it with peft",
                    ),
                ),
            )
        )
    lr = facts.learning_rate
    if lr is not None and 0 < lr < cfg.plateau_low_lr:
        causes.append(
            Cause(
                "learning rate too low for LoRA",
                f"learning_rate={_fmt(lr)}, below {_fmt(cfg.plateau_low_lr)}; LoRA usually needs "
                "1e-4 to 5e-4, about 10x full fine-tuning",
                Recommendation(
                    summary=f"Raise learning_rate from {_fmt(lr)} to 2e-4",
                    steps=(
                        "Set learning_rate=2e-4 in TrainingArguments (LoRA's usual 1e-4 to 5e-4)",
                        "Restart from the last checkpoint or from scratch; the rank can stay",
                    ),
                    config_changes={"learning_rate": 2e-4},
                ),
            )
        )
    r, alpha, scale = _rank_and_alpha(ctx)
    ratio = ctx.found("alpha-rank-ratio")
    low_scale = scale is not None and scale < cfg.scaling_low * (1 - cfg.scaling_tolerance)
    if (
        ratio is not None and float(ratio.evidence.get("scaling", 0)) < cfg.scaling_low
    ) or low_scale:
        shown = float(ratio.evidence.get("scaling", 0)) if ratio is not None else scale
        target = 2 * r if r else None
        causes.append(
            Cause(
                "alpha scales the update down",
                f"effective scaling {_fmt(shown or 0)} (lora_alpha={_fmt(alpha or 0)}, r={r}), "
                "below alpha = r",
                Recommendation(
                    summary=f"Set lora_alpha={target} (2r) and restart"
                    if target
                    else "Set lora_alpha = 2r and restart",
                    steps=(
                        f"Set lora_alpha={target} in LoraConfig"
                        if target
                        else "Set lora_alpha = 2r",
                        "Restart from scratch (the scaling is part of the trained update)",
                    ),
                    config_changes={"lora_alpha": target} if target else {},
                    restart_from_scratch=True,
                ),
            )
        )
    attn = ctx.found("attention-only-targets")
    if attn is not None:
        causes.append(
            Cause(
                "adapters on attention only",
                attn.title,
                Recommendation(
                    summary="Add the MLP projections to target_modules",
                    steps=(
                        "Set target_modules='all-linear' in LoraConfig (or add gate_proj, up_proj, "
                        "down_proj)",
                        "Restart from scratch: new target modules mean new adapters",
                    ),
                    config_changes={"target_modules": "all-linear"},
                    restart_from_scratch=True,
                ),
            )
        )
    underused = ctx.found("rank-underused")
    if underused is None and facts.has_lora is not False:
        saturated = ctx.found("rank-saturated")
        inconclusive = ctx.found("rank-inconclusive")
        if saturated is not None:
            evidence = saturated.title
        elif inconclusive is not None:
            evidence = f"the spectrum could not tell whether r binds ({inconclusive.title})"
        else:
            evidence = f"no other cause shows in the facts; r={r}" if r else "no other cause shows"
        causes.append(
            Cause(
                f"rank r={r} too small" if r else "rank too small",
                evidence,
                rollback(r, alpha, facts),
            )
        )
    if not causes:
        causes.append(
            Cause(
                "a task that needs more capacity or better data",
                (
                    "the rank is not the limit (rank-underused)"
                    if underused is not None
                    else "no adapter cause is known"
                ),
                Recommendation(
                    summary="Check the data and the learning rate before adding capacity",
                    steps=(
                        "Check a few examples: labels, prompt format, truncation",
                        "Try learning_rate=2e-4 if it is lower",
                    ),
                ),
            )
        )
    return causes


def rollback(r: int | None, alpha: float | None, facts: RunFacts | None = None) -> Recommendation:
    """The rank rollback: stop, reload the base model, double r and alpha, restart from step 0.

    With ``facts``, a step says whether the doubled rank fits in memory (from the run's memory
    estimate; "if memory allows" when the run has none).

    Example:
        >>> rollback(8, 16).config_changes
        {'r': 16, 'lora_alpha': 32}
    """
    changes: dict[str, object] = {}
    if r:
        changes["r"] = 2 * r
        if alpha is not None:
            changes["lora_alpha"] = int(2 * alpha) if float(alpha).is_integer() else 2 * alpha
    target = (
        f"r={2 * r}, lora_alpha={changes.get('lora_alpha', '2x')}"
        if r
        else "r and lora_alpha doubled"
    )
    return Recommendation(
        summary=f"Rank {r} looks too small: restart with {target}"
        if r
        else "Restart with r and lora_alpha doubled",
        steps=(
            "Stop training now",
            "Reload the base model fresh (not the PeftModel you trained)",
            f"Set {target} in LoraConfig",
            *([rank_memory_step(facts, 2 * r)] if facts is not None and r else []),
            "Restart from step 0; never resume a checkpoint with a new rank: adapter shapes are "
            "fixed at initialisation",
        ),
        config_changes=changes,
        restart_from_scratch=True,
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
