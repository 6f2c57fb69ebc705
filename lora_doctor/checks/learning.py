"""Checks that nothing is being learned: a loss that sits at chance, weights that never change.

Both are errors of the set-up, not of capacity, so neither ever points at the rank (DESIGN.md
section 3, "Not learning at all"): a loss at ln(vocabulary size) is a uniform guess, and losses
that repeat exactly from one epoch to the next mean the weights never changed. Both explain a flat
loss, so the diagnosis pass stands ``loss-plateau`` down for them; they start judging at the same
look as the plateau (:func:`~lora_doctor.checks.curves.past_early_phase`) or earlier, so that the
plateau is never reported first.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from lora_doctor.checks.base import Check, Context, Phase, Read, Reads, finite
from lora_doctor.checks.curves import PlateauLooks, flat_window
from lora_doctor.config import DoctorConfig
from lora_doctor.findings import Finding, Recommendation, Severity

__all__ = [
    "CHECKS",
    "LossAtChance",
    "Repeat",
    "RepeatState",
    "Stuck",
    "WeightsNotUpdating",
    "repeat_scan",
    "steps_per_epoch",
    "stuck_loss",
]

LOSS, GRAD_NORM, LEARNING_RATE, EPOCH = "loss", "grad_norm", "learning_rate", "epoch"

#: The Trainer logs the loss rounded to 4 decimals: equal losses are compared at that resolution.
DECIMALS = 4
#: Repeated losses count only when they spread over 100 times that resolution, so that a tiny,
#: nearly constant loss does not repeat by chance.
_MIN_SPREAD = 100 * 10.0**-DECIMALS


def _fmt(x: float) -> str:
    return f"{x:.3g}"


# --- loss at chance -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Stuck:
    """A loss-at-chance verdict.

    Attributes:
        level: the loss it sits at (the median of the recent logs, or the flat window's level).
        since: the step the judged window starts at.
        first: the median of the first three logged losses.
        chance: ln(vocabulary size) when the verdict is "at chance"; None when it is "never fell
            from its first value" (the vocabulary unknown, or the loss not near chance).
    """

    level: float
    since: int
    first: float
    chance: float | None


def stuck_loss(
    x: np.ndarray, y: np.ndarray, horizon: float, chance: float | None, cfg: DoctorConfig
) -> Stuck | None:
    """Whether the finite loss ``y`` at steps ``x`` sits at chance, or never fell.

    At chance: the median of the losses of the last ``plateau_min_span`` of training (after its
    first ``plateau_early_fraction``) lies between ``(1 - chance_tolerance) * chance`` and
    ``chance_max * chance``, and is not ``stuck_min_drop`` below the median of the span before it
    (a loss that starts above chance and falls through it is learning). Never fell: the loss is
    flat by the plateau rule
    (:func:`~lora_doctor.checks.curves.flat_window`) at a level less than ``stuck_min_drop`` below
    its first value.

    Args:
        x, y: steps and finite losses, in log order.
        horizon: the run's planned length in steps.
        chance: ln(vocabulary size), or None when the vocabulary is unknown.
        cfg: the thresholds.

    Example:
        >>> x = np.arange(1.0, 101.0)
        >>> stuck_loss(x, np.full(100, 4.8), 100.0, math.log(128), DoctorConfig()).chance
        4.852030263919617
        >>> stuck_loss(x, np.full(100, 2.0), 100.0, None, DoctorConfig()).level
        2.0
    """
    first = float(np.median(y[:3]))
    if chance is not None and chance > 0:
        span = cfg.plateau_min_span * horizon
        start = max(cfg.plateau_early_fraction * horizon, float(x[-1]) - span)
        recent, before = y[x >= start], y[(x >= start - span) & (x < start)]
        level = float(np.median(recent)) if len(recent) else math.nan
        falling = len(before) > 0 and level < (1 - cfg.stuck_min_drop) * float(np.median(before))
        if (1 - cfg.chance_tolerance) * chance <= level <= cfg.chance_max * chance and not falling:
            return Stuck(level, int(start), first, chance)
    trend = flat_window(x, y, horizon, cfg)
    if trend is not None and first > 0 and first - trend.level < cfg.stuck_min_drop * first:
        return Stuck(trend.level, int(trend.start), first, None)
    return None


class LossAtChance(PlateauLooks):
    """The training loss sits at chance after the early phase, or never fell from its first value.

    A model that predicts a uniform distribution over its vocabulary has a cross-entropy of
    ln(vocabulary size) (``setup.loss_at_chance``): a loss that sits there has learned nothing,
    whatever its rank. Measured on the fault benchmark's tiny models (vocabulary 128): a healthy
    run starts near chance (1.03 ln V) and is below 0.8 ln V by 10% of training; a model whose
    adapter cannot learn (learning rate 2e-5) stays at 1.00 to 1.06 ln V; a trained model
    destroyed by a learning rate of 0.3 to 1.0 jumps to 1.25 ln V and sits at 0.95 to 1.1 ln V; a
    random base at the usual initialisation that LoRA barely adapts sits at 0.84 ln V by 20% of
    training. Hence ``chance_tolerance`` 0.05 below ln V, and up to ``chance_max`` (1.5) ln V
    above it (a real run reported a loss that jumped 7x to ln V within its first five logs). A
    base fine-tuned on data it gets wrong starts above chance (1.6 ln V) and falls through it
    while learning, so the loss must also not be falling: its recent median no more than
    ``stuck_min_drop`` below that of the span before. A
    loss that started far below chance and rose to it is an error of a destroyed model; one that
    started there and never fell, of a set-up that does not train. Away from chance, or without the
    vocabulary (offline), the rule is the plateau's on a loss that never fell: flat, less than
    ``stuck_min_drop`` below its first value (a warning: a model that already fits its data also
    stays where it started; an alpha far below r, whose update is scaled almost to nothing, too).
    Judged at the plateau's looks, from the same moment, so that the plateau is never reported
    first; the diagnosis pass stands the plateau down for it.
    """

    code, slug, severity = "LD208", "loss-at-chance", Severity.ERROR

    def run(self, ctx: Context) -> Iterable[Finding]:
        loss = ctx.series(LOSS)
        x, y = finite(loss.steps, loss.values)
        if len(y) < ctx.config.plateau_min_points:
            return
        verdict = stuck_loss(x, y, ctx.horizon, ctx.facts.setup.loss_at_chance, ctx.config)
        if verdict is not None:
            yield self._finding(ctx, verdict)

    def _finding(self, ctx: Context, v: Stuck) -> Finding:
        cfg, setup = ctx.config, ctx.facts.setup
        evidence: dict[str, object] = {
            "level": v.level,
            "since_step": v.since,
            "first_loss": v.first,
            "loss_at_chance": v.chance,
            "vocab_size": setup.vocab_size,
        }
        stop = Recommendation(
            summary="Stop training: at this set-up the steps learn nothing",
            steps=("Stop training: further steps at this set-up learn nothing",),
        )
        if v.chance is None:
            drop = (v.first - v.level) / v.first
            return self.finding(
                ctx,
                f"Training loss has not fallen from its first value ({_fmt(v.first)})",
                f"Since step {v.since} the training loss stays near {_fmt(v.level)}, "
                f"{abs(100 * drop):.2g}% {'below' if drop >= 0 else 'above'} its first logged "
                f"value ({_fmt(v.first)}; a fall under "
                f"{100 * cfg.stuck_min_drop:.0f}% counts as none), and is flat: nothing has been "
                "learned. A slow adapter still lowers the loss early; one that learns nothing "
                "points at the set-up: what trains, the learning rate, the data.",
                evidence=evidence,
                recommendation=stop,
                severity=Severity.WARNING,
            )
        ratio = v.level / v.chance
        damaged = v.first < (1 - cfg.chance_tolerance) * v.chance
        history = (
            f"It started at {_fmt(v.first)}, far below chance, and rose to it: the updates "
            "destroyed what the model knew"
            if damaged
            else f"It started at {_fmt(v.first)} and has not fallen below chance: nothing is "
            "being learned"
        )
        return self.finding(
            ctx,
            f"Training loss sits at chance: {_fmt(v.level)}, ln({setup.vocab_size}) = "
            f"{_fmt(v.chance)}",
            f"Since step {v.since} the training loss stays near {_fmt(v.level)}, {ratio:.2f}x "
            f"ln({setup.vocab_size}) = {_fmt(v.chance)}, the loss of a uniform guess over the "
            f"vocabulary (threshold {1 - cfg.chance_tolerance:.2f}x): the model predicts no better "
            f"than chance. {history}.",
            evidence={**evidence, "damaged": damaged},
            recommendation=stop,
        )


# --- weights not updating -----------------------------------------------------------------------
def steps_per_epoch(step: float, epoch: float) -> int | None:
    """The optimizer steps of one epoch, from a log's ``step`` and fractional ``epoch`` (the
    Trainer logs ``epoch = steps done / steps per epoch``); None before a whole epoch is done.

    Example:
        >>> steps_per_epoch(16, 2.0), steps_per_epoch(4, 0.5)
        (8, None)
    """
    if not (math.isfinite(step) and math.isfinite(epoch)) or epoch < 1:
        return None
    period = round(step / epoch)
    return period if period >= 1 else None


@dataclass
class RepeatState:
    """What the weights-not-updating check carries between looks: the current run of losses that
    repeat the log one epoch earlier (its length, first step, lowest and highest value), and the
    counts of grad norms and learning rates logged, and of those exactly 0."""

    streak: int = 0
    since: float = 0.0
    low: float = math.inf
    high: float = -math.inf
    grads: int = 0
    zero_grads: int = 0
    rates: int = 0
    zero_rates: int = 0


@dataclass(frozen=True)
class Repeat:
    """Losses that repeat exactly one epoch later: how many in a row, from which step to which,
    the epoch's length in steps, and one example (step, value)."""

    logs: int
    since: int
    until: int
    period: int
    example: tuple[int, float]


def repeat_scan(
    state: RepeatState,
    steps: Sequence[float],
    values: Sequence[float],
    logged: tuple[Sequence[float], Sequence[float]],
    period: int,
    cfg: DoctorConfig,
) -> Repeat | None:
    """Feeds new losses to ``state`` (updated in place) and returns a verdict once
    ``repeat_min_logs`` of them in a row equal, to :data:`DECIMALS` decimals, the loss logged
    ``period`` steps (one epoch) earlier, spreading over at least 0.01.

    Args:
        state: the run of repeats so far.
        steps, values: the new losses.
        logged: every logged loss so far (steps in log order, values), to look one epoch back.
        period: the steps of one epoch (:func:`steps_per_epoch`).
        cfg: the thresholds (``repeat_min_logs``).

    Example:
        >>> epoch = [1.2, 0.9, 1.4, 1.1]
        >>> loss = epoch * 3
        >>> steps = list(range(1, 13))
        >>> repeat_scan(RepeatState(), steps, loss, (steps, loss), 4, DoctorConfig()).since
        5
    """
    logged_steps, logged_values = logged
    for step, value in zip(steps, values, strict=True):
        i = bisect.bisect_left(logged_steps, step - period)
        same = (
            math.isfinite(value)
            and i < len(logged_steps)
            and logged_steps[i] == step - period
            and round(logged_values[i], DECIMALS) == round(value, DECIMALS)
        )
        if not same:
            state.streak, state.low, state.high = 0, math.inf, -math.inf
            continue
        if state.streak == 0:
            state.since = step
        state.streak += 1
        state.low, state.high = min(state.low, value), max(state.high, value)
        if state.streak >= cfg.repeat_min_logs and state.high - state.low >= _MIN_SPREAD:
            return Repeat(state.streak, int(state.since), int(step), period, (int(step), value))
    return None


def _fell(loss: np.ndarray, cfg: DoctorConfig) -> bool:
    """True when the median of the last three finite losses is ``stuck_min_drop`` below that of
    the first three: weights that move."""
    y = loss[np.isfinite(loss)]
    if len(y) < 2:
        return False
    first, last = float(np.median(y[:3])), float(np.median(y[-3:]))
    return first > 0 and first - last >= cfg.stuck_min_drop * first


class WeightsNotUpdating(Check):
    """Evidence that no update reaches the weights.

    Any one of:

    - **Losses that repeat exactly from one epoch to the next**: ``repeat_min_logs`` logged losses
      in a row equal, to the 4 decimals the Trainer logs, the loss logged one epoch earlier (the
      ``epoch`` key gives the epoch's length), while they vary by at least 0.01. The same batches
      in the same order give the same losses again only through weights that never changed (a
      reported run repeated 8 per-step losses to four decimals over 18 epochs).
    - **A learning rate of exactly 0** at every one of ``not_updating_min_logs`` or more logs: the
      optimizer's steps are zero (AdamW's decoupled weight decay too).
    - **A grad norm of exactly 0** (with a positive loss) on at least half of the logs, and at
      least ``not_updating_min_logs``: no gradient reaches the trainable weights. Not in RL runs,
      where a group whose completions all got the same reward has zero gradient by design.
    - **The adapter probe**: after the first steps no active LoRA layer changed at all although
      their gradients arrived, and nothing else in the model trains: the optimizer does not apply
      them. Layers that got no gradient, or a run where something else trains, are
      ``adapter-not-learning``'s (a gradient of zero is also what fully masked labels give, which
      ``zero-loss`` reports).

    The learning-rate and grad-norm evidence also asks that the loss has not fallen (weights that
    move lower it), so that a first param group held at 0 on purpose, or a grad norm logged as 0
    by some integration, is no false alarm. An error: every step of such a run is wasted. The
    causes to check are what trains, what the optimizer holds, the learning rate and input
    gradients under checkpointing (the diagnosis pass ranks them), never the rank.
    """

    code, slug, severity = "LD209", "weights-not-updating", Severity.ERROR
    phases = frozenset({Phase.FIRST_STEPS, Phase.LOG, Phase.END})
    reads = (
        Reads(LOSS),
        Reads(GRAD_NORM),
        Reads(LEARNING_RATE),
        Reads(EPOCH, Read.LATEST),
    )
    State = RepeatState

    def run(self, ctx: Context) -> Iterable[Finding]:
        found = self._frozen(ctx) if ctx.phase is Phase.FIRST_STEPS else None
        found = found or self._repeats(ctx)
        found = found or self._zero_rates(ctx)
        found = found or self._zero_grads(ctx)
        if found is not None:
            yield found

    def _frozen(self, ctx: Context) -> Finding | None:
        facts = ctx.facts
        active = sum(1 for lf in facts.layers if lf.active)
        frozen = len(set(facts.frozen_in_place) - set(facts.no_grad_layers))
        if not active or frozen < active or facts.trainable_params > facts.trainable_lora_params:
            return None
        steps = ctx.config.check_after_steps
        return self._finding(
            ctx,
            f"No update reaches the weights: none of the {active} LoRA layers changed in "
            f"{steps} steps",
            f"After {steps} optimizer steps at a positive learning rate, none of the {active} "
            "active LoRA layers changed at all although their gradients arrived, and no other "
            "parameter of the model trains",
            {"evidence": "frozen_layers", "frozen_layers": frozen, "after_steps": steps},
        )

    def _repeats(self, ctx: Context) -> Finding | None:
        epoch = ctx.points(EPOCH)
        if not len(epoch):
            return None
        period = steps_per_epoch(epoch.new_steps[-1], epoch.new_values[-1])
        loss = ctx.points(LOSS)
        if period is None or not len(loss):
            return None
        found = repeat_scan(
            ctx.state,
            loss.new_steps,
            loss.new_values,
            ctx.history.points(LOSS),
            period,
            ctx.config,
        )
        if found is None:
            return None
        step, value = found.example
        return self._finding(
            ctx,
            "Losses repeat exactly from one epoch to the next: the weights never change",
            f"The {found.logs} losses logged from step {found.since} to step {found.until} each "
            f"equal, to {DECIMALS} decimals, the loss logged one epoch ({period} steps) earlier "
            f"(step {step - period} and step {step}: {value:.{DECIMALS}f}). The same batches give "
            "the same losses again only when the weights never changed",
            {"evidence": "repeats", "repeated_logs": found.logs, "steps_per_epoch": period},
            step=found.until,
        )

    def _zero_rates(self, ctx: Context) -> Finding | None:
        state, rates = ctx.state, ctx.points(LEARNING_RATE).new_values
        state.rates += len(rates)
        state.zero_rates += sum(1 for r in rates if r == 0)
        n = state.rates
        if n < ctx.config.not_updating_min_logs or state.zero_rates < n or self._fell(ctx):
            return None
        return self._finding(
            ctx,
            f"The learning rate is 0 at every one of the {n} logs: no update reaches the weights",
            f"The logged learning_rate is exactly 0 at all {n} logs so far, and the loss has not "
            "fallen: every optimizer step is a step of size 0",
            {"evidence": "zero_learning_rate", "logs": n},
        )

    def _zero_grads(self, ctx: Context) -> Finding | None:
        if ctx.facts.is_rl:
            return None
        state, grad, loss = ctx.state, ctx.points(GRAD_NORM), ctx.points(LOSS)
        positive = {s for s, v in zip(loss.new_steps, loss.new_values, strict=True) if v > 0}
        state.grads += len(grad)
        state.zero_grads += sum(
            1
            for s, v in zip(grad.new_steps, grad.new_values, strict=True)
            if v == 0 and s in positive
        )
        zero, n = state.zero_grads, state.grads
        if zero < max(ctx.config.not_updating_min_logs, n / 2) or self._fell(ctx):
            return None
        return self._finding(
            ctx,
            f"The grad norm is exactly 0 on {zero} of {n} logs: no update reaches the weights",
            f"The logged grad_norm is exactly 0 on {zero} of the {n} logs so far, beside a "
            "positive loss that has not fallen: no gradient reaches the trainable weights, so "
            "the optimizer has nothing to apply",
            {"evidence": "zero_grad_norm", "zero_logs": zero, "logs": n},
        )

    @staticmethod
    def _fell(ctx: Context) -> bool:
        return _fell(ctx.series(LOSS).values, ctx.config)

    def _finding(
        self,
        ctx: Context,
        title: str,
        observed: str,
        evidence: dict[str, object],
        step: int | None = None,
    ) -> Finding:
        return self.finding(
            ctx,
            title,
            f"{observed}. The run trains nothing: every further step is wasted until the cause is "
            "removed.",
            evidence=evidence,
            recommendation=Recommendation(
                summary="Stop training: no update reaches the weights",
                steps=("Stop training: the steps so far changed nothing",),
                restart_from_scratch=True,
            ),
            step=step,
        )


CHECKS: tuple[type[Check], ...] = (LossAtChance, WeightsNotUpdating)
