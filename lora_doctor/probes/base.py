"""The probe protocol: one object per kind of reading, called at each Trainer event it cares for.

This module imports no torch: the model is read in :mod:`lora_doctor.probes.view`, once per event
that asks (:meth:`Event.model_view`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lora_doctor.engine import Doctor
    from lora_doctor.probes.budget import TimeBudget
    from lora_doctor.probes.dist import RankReadings
    from lora_doctor.probes.view import ModelView

__all__ = ["Event", "Probe", "call_probes"]

logger = logging.getLogger("lora_doctor")


@dataclass
class Event:
    """What a Trainer event offers, as the callback received it.

    Attributes:
        doctor: the run's engine (facts, history, findings).
        args: the ``TrainingArguments``.
        state: the ``TrainerState`` (``global_step``, ``max_steps``, ``is_world_process_zero`` ...).
        model: the model being trained (possibly wrapped by DDP, FSDP or DeepSpeed).
        optimizer: the optimizer, when the Trainer has made it.
        logs: the logs dict of ``on_log`` (a probe may add ``lora_doctor/...`` metrics to it) or the
            metrics of ``on_evaluate``.
        kwargs: everything else the event passed (train_dataloader, processing_class ...).
        control: the ``TrainerControl`` at ``step_end`` (``control.should_log`` tells a probe that
            the Trainer logs after this step), None elsewhere.
        ranks: this process's per-rank readings; a probe ``put``s readings into it at any time and
            reads their min/max over ranks from ``ranks.spread`` in its ``log`` hook (the callback
            exchanges them on every rank just before the Trainer logs; probes never communicate).
        view: the shared view of ``model`` once a probe asked for it (:meth:`model_view`).
        budget: the run's time budget (:mod:`lora_doctor.probes.budget`): the spectrum probe
            asks it how much to read; a probe leaves out of it the time it waits for the
            training's queued device work (:func:`lora_doctor.probes.device.drain`). None: no
            account is kept, and every planned spectrum reading is read in full.
    """

    doctor: Doctor
    args: Any
    state: Any
    model: Any = None
    optimizer: Any = None
    logs: dict[str, Any] | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    ranks: RankReadings | None = None
    control: Any = None
    view: ModelView | None = None
    budget: TimeBudget | None = None

    @property
    def step(self) -> int:
        return int(getattr(self.state, "global_step", 0) or 0)

    @property
    def is_main(self) -> bool:
        return bool(getattr(self.state, "is_world_process_zero", True))

    def model_view(self) -> ModelView:
        """The view of ``model`` and ``optimizer`` that the probes share: built by the first probe
        that asks (one walk of the model), then the same object for every probe of this event.

        The callback hands one event to all probes at ``train_begin``, where the probes read the
        model; they keep what they need from it, so no later event walks the model again.
        """
        if self.view is None:
            from lora_doctor.probes.view import ModelView

            self.view = ModelView.build(self.model, self.optimizer)
        return self.view


class Probe:
    """Base class of live probes: every hook is a no-op; a probe overrides those it needs.

    Hooks must be cheap on the per-step path (``pre_optimizer_step``, ``step_end``): read allocator
    counters or flags, never walk the model or synchronize the device there except during the
    first ``check_after_steps`` steps. The callback guards every call: a probe that raises is
    logged once and switched off, and training goes on.
    """

    name: str = "probe"

    def train_begin(self, event: Event) -> None:
        """Training starts: the model, the optimizer and the arguments are there."""

    def pre_optimizer_step(self, event: Event) -> None:
        """Gradients exist and are about to be applied."""

    def step_end(self, event: Event) -> None:
        """An optimizer step has ended (``event.step`` is the new global step)."""

    def log(self, event: Event) -> None:
        """The Trainer logs ``event.logs``; a probe may add its ``lora_doctor/...`` metrics."""

    def evaluate(self, event: Event) -> None:
        """An evaluation has ended with metrics ``event.logs``."""

    def save(self, event: Event) -> None:
        """The Trainer has saved a checkpoint (and removed those past ``save_total_limit``)."""

    def train_end(self, event: Event) -> None:
        """Training has ended (normally or not)."""

    def train_failed(self, event: Event, error: BaseException) -> None:
        """``trainer.train`` is dying of ``error`` (e.g. CUDA out of memory); a probe may record a
        finding with ``event.doctor.add_finding`` before the diagnosis is written. ``event.model``
        and ``event.optimizer`` are the Trainer's; the error propagates after the hooks."""


def call_probes(probes: list[Probe], hook: str, event: Event, *args: Any) -> None:
    """Calls ``hook`` on every probe of ``probes``, in order; a probe that raises is logged once
    and removed from ``probes`` (switched off for the rest of the run), and the others go on."""
    for probe in list(probes):
        try:
            getattr(probe, hook)(event, *args)
        except Exception:
            probes.remove(probe)
            logger.warning(
                "lora-doctor: internal error in the %s probe (%s); it is switched off for the "
                "rest of the run, training is not affected.",
                probe.name,
                hook,
                exc_info=True,
            )
