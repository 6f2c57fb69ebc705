"""LoraDoctorCallback: translates Hugging Face Trainer events into engine calls.

Each event reads what the Trainer offers, hands plain data to the engine (through the probes) and
acts on what comes back: findings are logged by the engine, ``stop_on`` findings stop training, and
the diagnosis JSON is written at the end.

Multi-process runs (DDP, FSDP, DeepSpeed): every rank runs the doctor, only the main process logs and
writes; the one collective (per-rank readings, :mod:`lora_doctor.probes.dist`) runs on every rank at
the same steps, whatever state the doctor is in on that rank. Trackers: the callback moves itself
before the reporting callbacks, so its ``lora_doctor/...`` metrics reach TensorBoard, W&B and the
others in the same logs dict; the printed log lines and ``state.log_history`` (hence
``trainer_state.json``) do not get them (:mod:`lora_doctor.integrations.console`). Resume: the
doctor's state is saved in each checkpoint (``ExportableState``) and taken back when training
resumes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import time
import weakref
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from transformers import TrainerCallback
from transformers.trainer_callback import DefaultFlowCallback, ExportableState

from lora_doctor._version import __version__
from lora_doctor.checks import Check, Phase, Registry
from lora_doctor.checks.ecosystem import is_rl_or_preference
from lora_doctor.config import DoctorConfig
from lora_doctor.engine import Doctor
from lora_doctor.facts import AdapterFacts, RunFacts
from lora_doctor.findings import Severity, to_jsonable
from lora_doctor.history import is_eval_entry
from lora_doctor.integrations import guard
from lora_doctor.integrations.console import hide_from_printers
from lora_doctor.integrations.loop import (
    check_options,
    default_probes,
    resolve_config,
    writing_report,
)
from lora_doctor.integrations.resume import (
    checkpoint_adapters,
    ranks_from_error,
    resolve_checkpoint,
)
from lora_doctor.probes.base import Event, Probe, call_probes
from lora_doctor.probes.budget import TimeBudget, charge_hook
from lora_doctor.probes.crash import rank_report_path, record_crash
from lora_doctor.probes.dist import RankReadings
from lora_doctor.probes.ecosystem import vllm_max_lora_rank
from lora_doctor.probes.memory import MemoryReader, is_out_of_memory, record_out_of_memory
from lora_doctor.probes.setup import read_setup
from lora_doctor.probes.view import ModelView
from lora_doctor.report import REPORT_NAME

__all__ = ["LoraDoctorCallback"]

logger = logging.getLogger("lora_doctor")

_F = TypeVar("_F", bound=Callable[..., Any])

#: numpy's floating-point warnings (overflow, invalid value, division by zero) stay inside the
#: doctor's arithmetic: the checks read non-finite results as such, and the user's stderr gets no
#: RuntimeWarning from odd logs. A context manager of numpy's own, local to the ``with`` block.
_QUIET_NUMPY = functools.partial(np.errstate, all="ignore")

#: Marks the config dict a checkpoint saved (:meth:`LoraDoctorCallback.state`), apart from a
#: user's ``config={...}``; its value names the version that saved it.
_SAVED_BY = "__saved_by__"
#: The key of the doctor's listeners on a Trainer's train guard.
_GUARD_KEY = "lora_doctor"


def _guarded(hook: _F) -> _F:
    """Runs a Trainer hook so that no error of the doctor's reaches the training loop.

    A hook that raises is switched off for the rest of the run (said once, with the traceback for
    a bug report) and the others go on; ``on_train_begin`` builds the run's doctor, so when it
    fails the whole doctor is off until the next run, which switches every part on again. The
    findings so far are written at the end either way (:meth:`LoraDoctorCallback.on_train_end`
    writes outside its guarded part). The hook's time is charged to the run's time budget
    (``on_train_begin``'s from the moment it made the budget).
    """
    name = hook.__name__
    event = name if name.startswith("on_") else f"on{name}"  # _step_end runs in on_step_end

    @functools.wraps(hook)
    def wrapper(
        self: LoraDoctorCallback, args: Any, state: Any, control: Any, **kwargs: Any
    ) -> Any:
        if name == "on_train_begin":  # a new run
            self._broken = False
            self._off.clear()
        elif self._broken or name in self._off:
            return None
        budget = self._budget
        since = budget.clock() if budget is not None else None
        try:
            return hook(self, args, state, control, **kwargs)
        except Exception:
            if name == "on_train_begin":
                self._broken = True
            else:
                self._off.add(name)
            logger.warning(
                "lora-doctor: internal error in %s; %s is switched off for the rest of the run "
                "(the findings so far are still written at the end), training is not affected.",
                event,
                "the doctor" if self._broken else event,
                exc_info=True,
            )
            return None
        finally:
            step = int(getattr(state, "global_step", 0) or 0)
            charge_hook(self._budget, since, step, began=name == "on_train_begin")

    return wrapper  # type: ignore[return-value]


class LoraDoctorCallback(TrainerCallback, ExportableState):
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
        print_metrics: also print the doctor's ``lora_doctor/...`` metrics in the log lines the
            Trainer prints (default False: they go to the trackers and the JSON only, and the
            printed lines look as they do without the doctor).
        alerts: also send each warning or error finding, once, as a W&B alert (``run.alert``,
            with the title, the fix and the level) while a W&B run is active (default False).
        config: every other threshold, as a :class:`~lora_doctor.DoctorConfig` (or a dict of its
            fields); ``ignore``, ``stop_on``, ``check_after_steps``, ``print_metrics`` and
            ``alerts`` given here take precedence over its fields.
        memory_reader: reads device memory (a :class:`~lora_doctor.probes.memory.MemoryReader`);
            the CUDA caching allocator's counters when None. Pass your own for another accelerator
            or to script readings in tests.
        extra_checks: your own :class:`~lora_doctor.checks.Check` classes, run beside the built-in
            ones; their slugs can be used in ``ignore`` and ``stop_on``.

    One callback may serve several Trainers: each Trainer's run keeps its own diagnosis, written
    to its own ``output_dir`` (with an explicit ``report_path``, the latest run's).

    When training dies of an error, the diagnosis is still written, with an ``out-of-memory``
    finding for CUDA out-of-memory and a ``training-died`` finding (the cause and the fix, when the
    doctor knows the error; docs/crashes.md) for any other, and the error goes on unchanged (see
    :mod:`lora_doctor.integrations.guard`); another process than the main one writes its own
    ``lora_doctor.rank<N>.json``. :func:`lora_doctor.watch` is the explicit form, for
    ``trainer.evaluate()`` in a notebook or a custom loop.

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
        print_metrics: bool | None = None,
        alerts: bool | None = None,
        config: DoctorConfig | dict[str, Any] | None = None,
        memory_reader: MemoryReader | None = None,
        extra_checks: Iterable[type[Check]] = (),
    ) -> None:
        if isinstance(config, dict):  # also the form a checkpoint saves (see state())
            config = _config_from_dict(config)
        check_options("LoraDoctorCallback", config, report_path, "<output_dir>")
        overrides: dict[str, Any] = {}
        if ignore is not None:
            overrides["ignore"] = ignore
        if stop_on is not None:
            overrides["stop_on"] = stop_on
        if check_after_steps is not None:
            overrides["check_after_steps"] = check_after_steps
        if print_metrics is not None:
            overrides["print_metrics"] = print_metrics
        if alerts is not None:
            overrides["alerts"] = alerts
        self.extra_checks = tuple(extra_checks)
        self.config = resolve_config(config, overrides, self.extra_checks)
        self.report_path = report_path
        self.memory_reader = memory_reader
        self.doctor: Doctor | None = None
        self._trainer: weakref.ref[Any] | None = None
        self._failed_id: int | None = None
        #: When the current ``train`` call began (``time.time()``): rank reports older than it
        #: belong to an earlier run.
        self._since: float | None = None
        self._probes: list[Probe] = []
        self._broken = False
        self._off: set[str] = set()
        #: The doctor of each Trainer's latest run, by the Trainer's id (with a weak reference
        #: that tells a live Trainer from a new one at the same address).
        self._runs: dict[int, tuple[weakref.ref[Any], Doctor]] = {}
        self._stopped = False
        self.ranks = RankReadings()
        self._trainer_name: str | None = None
        self._eval_logged = False
        #: The current run's account of the doctor's time (made when training begins).
        self._budget: TimeBudget | None = None

    # --- plumbing ---------------------------------------------------------------------------------
    def _event(
        self, args: Any, state: Any, kwargs: dict[str, Any], logs: Any = None, control: Any = None
    ) -> Event:
        assert self.doctor is not None
        return Event(
            doctor=self.doctor,
            args=args,
            state=state,
            model=kwargs.pop("model", None),
            optimizer=kwargs.pop("optimizer", None),
            logs=logs,
            kwargs=kwargs,
            ranks=self.ranks,
            control=control,
            budget=self._budget,
        )

    def _call(self, hook: str, event: Event) -> None:
        """Calls ``hook`` on every live probe; a probe that raises is logged once and dropped."""
        call_probes(self._probes, hook, event)

    def _run(self, phase: Phase, state: Any, control: Any, doctor: Doctor | None = None) -> None:
        """Runs ``phase`` on ``doctor`` (the current run's when None); acts on ``stop_on``."""
        doctor = doctor if doctor is not None else self.doctor
        assert doctor is not None
        with _QUIET_NUMPY():  # odd logs (values near 1e308, repeated steps) overflow quietly
            doctor.run_phase(phase, int(getattr(state, "global_step", 0) or 0))
        self._stop_if_asked(state, control, doctor)

    def _stop_if_asked(self, state: Any, control: Any, doctor: Doctor) -> None:
        """Stops training once a finding in ``stop_on`` is reported (once, with a log line)."""
        reason = doctor.stop_reason
        if reason is not None and not self._stopped:
            self._stopped = True
            control.should_training_stop = True
            if doctor.emit:
                logger.warning(
                    "lora-doctor: stopping training at step %s because of %s (%s), as asked by "
                    "stop_on.",
                    getattr(state, "global_step", "?"),
                    reason.slug,
                    reason.code,
                )

    # --- Trainer events ---------------------------------------------------------------------------
    @_guarded
    def on_init_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._attach(guard.find_trainer())

    @_guarded
    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._budget = TimeBudget(
            self.config.time_budget,
            start_step=int(getattr(state, "global_step", 0) or 0),
            first_steps=self.config.check_after_steps,
        )
        self.doctor = None  # until this run's is built: no earlier run's report is written for it
        if state.is_world_process_zero:
            self._check_report_path(args)
        trainer = guard.find_trainer()
        if trainer is not None and not guard.is_installed(trainer):
            guard.guard_steps(trainer, self._train_failed)  # this train() call began unguarded
            self._since = time.time()
        self._attach(trainer)
        self._failed_id = None
        self.doctor = Doctor(
            self.config,
            RunFacts(),
            emit=bool(state.is_world_process_zero),
            extra_checks=self.extra_checks,
        )
        self._bind(trainer, self.doctor)
        saved = _saved_state(state, type(self).__name__)
        if saved is not None and int(getattr(state, "global_step", 0) or 0) > 0:
            self.doctor.restore_state(saved, getattr(state, "log_history", None) or ())
        _facts_from_trainer(self.doctor.facts, args, state, kwargs, self._trainer_name)
        self.doctor.facts.overhead = self._budget.facts
        self._apply_resume(self.doctor.facts, trainer)
        self._probes = default_probes(self.config, self.memory_reader)
        self._stopped = False
        self._call("train_begin", self._event(args, state, kwargs))
        self._run(Phase.SETUP, state, control)

    @_guarded
    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.doctor is not None:
            self._call("pre_optimizer_step", self._event(args, state, kwargs))

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._step_end(args, state, control, **kwargs)
        if getattr(control, "should_log", False):
            # The one collective: on every rank at the same steps (DefaultFlowCallback, which runs
            # before the doctor, sets should_log by the step number), broken doctor or not.
            self._exchange(int(getattr(state, "global_step", 0) or 0))

    @_guarded
    def _step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.doctor is None:
            return
        self._call("step_end", self._event(args, state, kwargs, control=control))
        if state.global_step == self.config.check_after_steps:
            self._run(Phase.FIRST_STEPS, state, control)

    def _exchange(self, step: int) -> None:
        """Exchanges the per-rank readings, the time budget's numbers among them (the spectrum
        probe's decisions read them), and charges the exchange to the budget."""
        budget = self._budget
        since = budget.clock() if budget is not None else 0.0
        try:
            if budget is not None:
                budget.put(self.ranks, step)
            self.ranks.exchange()
            if budget is not None:
                budget.charge(since, step)
        except Exception:
            if not self._broken:
                self._broken = True
                logger.warning(
                    "lora-doctor: could not gather per-rank readings; the doctor is switched off "
                    "for the rest of the run, training is not affected.",
                    exc_info=True,
                )

    @_guarded
    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
        doctor = self._doctor_of(state)
        if doctor is None or not isinstance(logs, dict):
            return
        if doctor is self.doctor:  # the probes read the Trainer that is training
            self._call("log", self._event(args, state, kwargs, logs))
        # the Trainer logs evaluation metrics through on_log, then calls on_evaluate: the entry is
        # observed here, once, and runs the EVAL phase, as the offline replay of log_history does
        self._eval_logged = is_eval_entry(logs)
        with _QUIET_NUMPY():  # odd logs (values near 1e308, repeated steps) overflow quietly
            doctor.observe(state.global_step, logs)
        self._stop_if_asked(state, control, doctor)
        self._publish(doctor, logs)

    @_guarded
    def on_evaluate(
        self, args: Any, state: Any, control: Any, metrics: Any = None, **kwargs: Any
    ) -> None:
        doctor = self._doctor_of(state)
        if doctor is None or not isinstance(metrics, dict):
            return
        if doctor is self.doctor:
            self._call("evaluate", self._event(args, state, kwargs, metrics))
        if self._eval_logged:  # already observed and judged in on_log
            self._eval_logged = False
            return
        doctor.observe(state.global_step, metrics, run=False)
        self._run(Phase.EVAL, state, control, doctor)

    @_guarded
    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.doctor is not None:
            self._call("save", self._event(args, state, kwargs))

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._train_end(args, state, control, **kwargs)
        # outside the guard: the findings so far are written even after a hook failed
        if self.doctor is not None and getattr(state, "is_world_process_zero", True):
            self._write(args, self.doctor)

    @_guarded
    def _train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.doctor is None:
            return
        self._call("train_end", self._event(args, state, kwargs))
        self._run(Phase.END, state, control)

    # --- trainer, guard, trackers -----------------------------------------------------------------
    def _attach(self, trainer: Any) -> None:
        """Learns the Trainer: its class, the guard around its ``train``, the doctor's place
        before the reporting callbacks, and its printers, which are not to print the doctor's
        metrics."""
        if trainer is None:
            return
        self._trainer_name = type(trainer).__name__
        self._trainer = weakref.ref(trainer)
        g = guard.install(trainer)
        g.before[_GUARD_KEY] = self._before_train
        g.failed[_GUARD_KEY] = self._train_failed
        handler = getattr(trainer, "callback_handler", None)
        self._move_before_reporters(handler)
        if not self.config.print_metrics:
            hide_from_printers(handler)

    def _move_before_reporters(self, handler: Any) -> None:
        """Puts the doctor right after ``DefaultFlowCallback``, before TensorBoard, W&B, MLflow
        and any user callback, whatever order they were added in: they then see the
        ``lora_doctor/...`` metrics the doctor adds to the logs dict.

        (Safe inside the handler's loop over its list: moving an element from index k to a lower
        index leaves the element after k where the loop will look next.)
        """
        callbacks = getattr(handler, "callbacks", None)
        if not isinstance(callbacks, list) or self not in callbacks:
            return
        callbacks.remove(self)
        flow = [i for i, cb in enumerate(callbacks) if isinstance(cb, DefaultFlowCallback)]
        callbacks.insert(flow[0] + 1 if flow else 0, self)

    def _publish(self, doctor: Doctor, logs: dict[str, Any]) -> None:
        """Adds the finding counts to the logs dict, for the reporting callbacks after the doctor.

        ``state.log_history`` is left alone: the Trainer appended its copy of the entry before
        calling ``on_log``, and the doctor's metrics would make ``trainer_state.json`` grow with
        every reading (the doctor keeps them itself, and writes what it found to its JSON).
        """
        findings = doctor.findings
        logs["lora_doctor/findings"] = len(findings)
        logs["lora_doctor/warnings"] = sum(f.severity is Severity.WARNING for f in findings)
        logs["lora_doctor/errors"] = sum(f.severity is Severity.ERROR for f in findings)

    # --- resume and failures ----------------------------------------------------------------------
    def _before_train(self, trainer: Any, resume: Any) -> None:
        """``trainer.train`` was called: a new run, whose doctor ``on_train_begin`` builds (an
        error before that gets a doctor of its own, not the previous run's)."""
        guard.unguard_steps(trainer)  # guarded from here: the step guard's call has ended
        self._since = time.time()
        self._runs.pop(id(trainer), None)

    # --- one diagnosis per Trainer ----------------------------------------------------------------
    def _bind(self, trainer: Any, doctor: Doctor) -> None:
        """Binds ``doctor`` to ``trainer``'s run: that Trainer's later events, its failure and its
        report use it, whatever other Trainer this callback serves meanwhile."""
        self._runs = {k: run for k, run in self._runs.items() if run[0]() is not None}
        if trainer is not None:
            # an object that takes no weak reference is left unbound
            with contextlib.suppress(TypeError):
                self._runs[id(trainer)] = (weakref.ref(trainer), doctor)

    def _bound(self, trainer: Any) -> Doctor | None:
        """The doctor of ``trainer``'s latest run, if this callback diagnosed one."""
        run = self._runs.get(id(trainer)) if trainer is not None else None
        return run[1] if run is not None and run[0]() is trainer else None

    def _doctor_of(self, state: Any) -> Doctor | None:
        """The doctor of the run an event's ``state`` belongs to: another Trainer's this callback
        diagnosed (its ``evaluate`` after a second Trainer trained), else the current run's."""
        for ref, doctor in self._runs.values():
            trainer = ref()
            if trainer is not None and getattr(trainer, "state", None) is state:
                return doctor
        return self.doctor

    def _apply_resume(
        self, facts: RunFacts, trainer: Any, error: BaseException | None = None
    ) -> None:
        """The checkpoint this ``train`` call resumes (the guard saw its argument) and the
        adapters it saved; read from a "size mismatch" error when its configs cannot be read."""
        resume = guard.install(trainer).resume if trainer is not None else None
        args = getattr(trainer, "args", None)
        path = resolve_checkpoint(getattr(args, "output_dir", None), resume)
        facts.resumed_from = path
        facts.checkpoint_adapters = checkpoint_adapters(path) if path is not None else {}
        if path is not None and not facts.checkpoint_adapters and error is not None:
            facts.checkpoint_adapters = ranks_from_error(error)

    def _train_failed(self, trainer: Any, error: BaseException) -> None:
        """``trainer.train`` is dying of ``error``: diagnose what can be (a rank changed on resume,
        an out-of-memory error, else the crash's cause: ``training-died``) and leave the JSON; the
        error then propagates. A process other than the main one leaves its own
        ``lora_doctor.rank<N>.json`` beside the report (the main process may never hear of it).

        The same error is recorded once, however many guards it passes through."""
        if self._failed_id == id(error):
            return
        self._failed_id = id(error)
        with _QUIET_NUMPY():
            self._diagnose_failure(trainer, error)

    def _diagnose_failure(self, trainer: Any, error: BaseException) -> None:
        """The body of :meth:`_train_failed`: the run's doctor (or a new one) hears of the error,
        runs its checks and writes the JSON."""
        args = getattr(trainer, "args", None)
        state = getattr(trainer, "state", None)
        is_main = bool(getattr(trainer, "is_world_process_zero", lambda: True)())
        model = getattr(trainer, "model", None)
        doctor = self._bound(trainer)
        if doctor is None:  # died before on_train_begin (e.g. loading the checkpoint)
            self.doctor = doctor = Doctor(
                self.config, RunFacts(), emit=is_main, extra_checks=self.extra_checks
            )
            self._bind(trainer, doctor)
            facts = doctor.facts
            _facts_from_trainer(facts, args, state, {"model": model}, type(trainer).__name__)
            optimizer = getattr(trainer, "optimizer", None)
            view = ModelView.build(model, optimizer)
            read_setup(facts.setup, view, args, optimizer, facts.max_steps)
            for name, cfg in dict(getattr(model, "peft_config", None) or {}).items():
                to_dict = getattr(cfg, "to_dict", None)
                data = to_dict() if callable(to_dict) else dict(vars(cfg))
                facts.adapters[str(name)] = AdapterFacts.from_config(str(name), data)
            facts.has_lora = bool(facts.adapters) or None
            self._apply_resume(facts, trainer, error)
            doctor.run_phase(Phase.SETUP, 0)
            if not record_out_of_memory(doctor, error, 0, self.memory_reader):
                self._record_crash(doctor, trainer, error, 0)
            doctor.run_phase(Phase.END, 0)
        else:
            event = Event(
                doctor=doctor,
                args=args,
                state=state,
                model=model,
                optimizer=getattr(trainer, "optimizer", None),
                ranks=self.ranks,
            )
            for probe in list(self._probes):
                try:
                    probe.train_failed(event, error)
                except Exception:
                    logger.warning(
                        "lora-doctor: internal error in the %s probe (train_failed).",
                        probe.name,
                        exc_info=True,
                    )
            step = int(getattr(state, "global_step", 0) or 0)
            if not is_out_of_memory(error):
                self._record_crash(doctor, trainer, error, step)
            doctor.run_phase(Phase.END, step)
        if args is not None:
            rank = int(getattr(args, "process_index", 0) or 0)
            self._write(args, doctor, rank=None if is_main else rank)

    def _record_crash(self, doctor: Doctor, trainer: Any, error: BaseException, step: int) -> None:
        """Records the crash for the ``training-died`` check; an error here never stops the
        report from being written."""
        try:
            args = getattr(trainer, "args", None)
            report = self._report_target(args) if args is not None else None
            record_crash(doctor, error, step, trainer, report=report, since=self._since)
        except Exception:
            logger.warning(
                "lora-doctor: could not read the facts of the error that ended training; the "
                "error itself goes on unchanged.",
                exc_info=True,
            )

    def record_failure(self, error: BaseException, trainer: Any = None) -> None:
        """Records the error that ended training and writes the diagnosis, as the guard does;
        the caller re-raises ``error`` unchanged (this is what :func:`lora_doctor.watch` calls).

        Args:
            error: the error.
            trainer: the Trainer; the one this callback last saw when None.
        """
        trainer = trainer if trainer is not None else (self._trainer() if self._trainer else None)
        if trainer is None:
            raise ValueError(
                "LoraDoctorCallback.record_failure needs the Trainer: pass trainer=..., or add the "
                "callback to a Trainer first"
            )
        try:
            self._train_failed(trainer, error)
        except Exception:
            logger.warning(
                "lora-doctor: could not record the error that ended training; the error itself "
                "goes on unchanged.",
                exc_info=True,
            )

    # --- ExportableState (saved in each checkpoint's trainer_state.json) ------------------------
    def state(self) -> dict[str, Any]:
        """The callback's arguments and the doctor's state, as JSON data for a checkpoint.

        transformers stores it under ``stateful_callbacks`` in ``trainer_state.json``; on resume the
        doctor takes it back in ``on_train_begin`` (with or without
        ``restore_callback_states_from_checkpoint``).
        """
        report = self.report_path
        config = to_jsonable(dataclasses.asdict(self.config))
        return {
            # Only these two arguments: transformers rebuilds the callback with them, and a version
            # that does not know an argument would fail; new options go into the config, which
            # carries _SAVED_BY so that another version tolerates what it does not know.
            "args": {
                "report_path": str(report) if isinstance(report, os.PathLike) else report,
                "config": {_SAVED_BY: f"lora-doctor {__version__}", **config},
            },
            "attributes": {
                "doctor_state": self.doctor.export_state() if self.doctor is not None else None
            },
        }

    # --- output -----------------------------------------------------------------------------------
    def write_report(
        self, args: Any, doctor: Doctor | None = None, rank: int | None = None
    ) -> Path | None:
        """Writes the diagnosis JSON (atomically) and returns its path; None when disabled.

        Args:
            args: the Trainer's arguments (their ``output_dir`` when ``report_path`` is None).
            doctor: whose diagnosis; the latest run's when None.
            rank: for a process other than the main one, its global rank: the report then goes
                beside the main one as ``<stem>.rank<N><suffix>`` (``lora_doctor.rank1.json``).

        Raises:
            OSError: when the file cannot be written.
        """
        doctor = doctor if doctor is not None else self.doctor
        path = self._report_target(args)
        if doctor is None or path is None:
            return None
        if rank is not None:
            path = rank_report_path(path, rank)
        doctor.diagnosis("live").to_json(path)
        logger.info("lora-doctor: diagnosis written to %s", path)
        return path

    def _report_target(self, args: Any) -> Path | None:
        """Where the diagnosis goes: ``report_path``, else ``<output_dir>/lora_doctor.json``; None
        for ``report_path=False`` (True is refused in ``__init__``)."""
        if isinstance(self.report_path, bool):
            return None
        return Path(self.report_path) if self.report_path else Path(args.output_dir) / REPORT_NAME

    def _check_report_path(self, args: Any) -> None:
        """Says at the start, in one line, when the diagnosis will not be writable where it goes
        (training goes on, and the findings are logged as always)."""
        path = self._report_target(args)
        problem = _unwritable(path) if path is not None else None
        if problem is not None:
            logger.warning(
                "lora-doctor: the diagnosis cannot be written to %s (%s); training goes on and "
                "the findings are still logged. Pass LoraDoctorCallback(report_path=...) a file "
                "in a folder you can write to.",
                path,
                problem,
            )

    def _write(self, args: Any, doctor: Doctor, rank: int | None = None) -> None:
        """Writes ``doctor``'s diagnosis; never raises. A file that cannot be written is said in
        one line (no traceback); any other failure is an internal error, logged as one."""
        with writing_report(self._report_target(args)):
            self.write_report(args, doctor, rank)


def _unwritable(path: Path) -> str | None:
    """Why the diagnosis could not be written to ``path``, or None when it can; creates nothing.

    The nearest folder that exists on the way to ``path`` must be a folder the process may write
    in (the missing ones are created when the file is written), and ``path`` must not be a folder.
    """
    try:
        if path.is_dir():
            return "it is a folder"
        folder = path.parent
        while not folder.exists() and folder.parent != folder:
            folder = folder.parent
        if not folder.is_dir():
            return f"{folder} is a file, not a folder"
        if not os.access(folder, os.W_OK | os.X_OK):
            return f"no permission to write in {folder}"
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def _config_from_dict(data: dict[Any, Any]) -> DoctorConfig:
    """A DoctorConfig from ``config={...}``.

    A user's dict must name only DoctorConfig fields, with valid values (else ``ValueError``, as
    DoctorConfig itself raises). A checkpoint's (marked with ``_SAVED_BY``, see
    :meth:`LoraDoctorCallback.state`) may come from another version of lora-doctor: a field this
    version does not know, a value it does not accept or a finding name it does not have is
    left out (the field keeps its default), with one warning line, so that resuming with
    ``restore_callback_states_from_checkpoint=True`` works across versions.

    Raises:
        ValueError: for a user's dict with an unknown field or a wrong value.
    """
    names = {f.name for f in dataclasses.fields(DoctorConfig)}
    values = {k: v for k, v in data.items() if k != _SAVED_BY}
    unknown = sorted(str(k) for k in values if k not in names)
    if _SAVED_BY not in data:
        if unknown:
            raise ValueError(
                f"LoraDoctorCallback(config=...) has unknown DoctorConfig fields {unknown}"
            )
        return DoctorConfig(**values)
    left_out = unknown
    pending = {k: v for k, v in values.items() if k in names}
    registered = Registry().names
    for key in ("ignore", "stop_on"):  # finding names another version may have, this one not
        if isinstance(pending.get(key), list):
            known = [n for n in pending[key] if isinstance(n, str) and n in registered]
            left_out += [f"{key} {n!r}" for n in pending[key] if n not in known]
            pending[key] = known
    config = DoctorConfig()
    while pending:  # field by field, again while any is taken (rules tie some fields together)
        taken = []
        for key, value in pending.items():
            try:
                config = dataclasses.replace(config, **{key: value})
            except (TypeError, ValueError):
                continue
            taken.append(key)
        if not taken:
            break
        for key in taken:
            del pending[key]
    left_out += sorted(pending)
    if left_out:
        logger.warning(
            "lora-doctor: the checkpoint's doctor settings were saved by %s; this version (%s) "
            "left out what it does not know or accept: %s.",
            data[_SAVED_BY],
            __version__,
            ", ".join(left_out),
        )
    return config


def _saved_state(state: Any, name: str) -> dict[str, Any] | None:
    """The doctor's state a resumed checkpoint saved for the callback class ``name``, if any."""
    stored = getattr(state, "stateful_callbacks", None)
    entry = stored.get(name) if isinstance(stored, dict) else None
    if isinstance(entry, list):  # several doctors: transformers keeps a list; take the first
        entry = entry[0] if entry else None
    attributes = entry.get("attributes") if isinstance(entry, dict) else None
    saved = attributes.get("doctor_state") if isinstance(attributes, dict) else None
    return saved if isinstance(saved, dict) else None


def _facts_from_trainer(
    facts: RunFacts, args: Any, state: Any, kwargs: dict[str, Any], trainer: str | None
) -> RunFacts:
    """Fills the run-level facts the Trainer tells (its class, arguments and state); the model
    probes add the rest."""
    facts.trainer = trainer or _trainer_from_args(args)
    facts.is_rl = facts.is_rl or is_rl_or_preference(facts.trainer)
    facts.vllm_max_lora_rank = vllm_max_lora_rank(args, kwargs.get("model"))
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


def _trainer_from_args(args: Any) -> str | None:
    """The trainer's name guessed from its arguments' class (TRL's ``GRPOConfig`` -> ``GRPOTrainer``)."""
    name = type(args).__name__
    if name.endswith("Config") and name != "Config":
        return name[: -len("Config")] + "Trainer"
    return "Trainer" if name == "TrainingArguments" else None
