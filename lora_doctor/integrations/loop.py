"""Custom training loops: the Trainer callback's checks and probes, driven by a loop of your own.

:class:`LoopDoctor` is the adapter for a plain PyTorch, Accelerate or Fabric loop: the loop calls
a few hooks named after Lightning's (``on_train_start``, ``on_before_optimizer_step``,
``on_train_batch_end``, ``on_validation_end``, ``on_train_end``, ``on_exception``) and gets the
same set-up, first-steps, curve, memory and rank checks as a ``transformers.Trainer`` run, and the
same JSON. The Lightning callback (:mod:`lora_doctor.lightning`) is a thin layer over it.

:func:`read_model` only reads the facts of a live model, for a :class:`~lora_doctor.engine.Doctor`
driven by hand.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from types import SimpleNamespace, TracebackType
from typing import Any, TypeVar

import numpy as np

from lora_doctor.checks import Check, Phase, Registry
from lora_doctor.config import DoctorConfig
from lora_doctor.engine import Doctor
from lora_doctor.facts import RunFacts
from lora_doctor.findings import Finding
from lora_doctor.probes import dist
from lora_doctor.probes.base import Event, Probe, call_probes
from lora_doctor.probes.budget import TimeBudget, charge_hook
from lora_doctor.probes.crash import rank_report_path, record_crash
from lora_doctor.probes.memory import MemoryProbe, MemoryReader, is_out_of_memory
from lora_doctor.probes.model import AdapterProbe, facts_from_view, peak_learning_rate
from lora_doctor.probes.setup import SetupProbe, read_setup
from lora_doctor.probes.spectrum import SpectrumProbe
from lora_doctor.probes.step_time import StepTimeProbe
from lora_doctor.probes.view import ModelView
from lora_doctor.report import REPORT_NAME, Diagnosis

__all__ = ["LoopDoctor", "default_probes", "guarded_hook", "read_model"]

logger = logging.getLogger("lora_doctor")

_F = TypeVar("_F", bound=Callable[..., Any])


def check_options(owner: str, config: Any, report_path: Any, folder: str) -> None:
    """Raises the one-line error of an adapter's ``config`` and ``report_path`` arguments.

    Args:
        owner: the class, for the message (``"LoraDoctorCallback"``).
        config: a :class:`DoctorConfig` or None (a dict is converted by the caller).
        report_path: a file path, None (the default file in ``folder``) or False (no file).
        folder: where the default file goes, for the message (``"<output_dir>"``).

    Raises:
        ValueError: either argument is of another type.
    """
    if config is not None and not isinstance(config, DoctorConfig):
        raise ValueError(
            f"{owner}(config=...) must be a lora_doctor.DoctorConfig (or a dict of its fields), "
            f"got {type(config).__name__}"
        )
    if report_path is True or not isinstance(report_path, (str, os.PathLike, bool, type(None))):
        raise ValueError(
            f"{owner}(report_path=...) must be a file path, None (the default "
            f"{folder}/{REPORT_NAME}) or False (no file), got {report_path!r}"
        )


def resolve_config(
    config: DoctorConfig | None, overrides: Mapping[str, Any], extra_checks: Iterable[type[Check]]
) -> DoctorConfig:
    """``config`` (the defaults when None) with an adapter's keyword ``overrides``, its
    ``ignore`` and ``stop_on`` checked against the built-in checks and ``extra_checks``.

    Raises:
        ValueError: an override of the wrong type, or an unknown finding name.
    """
    base = config or DoctorConfig()
    resolved = dataclasses.replace(base, **overrides) if overrides else base
    registry = Registry(extra=tuple(extra_checks))
    registry.validate("DoctorConfig.ignore", resolved.ignore)
    registry.validate("DoctorConfig.stop_on", resolved.stop_on)
    return resolved


@contextlib.contextmanager
def writing_report(path: object) -> Iterator[None]:
    """A block that writes the diagnosis to ``path`` and never raises: a file that cannot be
    written is said in one line (no traceback), any other failure logged as an internal error."""
    try:
        yield
    except OSError as exc:
        logger.warning(
            "lora-doctor: could not write the diagnosis to %s (%s: %s); its findings were logged.",
            path,
            type(exc).__name__,
            exc,
        )
    except Exception:
        logger.warning(
            "lora-doctor: internal error while writing the diagnosis; training is not affected.",
            exc_info=True,
        )


def default_probes(config: DoctorConfig, memory_reader: MemoryReader | None = None) -> list[Probe]:
    """The probes every adapter (Trainer callback, custom loop, Lightning) runs, in call order."""
    probes: list[Probe] = [
        AdapterProbe(),
        SetupProbe(),
        StepTimeProbe(),
        MemoryProbe(memory_reader),
    ]
    if config.spectrum:
        probes.append(SpectrumProbe(config))
    return probes


def _run_facts(run: Mapping[str, Any], caller: str) -> RunFacts:
    """RunFacts from keyword arguments named after its fields.

    Raises:
        ValueError: a keyword is no field of RunFacts.
    """
    names = {f.name for f in dataclasses.fields(RunFacts)}
    unknown = sorted(set(run) - names)
    if unknown:
        raise ValueError(
            f"{caller}(...) got unknown run facts {unknown}: use RunFacts field names such as "
            "max_steps, learning_rate, num_train_epochs, train_examples"
        )
    return RunFacts(**run)


def read_model(model: Any, optimizer: Any = None, **run: Any) -> RunFacts:
    """Reads a live PEFT model (and its optimizer) into run facts for a :class:`Doctor`.

    :class:`LoopDoctor` does this for you and follows the adapter through the first steps too; this
    reads the set-up only.

    Args:
        model: the model being trained: a ``peft.PeftModel``, possibly wrapped (DDP, FSDP,
            DeepSpeed, ``accelerator.prepare``).
        optimizer: the optimizer, to check that it holds every trainable LoRA parameter.
        **run: other facts of the run, by their :class:`~lora_doctor.facts.RunFacts` name:
            ``max_steps`` (the planned optimizer steps: the curve checks judge progress against
            it), ``learning_rate`` (the peak rate), ``num_train_epochs``, ``train_examples`` ...

    Returns:
        The facts: adapters and their configuration, LoRA layers with true shapes, parameter
        counts, which trainable LoRA parameters the optimizer lacks, and ``run``'s values.

    Raises:
        ValueError: a keyword of ``run`` is no field of RunFacts.

    Example:
        >>> facts = read_model(peft_model, optimizer, max_steps=200, learning_rate=2e-4)  # doctest: +SKIP
        >>> doctor = Doctor(facts=facts)  # doctest: +SKIP
    """
    facts = _run_facts(run, "read_model")
    view = ModelView.build(model, optimizer)
    facts_from_view(view, facts)
    read_setup(facts.setup, view, None, optimizer, max_steps=facts.max_steps)
    return facts


def guarded_hook(hook: _F) -> _F:
    """Runs an adapter's hook so that no error of the doctor's reaches the training loop.

    A hook that raises is said once (with the traceback, for a bug report) and switched off for
    the rest of the run; when ``on_train_start`` fails, every hook but the end's is off (the
    findings so far are still written). numpy's floating-point warnings stay inside the doctor.
    The adapter keeps the switched-off hooks' names in ``self._off`` and the failed start in
    ``self._broken``. With a time budget (``self._budget``, made by ``on_train_start``), the
    hook's time is charged to it at the optimizer step ``self._budget_step``.
    """
    name = hook.__name__

    @functools.wraps(hook)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        if name in self._off or (self._broken and name not in _ALWAYS):
            return None
        budget: TimeBudget | None = getattr(self, "_budget", None)
        since = budget.clock() if budget is not None else None
        try:
            with np.errstate(all="ignore"):
                return hook(self, *args, **kwargs)
        except Exception:
            if name == "on_train_start":
                self._broken = True
            self._off.add(name)
            logger.warning(
                "lora-doctor: internal error in %s; %s is switched off for the rest of the run "
                "(the findings so far are still written at the end), training is not affected.",
                name.strip("_"),
                "the doctor" if self._broken else name.strip("_"),
                exc_info=True,
            )
            return None
        finally:  # on_train_start makes the budget: its time counts from the budget's start
            step = getattr(self, "_budget_step", 0)
            charge_hook(getattr(self, "_budget", None), since, step, began=name == "on_train_start")

    return wrapper  # type: ignore[return-value]


#: The hooks (and parts of them) that still run after ``on_train_start`` failed: the end's.
_ALWAYS = frozenset({"_end_checks", "_record_error", "on_train_end", "on_exception"})


class LoopDoctor:
    """Diagnoses a LoRA run in a training loop of your own: the Trainer callback's checks, probes
    and JSON, driven by hooks named after Lightning's.

    Call ``on_before_optimizer_step()`` once per optimizer step, after ``backward`` (and after
    unscaling or clipping) and before ``optimizer.step()``: the first steps' checks read the
    adapters' gradients there. Call ``on_train_batch_end(metrics)`` after the optimizer step,
    with the metrics at the steps you log (``None`` between them): they feed the curve checks, and
    the memory and spectrum probes add their readings. ``with doctor:`` calls ``on_train_start``
    before the loop, and ``on_train_end`` after it, or ``on_exception`` when the loop dies (the
    error goes on unchanged). Every hook returns the findings it made (each is also logged once
    through the ``lora_doctor`` logger on the main process).

    Call the hooks on every process of a multi-process run (DDP, FSDP, DeepSpeed through
    Accelerate): the main process logs and writes the JSON. The hooks never synchronize the device
    except during the first ``check_after_steps`` steps, at the steps you log (one memory reading),
    and at spectrum readings (sharded adapters are gathered there: a collective, so every process
    must call the hooks at the same steps).

    The time budget (``DoctorConfig.time_budget``, 0.5% of the training's wall time) holds as in
    the Trainer callback in a single process: every hook's time is charged to it, and each planned
    spectrum reading reads as many layers as it leaves room for (the diagnosis's
    ``run.overhead`` says what was spent). With several processes the callback exchanges their
    timings at every log so that all take the same reading decision (a reading of sharded
    adapters is a collective); a loop doctor has no such exchange, so there it reads every
    planned reading in full (about ``spectrum_every_fraction`` of the run, and at the end; 60-90
    ms for 112 layers on an H200, BENCHMARKS.md); ``DoctorConfig(spectrum=False)`` switches the
    readings off.

    In a Lightning Fabric loop, build the doctor from the model and optimizer that
    ``fabric.setup`` returns and call the hooks as in any loop.

    Args:
        model: the model being trained: a ``peft.PeftModel``, possibly wrapped (DDP, FSDP,
            DeepSpeed, ``accelerator.prepare``).
        optimizer: its optimizer (possibly ``accelerator.prepare``'d): checked to hold every
            trainable LoRA parameter; its learning rate is logged with the metrics.
        report_path: where the diagnosis JSON goes; none is written when None.
        config: thresholds and switches (a :class:`~lora_doctor.DoctorConfig` or a dict of its
            fields); defaults when None.
        train_dataloader: the training data loader: its dataset's size and supervised tokens feed
            the rank-capacity evidence.
        memory_reader: reads device memory; the CUDA allocator's counters when None.
        extra_checks: your own :class:`~lora_doctor.checks.Check` classes.
        is_main: whether this process logs and writes; torch.distributed's rank 0 when None.
        **run: facts of the run by their :class:`~lora_doctor.facts.RunFacts` name: ``max_steps``
            (the planned optimizer steps, which the curve checks judge progress against),
            ``learning_rate`` (the peak rate), ``num_train_epochs`` ...

    Raises:
        ValueError: an option of the wrong type, or a keyword that is no RunFacts field.

    Example:
        >>> doctor = LoopDoctor(model, optimizer, max_steps=200, report_path="out/lora_doctor.json")  # doctest: +SKIP
        >>> with doctor:  # doctest: +SKIP
        ...     for step, batch in enumerate(loader, 1):
        ...         loss = model(**batch).loss
        ...         loss.backward()
        ...         doctor.on_before_optimizer_step()
        ...         optimizer.step()
        ...         optimizer.zero_grad()
        ...         doctor.on_train_batch_end({"loss": loss.item()} if step % 10 == 0 else None)
    """

    def __init__(
        self,
        model: Any,
        optimizer: Any = None,
        *,
        report_path: str | os.PathLike[str] | None = None,
        config: DoctorConfig | Mapping[str, Any] | None = None,
        train_dataloader: Any = None,
        memory_reader: MemoryReader | None = None,
        extra_checks: Iterable[type[Check]] = (),
        is_main: bool | None = None,
        **run: Any,
    ) -> None:
        if isinstance(config, Mapping):
            config = DoctorConfig(**config)
        if report_path is not None and not isinstance(report_path, (str, os.PathLike)):
            raise ValueError(
                f"LoopDoctor(report_path=...) must be a file path or None (no file), got "
                f"{report_path!r}"
            )
        self.model = model
        self.optimizer = optimizer
        self.report_path = Path(report_path) if report_path is not None else None
        self.train_dataloader = train_dataloader
        self.is_main = dist.is_main() if is_main is None else bool(is_main)
        self.doctor = Doctor(
            config,
            _run_facts(run, "LoopDoctor"),
            emit=self.is_main,
            extra_checks=extra_checks,
        )
        self.diagnosis: Diagnosis | None = None
        self._probes = default_probes(self.doctor.config, memory_reader)
        self._args = SimpleNamespace(device=_device_of(model), output_dir=None)
        self._saved: Mapping[str, Any] | None = None
        self._optimizer_steps = 0
        self._batches = 0
        self._stepped = 0
        self._first_steps_done = False
        self._since: float | None = None
        self._broken = False
        self._off: set[str] = set()
        #: The run's account of the doctor's time (made by on_train_start; one process only).
        self._budget: TimeBudget | None = None

    @property
    def _budget_step(self) -> int:
        """The optimizer step the doctor's time is charged at."""
        return max(self._optimizer_steps, self._stepped)

    # --- hooks ------------------------------------------------------------------------------------
    @guarded_hook
    def on_train_start(self) -> list[Finding]:
        """Reads the model, the optimizer and the set-up, and runs the set-up checks."""
        doctor = self.doctor
        self._since = time.time()
        if self._saved is not None:  # resumed: findings, facts and history from the checkpoint
            doctor.restore_state(self._saved.get("doctor", {}), self._saved.get("history", ()))
            self._optimizer_steps = self._stepped = doctor.step
        self._first_steps_done = doctor.step >= doctor.config.check_after_steps
        facts = doctor.facts
        facts.world_size = dist.world_size()
        if facts.world_size == 1:  # see the class docstring: no exchange between processes
            self._budget = TimeBudget(
                doctor.config.time_budget,
                start_step=doctor.step,
                first_steps=doctor.config.check_after_steps,
            )
            facts.overhead = self._budget.facts
        if facts.learning_rate is None:
            facts.learning_rate = peak_learning_rate(self.optimizer)
        dataset = getattr(self.train_dataloader, "dataset", None)
        if facts.train_examples is None and dataset is not None:
            with contextlib.suppress(TypeError):  # an IterableDataset has no length
                facts.train_examples = len(dataset)
        call_probes(self._probes, "train_begin", self._event(doctor.step))
        return doctor.run_phase(Phase.SETUP, doctor.step)

    @guarded_hook
    def on_before_optimizer_step(self) -> None:
        """Gradients exist and the optimizer is about to apply them: call once per optimizer step
        (with gradient accumulation, only before the step that applies them)."""
        self._start_if_needed("on_before_optimizer_step")
        self._optimizer_steps += 1
        call_probes(self._probes, "pre_optimizer_step", self._event(self._optimizer_steps))

    @guarded_hook
    def on_train_batch_end(
        self, metrics: Mapping[str, Any] | None = None, *, step: int | None = None
    ) -> list[Finding]:
        """A batch has ended: runs the first-steps checks once the optimizer has made
        ``check_after_steps`` steps, and records ``metrics`` and runs the curve checks.

        Args:
            metrics: this step's metrics when you log them (``{"loss": 1.93, "grad_norm": 0.41}``;
                numbers or one-element tensors), None between logs. The optimizer's learning rate
                is added when ``learning_rate`` is missing.
            step: the optimizer steps done; by default the number of ``on_before_optimizer_step``
                calls (or, without them, of ``on_train_batch_end`` calls).

        Returns:
            The findings not reported before.
        """
        found = self._start_if_needed("on_train_batch_end")
        self._batches += 1
        step = int(step) if step is not None else self._optimizer_steps or self._batches
        if step > self._stepped:  # an optimizer step ended since the last call
            self._stepped = step
            call_probes(self._probes, "step_end", self._event(step))
            if not self._first_steps_done and step >= self.doctor.config.check_after_steps:
                self._first_steps_done = True
                if not self._optimizer_steps:
                    logger.warning(
                        "lora-doctor: on_before_optimizer_step() was never called, so the "
                        "first-steps checks could not read the adapters' gradients; call it "
                        "after backward and before optimizer.step()."
                    )
                found += self.doctor.run_phase(Phase.FIRST_STEPS, step)
        if metrics:
            logs = _numbers(metrics)
            if "learning_rate" not in logs and (lr := peak_learning_rate(self.optimizer)):
                logs["learning_rate"] = lr
            call_probes(self._probes, "log", self._event(step, logs))
            found += self.doctor.observe(step, logs)
        return found

    @guarded_hook
    def on_validation_end(
        self, metrics: Mapping[str, Any], *, step: int | None = None
    ) -> list[Finding]:
        """An evaluation has ended with ``metrics`` (``{"eval_loss": 1.7}``; a name without the
        ``eval_`` prefix gets it): records them and runs the evaluation checks (overfit ...).

        Returns:
            The findings not reported before.
        """
        step = self._stepped if step is None else int(step)
        logs = {
            k if k.startswith("eval_") else f"eval_{k}": v for k, v in _numbers(metrics).items()
        }
        if not logs:
            return []
        call_probes(self._probes, "evaluate", self._event(step, logs))
        return self.doctor.observe(step, logs)

    def on_train_end(self) -> Diagnosis:
        """Training has ended: reads the last spectrum, runs the end checks and writes the JSON
        (main process). Returns the diagnosis."""
        self._end_checks()
        return self._finish()

    def on_exception(self, error: BaseException) -> Diagnosis:
        """Training is dying of ``error``: records it (``out-of-memory`` for CUDA out-of-memory,
        else ``training-died`` with its cause when the doctor knows it), runs the end checks and
        writes the JSON; another process than the main one writes ``<report>.rank<N>.json``.
        The caller re-raises ``error`` unchanged (``with doctor:`` does). Returns the diagnosis."""
        self._record_error(error)
        return self._finish(rank=None if self.is_main else dist.rank())

    @guarded_hook
    def _end_checks(self) -> None:
        if not self._broken:
            call_probes(self._probes, "train_end", self._event(self._stepped))
        self.doctor.run_phase(Phase.END, self._stepped)

    @guarded_hook
    def _record_error(self, error: BaseException) -> None:
        if not self._broken:
            event = self._event(self._stepped)
            call_probes(self._probes, "train_failed", event, error)  # records out-of-memory
        if not is_out_of_memory(error):
            record_crash(
                self.doctor,
                error,
                self._stepped,
                model=self.model,
                report=self.report_path,
                since=self._since,
            )
        self.doctor.run_phase(Phase.END, self._stepped)

    # --- state ------------------------------------------------------------------------------------
    @property
    def should_stop(self) -> bool:
        """True once a finding named in ``config.stop_on`` was reported: stop the loop then."""
        return self.doctor.stop_reason is not None

    def state_dict(self) -> dict[str, Any]:
        """The doctor's state for a checkpoint (plain data): facts, findings reported, and the
        metrics recorded, so that a resumed run judges the whole curve and reports nothing twice.

        Example:
            >>> torch.save({"model": model.state_dict(), "doctor": doctor.state_dict()}, path)  # doctest: +SKIP
        """
        return {"doctor": self.doctor.export_state(), "history": self.doctor.history.entries}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Takes back a :meth:`state_dict`; applied by ``on_train_start``. Unknown keys are
        ignored."""
        self._saved = state if isinstance(state, Mapping) else None

    # --- context manager --------------------------------------------------------------------------
    def __enter__(self) -> LoopDoctor:
        self.on_train_start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if error is None:
            self.on_train_end()
        elif isinstance(error, (Exception, KeyboardInterrupt)):
            self.on_exception(error)

    # --- plumbing ---------------------------------------------------------------------------------
    def _start_if_needed(self, hook: str) -> list[Finding]:
        """Runs ``on_train_start`` when a step hook comes first (the loop has no ``with doctor:``),
        saying so once: the set-up checks then read the model after its first step."""
        if self._since is not None:
            return []
        logger.warning(
            "lora-doctor: %s() came before on_train_start(): the doctor starts now. Wrap the loop "
            "in `with doctor:` (or call on_train_start() before it and on_train_end() after it) so "
            "that the set-up checks see the model before the first step and the JSON is written.",
            hook,
        )
        return self.on_train_start() or []

    def _event(self, step: int, logs: dict[str, Any] | None = None) -> Event:
        """What a Trainer event would offer, from the loop's objects (the probes read this)."""
        state = SimpleNamespace(
            global_step=step,
            max_steps=self.doctor.facts.max_steps,
            is_world_process_zero=self.is_main,
        )
        return Event(
            doctor=self.doctor,
            args=self._args,
            state=state,
            model=self.model,
            optimizer=self.optimizer,
            logs=logs,
            kwargs={"train_dataloader": self.train_dataloader},
            budget=self._budget,
        )

    def _finish(self, rank: int | None = None) -> Diagnosis:
        """The diagnosis, written to ``report_path`` by the main process (or, with ``rank``, by
        another process to its rank file); never raises: a file that cannot be written is said
        in one line."""
        self.diagnosis = diagnosis = self.doctor.diagnosis("live")
        path = self.report_path
        if path is None or not (self.is_main or rank is not None):
            return diagnosis
        path = rank_report_path(path, rank) if rank is not None else path
        with writing_report(path):
            diagnosis.to_json(path)
            logger.info("lora-doctor: diagnosis written to %s", path)
        return diagnosis


def _device_of(model: Any) -> Any:
    """The device of the model's first parameter (None when it has none or is no module)."""
    try:
        return next(iter(model.parameters())).device
    except (AttributeError, StopIteration, TypeError):
        return None


def _numbers(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The metrics with one-element tensors (and numpy scalars) as Python numbers; other values
    as they are (the history ignores what is not a number)."""
    out: dict[str, Any] = {}
    for key, value in metrics.items():
        item = getattr(value, "item", None)
        if callable(item):
            with contextlib.suppress(TypeError, ValueError, RuntimeError):  # several elements
                value = item()
        out[str(key)] = value
    return out
