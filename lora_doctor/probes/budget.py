"""The doctor's time budget: what it spends of the training's wall time, and how many layers a
spectrum reading may read.

``DoctorConfig.time_budget`` (default 0.005) bounds the doctor's total time, spectrum included, to
that share of the training's measured wall time, at any run length. The callback charges the time
of each of its hooks to the run's :class:`TimeBudget` (the start-up walk of the model, the
first-steps checks, every per-step hook, the spectrum's start-up and readings). Everything but the
spectrum costs about the same per step at any run length; the spectrum is what adapts: the spectrum
probe asks :func:`layers_to_read` before each planned reading, which answers from what the budget
has left.

The spectrum's start-up (the base weights' norms, the device's linear-algebra libraries loaded,
one layer timed) is deferred to the first planned reading the budget can afford: until then the
probe passes a prior for its cost as ``pending`` and a prior per-layer cost in the ledger (see
:class:`lora_doctor.probes.spectrum.SpectrumProbe`), so a run too short for any reading never pays
for it. Its time, once paid past the first steps, is the spectrum's like a reading's, not a
per-step cost (:meth:`TimeBudget.spectrum`).

Under ZeRO-3 and FSDP a reading gathers parameters, a collective call: every rank must take the
same decision at the same step. A single process decides from its own clock
(:meth:`TimeBudget.ledger`); several processes decide from the numbers exchanged at the latest log
(:meth:`Ledger.from_spread`: the slowest rank's spending against the shortest wall time), which
every rank holds alike, projected to the step of the decision.

The 0.5% default is the project's cost target (BENCHMARKS.md), below what general training
debuggers report of themselves (TrainCheck: median 1.05x; AutoTrainer: about 1%). This module
imports no torch.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from lora_doctor.facts import OverheadFacts
from lora_doctor.probes.dist import RankReadings, RankSpread

__all__ = [
    "Ledger",
    "TimeBudget",
    "charge_hook",
    "layers_to_read",
    "now",
]

Clock = Callable[[], float]

#: Keys of the budget's numbers in the per-rank readings exchanged at each log.
_KEYS = ("step", "wall", "spent", "step_seconds", "per_step", "layer_seconds")


def now() -> float:
    """The clock the budget reads by default: ``time.perf_counter()``, in seconds."""
    return time.perf_counter()


@dataclass(frozen=True)
class Ledger:
    """The numbers a reading's decision rests on, as they stood at one optimizer step.

    Attributes:
        step: the optimizer step they were taken at.
        wall: the training's wall time so far, in seconds.
        spent: the doctor's time so far, in seconds.
        step_seconds: the training's wall time per optimizer step; None before the first step.
        per_step: the doctor's time per step outside its one-time work (start-up, first-steps
            checks) and the spectrum's (its start-up and readings), in seconds.
        layer_seconds: what reading one layer's spectrum costs, in seconds; None before it was
            measured.
    """

    step: int
    wall: float
    spent: float
    step_seconds: float | None = None
    per_step: float = 0.0
    layer_seconds: float | None = None

    @classmethod
    def from_spread(cls, spread: Mapping[str, RankSpread]) -> Ledger | None:
        """The ledger every rank holds alike after an exchange: the largest spending, per-step and
        per-layer cost, and the shortest wall time and step time over the ranks; None before the
        first exchange.

        Example:
            >>> from lora_doctor.probes.dist import RankSpread
            >>> spread = {"budget_step": RankSpread(10, 10), "budget_wall": RankSpread(5.0, 6.0),
            ...           "budget_spent": RankSpread(0.01, 0.02)}
            >>> Ledger.from_spread(spread).spent
            0.02
        """
        got = {key: spread.get(f"budget_{key}") for key in _KEYS}
        step, wall, spent = got["step"], got["wall"], got["spent"]
        if step is None or wall is None or spent is None:
            return None
        step_seconds, per_step, layer = got["step_seconds"], got["per_step"], got["layer_seconds"]
        return cls(
            step=int(step.min),
            wall=wall.min,
            spent=spent.max,
            step_seconds=step_seconds.min if step_seconds is not None else None,
            per_step=per_step.max if per_step is not None else 0.0,
            layer_seconds=layer.max if layer is not None else None,
        )


def layers_to_read(
    ledger: Ledger,
    *,
    share: float | None,
    step: int,
    max_steps: int,
    total: int,
    minimum: int,
    final: bool,
    pending: float = 0.0,
) -> int:
    """How many of ``total`` layers a spectrum reading at ``step`` may read; 0 skips it.

    The ledger is projected to ``step`` (its step time and per-step cost carry it forward, and
    ``pending`` adds the estimated cost of readings decided since it was taken). A reading may
    spend what the budget has left now, ``share * wall - spent``, so that the doctor's total never
    runs ahead of its share of the time so far. A periodic reading (not ``final``) must also leave
    room for a full final reading at ``max_steps``: the projected budget at the end, less the
    per-step cost until then, less the final reading's. The reading reads the layers that fit,
    at most ``total``, and none when fewer than ``min(total, minimum)`` fit. Without a limit
    (``share`` None) it reads every layer; without a per-layer cost, none (the spectrum probe
    puts a prior in the ledger until it has measured one, and the prior cost of its deferred
    start-up in ``pending``: the start-up happens only when it and at least ``minimum`` layers
    fit).

    Args:
        ledger: the numbers to decide from.
        share: the share of the wall time the doctor may spend (``DoctorConfig.time_budget``).
        step: the optimizer step of the reading.
        max_steps: the run's planned steps (0 when unknown: no projection to the end).
        total: the LoRA layers there are.
        minimum: the fewest layers worth a reading (``DoctorConfig.spectrum_min_layers``).
        final: True for the reading at the end of training.
        pending: seconds of readings decided since the ledger was taken, and of a start-up to
            pay before this reading.

    Returns:
        The number of layers to read, in ``[0, total]``.

    Example:
        >>> ledger = Ledger(100, wall=10.0, spent=0.0105, step_seconds=0.1, layer_seconds=0.001)
        >>> layers_to_read(
        ...     ledger, share=0.005, step=100, max_steps=100, total=112, minimum=16, final=True
        ... )
        39
    """
    if share is None:
        return total
    cost = ledger.layer_seconds
    if total <= 0 or cost is None:
        return 0
    if cost <= 0:
        return total
    ahead = max(0, step - ledger.step)
    pace = ledger.step_seconds or 0.0
    wall = ledger.wall + ahead * pace
    spent = ledger.spent + ahead * ledger.per_step + pending
    room = share * wall - spent
    if not final and max_steps > step and ledger.step_seconds:
        left = max_steps - step
        at_end = share * (wall + left * pace) - (spent + left * ledger.per_step) - total * cost
        room = min(room, at_end)
    fits = min(total, math.floor(room / cost)) if room > 0 else 0
    return fits if fits >= min(total, minimum) else 0


class TimeBudget:
    """One run's account of the doctor's time against the training's wall time.

    The callback creates it when training begins and charges each of its hooks to it
    (:meth:`charge`); the spectrum probe records its own part (:meth:`spectrum`), and the probes
    leave out the time they wait for the training's queued device work before a reading
    (:meth:`wait`, through :func:`lora_doctor.probes.device.drain`). The running
    totals are the run's :class:`~lora_doctor.facts.OverheadFacts` (:attr:`facts`), which the
    diagnosis carries.

    Args:
        share: the share of the wall time the doctor may spend; None for no limit.
        start_step: the optimizer step training starts from (a resumed run's checkpoint step).
        first_steps: the step up to which the doctor's work counts as one-time (its first-steps
            checks), not as a per-step cost to project forward.
        clock: seconds from an arbitrary origin; :func:`now` when None.

    Example:
        >>> ticks = iter([0.0, 1.0, 2.0])
        >>> budget = TimeBudget(0.005, clock=lambda: next(ticks))
        >>> budget.charge(budget.clock(), step=3)
        >>> budget.facts.doctor_seconds, budget.facts.wall_seconds
        (1.0, 2.0)
    """

    def __init__(
        self,
        share: float | None,
        *,
        start_step: int = 0,
        first_steps: int = 0,
        clock: Clock | None = None,
    ) -> None:
        self.share = share
        self.clock: Clock = clock if clock is not None else now
        self.start = self.clock()
        self.start_step = start_step
        self.facts = OverheadFacts(time_budget=share)
        self._one_time_until = max(start_step, first_steps)
        self._one_time = 0.0
        self._spectrum = 0.0

    def _add(self, seconds: float, step: int) -> None:
        self.facts.doctor_seconds += seconds
        if step <= self._one_time_until:
            self._one_time += seconds

    def charge(self, since: float, step: int) -> None:
        """Adds the time from ``since`` (a reading of :attr:`clock`) to now to the doctor's, spent
        at optimizer step ``step``."""
        t = self.clock()
        self._add(t - since, step)
        self.facts.wall_seconds = t - self.start

    def exclude(self, seconds: float, step: int) -> None:
        """Takes back ``seconds`` of a hook's time at ``step`` that were the training's: waiting
        for its queued device work before a reading (the hook's charge, added when it returns,
        holds them)."""
        self._add(-seconds, step)
        self.facts.waited_seconds += seconds

    def wait(self, sync: Callable[[], object], step: int) -> float:
        """Runs ``sync``, which waits for the training's queued device work, and leaves the time
        it took out of the doctor's (:meth:`exclude`); returns that time."""
        t0 = self.clock()
        sync()
        waited = self.clock() - t0
        self.exclude(waited, step)
        return waited

    def spectrum(self, seconds: float, step: int, layers: int = 0) -> None:
        """Records the spectrum probe's part of a hook's time: its start-up (``layers`` 0) or a
        reading of ``layers`` layers, whose cost per layer the next decisions use. Past the first
        steps either is left out of the per-step cost (the start-up is deferred to the first
        reading the budget affords, at any step)."""
        self.facts.spectrum_seconds += seconds
        if layers > 0:
            self.facts.spectrum_layer_seconds = seconds / layers
        if step > self._one_time_until:
            self._spectrum += seconds

    def ledger(self, step: int) -> Ledger:
        """This process's numbers now, at optimizer step ``step``."""
        wall = self.clock() - self.start
        steps = step - self.start_step
        f = self.facts
        counted = step - self._one_time_until
        steady = f.doctor_seconds - self._one_time - self._spectrum
        return Ledger(
            step=step,
            wall=wall,
            spent=f.doctor_seconds,
            step_seconds=wall / steps if steps > 0 else None,
            per_step=max(0.0, steady) / counted if counted > 0 else 0.0,
            layer_seconds=f.spectrum_layer_seconds,
        )

    def put(self, ranks: RankReadings, step: int) -> None:
        """Puts this process's numbers into the per-rank readings, for the exchange at a log."""
        ledger = self.ledger(step)
        for key in _KEYS:
            value = getattr(ledger, key)
            if value is not None:
                ranks.put(f"budget_{key}", value)


def charge_hook(budget: TimeBudget | None, since: float | None, step: int, *, began: bool) -> None:
    """Charges a guarded hook's time to ``budget``, the run's budget as the hook returns: from
    ``since`` (the budget's clock as the hook was entered, None when there was no budget then),
    or, for the hook that made the budget (``began``: the start of training), from the budget's
    start. Nothing without a budget or a start. The Trainer callback's and the loop doctor's
    hook guards both call it."""
    if budget is None:
        return
    start = budget.start if began else since
    if start is not None:
        budget.charge(start, step)
