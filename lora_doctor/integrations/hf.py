"""LoraDoctorCallback: translates Hugging Face Trainer events into engine calls.

Each event reads what the Trainer offers, hands plain data to the engine (through the probes) and
acts on what comes back: findings are logged by the engine, ``stop_on`` findings stop training, and
the diagnosis JSON is written at the end.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

from transformers import TrainerCallback

from lora_doctor.checks import Phase
from lora_doctor.config import DoctorConfig
from lora_doctor.engine import Doctor
from lora_doctor.facts import RunFacts
from lora_doctor.probes.base import Event, Probe
from lora_doctor.probes.model import AdapterProbe

__all__ = ["LoraDoctorCallback"]

logger = logging.getLogger("lora_doctor")

_F = TypeVar("_F", bound=Callable[..., Any])

REPORT_NAME = "lora_doctor.json"


def _guarded(hook: _F) -> _F:
    """Runs a Trainer hook so that no error of the doctor's reaches the training loop."""

    @functools.wraps(hook)
    def wrapper(
        self: LoraDoctorCallback, args: Any, state: Any, control: Any, **kwargs: Any
    ) -> Any:
        if self._broken:
            return None
        try:
            return hook(self, args, state, control, **kwargs)
        except Exception:
            self._broken = True
            logger.warning(
                "lora-doctor: internal error in %s; the doctor is switched off for the rest of the "
                "run, training is not affected.",
                hook.__name__,
                exc_info=True,
            )
            return None

    return wrapper  # type: ignore[return-value]


class LoraDoctorCallback(TrainerCallback):
    """Diagnoses a LoRA fine-tuning run while it trains.

    Add it to any ``transformers.Trainer`` (or TRL trainer); it logs each finding once through the
    ``lora_doctor`` logger and writes the diagnosis to ``<output_dir>/lora_doctor.json`` at the end.

    Args:
        report_path: where the diagnosis JSON goes; ``<output_dir>/lora_doctor.json`` when None.
            Pass ``False`` to write no file.
        ignore: finding slugs (or codes) never to report, e.g. ``{"alpha-rank-ratio"}``.
        stop_on: finding slugs (or codes) that stop training when found, e.g. ``{"non-finite-values"}``.
            Off by default: the doctor only reports.
        check_after_steps: optimizer steps after which the adapter is checked for gradients,
            movement and shapes (default 2).
        config: every other threshold, as a :class:`~lora_doctor.DoctorConfig`; ``ignore``,
            ``stop_on`` and ``check_after_steps`` given here take precedence over its fields.

    Raises:
        ValueError: for an option of the wrong type or out of range, naming it and the fix.

    Example:
        >>> from lora_doctor import LoraDoctorCallback
        >>> trainer = Trainer(model=peft_model, args=args, train_dataset=ds,
        ...                   callbacks=[LoraDoctorCallback()])  # doctest: +SKIP
    """

    def __init__(
        self,
        report_path: str | os.PathLike[str] | bool | None = None,
        *,
        ignore: Iterable[str] | None = None,
        stop_on: Iterable[str] | None = None,
        check_after_steps: int | None = None,
        config: DoctorConfig | None = None,
    ) -> None:
        if config is not None and not isinstance(config, DoctorConfig):
            raise ValueError(
                f"LoraDoctorCallback(config=...) must be a lora_doctor.DoctorConfig, got "
                f"{type(config).__name__}"
            )
        if report_path is True or not isinstance(report_path, (str, os.PathLike, bool, type(None))):
            raise ValueError(
                "LoraDoctorCallback(report_path=...) must be a file path, None (the default "
                f"<output_dir>/{REPORT_NAME}) or False (no file), got {report_path!r}"
            )
        overrides: dict[str, Any] = {}
        if ignore is not None:
            overrides["ignore"] = ignore
        if stop_on is not None:
            overrides["stop_on"] = stop_on
        if check_after_steps is not None:
            overrides["check_after_steps"] = check_after_steps
        base = config or DoctorConfig()
        self.config = dataclasses.replace(base, **overrides) if overrides else base
        self.report_path = report_path
        self.doctor: Doctor | None = None
        self._probes: list[Probe] = []
        self._broken = False
        self._stopped = False

    # --- plumbing ---------------------------------------------------------------------------------
    def _make_probes(self) -> list[Probe]:
        return [AdapterProbe()]

    def _event(self, args: Any, state: Any, kwargs: dict[str, Any], logs: Any = None) -> Event:
        assert self.doctor is not None
        return Event(
            doctor=self.doctor,
            args=args,
            state=state,
            model=kwargs.pop("model", None),
            optimizer=kwargs.pop("optimizer", None),
            logs=logs,
            kwargs=kwargs,
        )

    def _call(self, hook: str, event: Event) -> None:
        """Calls ``hook`` on every live probe; a probe that raises is logged once and dropped."""
        for probe in list(self._probes):
            try:
                getattr(probe, hook)(event)
            except Exception:
                self._probes.remove(probe)
                logger.warning(
                    "lora-doctor: internal error in the %s probe (%s); it is switched off for the "
                    "rest of the run, training is not affected.",
                    probe.name,
                    hook,
                    exc_info=True,
                )

    def _run(self, phase: Phase, state: Any, control: Any) -> None:
        assert self.doctor is not None
        self.doctor.run_phase(phase, int(getattr(state, "global_step", 0) or 0))
        reason = self.doctor.stop_reason
        if reason is not None and not self._stopped:
            self._stopped = True
            control.should_training_stop = True
            if self.doctor.emit:
                logger.warning(
                    "lora-doctor: stopping training at step %s because of %s (%s), as asked by "
                    "stop_on.",
                    getattr(state, "global_step", "?"),
                    reason.slug,
                    reason.code,
                )

    # --- Trainer events ---------------------------------------------------------------------------
    @_guarded
    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        facts = _facts_from_trainer(args, state, kwargs)
        self.doctor = Doctor(self.config, facts, emit=bool(state.is_world_process_zero))
        self._probes = self._make_probes()
        self._stopped = False
        self._call("train_begin", self._event(args, state, kwargs))
        self._run(Phase.SETUP, state, control)

    @_guarded
    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.doctor is not None:
            self._call("pre_optimizer_step", self._event(args, state, kwargs))

    @_guarded
    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.doctor is None:
            return
        self._call("step_end", self._event(args, state, kwargs))
        if state.global_step == self.config.check_after_steps:
            self._run(Phase.FIRST_STEPS, state, control)

    @_guarded
    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
        if self.doctor is None or not isinstance(logs, dict):
            return
        self._call("log", self._event(args, state, kwargs, logs))
        self.doctor.observe(state.global_step, logs)
        self._run(Phase.LOG, state, control)

    @_guarded
    def on_evaluate(
        self, args: Any, state: Any, control: Any, metrics: Any = None, **kwargs: Any
    ) -> None:
        if self.doctor is None or not isinstance(metrics, dict):
            return
        self._call("evaluate", self._event(args, state, kwargs, metrics))
        self.doctor.observe(state.global_step, metrics)
        self._run(Phase.EVAL, state, control)

    @_guarded
    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.doctor is None:
            return
        self._call("train_end", self._event(args, state, kwargs))
        self._run(Phase.END, state, control)
        if state.is_world_process_zero:
            self.write_report(args)

    # --- output -----------------------------------------------------------------------------------
    def write_report(self, args: Any) -> Path | None:
        """Writes the diagnosis JSON (atomically) and returns its path; None when disabled."""
        if self.doctor is None or self.report_path is False:
            return None
        path = Path(self.report_path) if self.report_path else Path(args.output_dir) / REPORT_NAME
        self.doctor.diagnosis("live").to_json(path)
        logger.info("lora-doctor: diagnosis written to %s", path)
        return path


def _facts_from_trainer(args: Any, state: Any, kwargs: dict[str, Any]) -> RunFacts:
    """The run-level facts the Trainer's arguments and state tell (the model probes add the rest)."""
    facts = RunFacts()
    facts.max_steps = int(getattr(state, "max_steps", 0) or 0)
    facts.num_train_epochs = getattr(args, "num_train_epochs", None)
    facts.learning_rate = getattr(args, "learning_rate", None)
    facts.world_size = int(getattr(args, "world_size", 1) or 1)
    loader = kwargs.get("train_dataloader")
    dataset = getattr(loader, "dataset", None)
    try:
        facts.train_examples = len(dataset) if dataset is not None else None  # type: ignore[arg-type]
    except TypeError:  # an IterableDataset has no length
        facts.train_examples = None
    return facts
