"""Runs one real training job with ``LoraDoctorCallback`` and collects what the doctor reported.

The findings are read from the diagnosis file the doctor writes (``<output_dir>/lora_doctor.json``,
the public contract). When a run dies before that file is written, the findings the doctor had
already logged are taken from the callback itself and the outcome says the file was missing: the
scorer counts those runs so that a missing report is seen, not hidden.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments

from benchmarks.faults.score import Finding
from lora_doctor import DoctorConfig, LoraDoctorCallback

__all__ = ["Outcome", "Spec", "quiet_doctor", "train", "training_args"]

REPORT_NAME = "lora_doctor.json"


@dataclass(frozen=True)
class Spec:
    """Where and how one benchmark run trains.

    Attributes:
        arch: the tiny model's architecture (``"llama"`` or ``"gpt2"``).
        seed: seeds the weights, the data and the Trainer.
        workdir: an empty folder for this run's outputs.
        device: ``"cpu"`` or ``"cuda"``.
    """

    arch: str
    seed: int
    workdir: Path
    device: str = "cpu"


@dataclass
class Outcome:
    """What one run produced.

    Attributes:
        findings: every finding the doctor reported, in order.
        onset: the step at which the fault began (0 for a mistake made before training).
        steps: the optimizer steps the run completed.
        error: ``"ExceptionType: message"`` when the run died, else None.
        report_written: whether ``lora_doctor.json`` was there after the run.
        internal_errors: the doctor's own internal-error log lines (should be none).
        log_history: the Trainer's log history (the overfit run reads its best evaluation).
    """

    findings: list[Finding] = field(default_factory=list)
    onset: int = 0
    steps: int = 0
    error: str | None = None
    report_written: bool = False
    internal_errors: list[str] = field(default_factory=list)
    log_history: list[dict[str, Any]] = field(default_factory=list)


class _Collect(logging.Handler):
    """Keeps the doctor's internal-error lines; findings themselves are read from the report."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "internal error" in message:
            self.lines.append(message)


@contextmanager
def quiet_doctor(verbose: bool = False) -> Iterator[_Collect]:
    """Collects the doctor's internal-error lines; hides its finding lines unless ``verbose``.

    Example:
        >>> with quiet_doctor() as collected:
        ...     pass
        >>> collected.lines
        []
    """
    logger = logging.getLogger("lora_doctor")
    handler = _Collect()
    old_propagate, old_level = logger.propagate, logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO if verbose else logging.WARNING)
    logger.propagate = verbose
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield handler
    finally:
        logger.removeHandler(handler)
        logger.propagate, logger.level = old_propagate, old_level


def _read_findings(
    path: Path, callback: LoraDoctorCallback, start: int
) -> tuple[list[Finding], bool]:
    """The findings from the report file, or from the callback when the file is missing.

    A finding without a step (made before the first step) counts at ``start``, the step this
    training job began at (0, or the step of the checkpoint it resumed).
    """
    if path.is_file():
        raw = json.loads(path.read_text(encoding="utf-8")).get("findings", [])
        written = True
    else:
        doctor = callback.doctor
        raw = [f.to_dict() for f in doctor.findings] if doctor is not None else []
        written = False
    return [
        Finding(
            slug=str(f["slug"]),
            severity=str(f["severity"]),
            step=start if f.get("step") is None else int(f["step"]),
        )
        for f in raw
    ], written


def training_args(
    spec: Spec,
    output_dir: Path,
    args_cls: Callable[..., TrainingArguments] = TrainingArguments,
    **overrides: Any,
) -> TrainingArguments:
    """The benchmark's usual Trainer arguments; ``overrides`` replace any of them; ``args_cls``
    builds them (a subclass such as TRL's ``GRPOConfig``).

    100 steps of 16 sequences at learning rate 2e-3 (a tiny model with a LoRA adapter wants a
    higher rate than the 1e-4 to 5e-4 of a 7B model), logged every 5 steps, nothing saved.
    """
    kwargs: dict[str, Any] = {
        "output_dir": str(output_dir),
        "max_steps": 100,
        "per_device_train_batch_size": 16,
        "per_device_eval_batch_size": 32,
        "learning_rate": 2e-3,
        "logging_steps": 5,
        "save_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        "seed": spec.seed,
        "data_seed": spec.seed,
        "use_cpu": spec.device == "cpu",
        "dataloader_num_workers": 0,
    }
    kwargs.update(overrides)
    return args_cls(**kwargs)


def train(
    spec: Spec,
    model: Any,
    train_data: Sequence[Any],
    *,
    eval_data: Sequence[Any] | None = None,
    onset: int = 0,
    resume_from: str | None = None,
    trainer_cls: Callable[..., Trainer] = Trainer,
    args_cls: Callable[..., TrainingArguments] = TrainingArguments,
    callbacks: Sequence[TrainerCallback] = (),
    optimizers: tuple[Any, Any] = (None, None),
    name: str = "run",
    verbose: bool = False,
    **overrides: Any,
) -> Outcome:
    """Trains ``model`` with ``LoraDoctorCallback()`` and returns what the doctor found.

    The doctor runs with its defaults but one: no time budget (``time_budget=None``). These models
    take milliseconds a step, where the doctor's fixed costs alone exceed the default 0.5% of the
    wall time and the spectrum would never be read; this benchmark judges what the checks find,
    ``benchmarks/overhead.py`` what the doctor costs.

    Args:
        spec: the run's architecture, seed, folder and device.
        model: the (PEFT) model, set up with or without the fault.
        train_data: training examples (dicts of tensors).
        eval_data: evaluation examples, if the run evaluates.
        onset: the step at which the fault begins.
        resume_from: a checkpoint folder to resume from.
        trainer_cls: builds the Trainer from its keyword arguments (a subclass, or a partial).
        args_cls: builds its arguments (``TrainingArguments``, or a subclass such as TRL's).
        callbacks: extra callbacks, placed before the doctor's.
        optimizers: the Trainer's ``optimizers`` (an optimizer built by hand, and a scheduler).
        name: the sub-folder of ``spec.workdir`` for this training job.
        verbose: show the doctor's log lines.
        **overrides: TrainingArguments to change (see :func:`training_args`).

    Example:
        >>> outcome = train(spec, peft_model, data)  # doctest: +SKIP
        >>> [f.slug for f in outcome.findings]  # doctest: +SKIP
    """
    output_dir = spec.workdir / name
    args = training_args(spec, output_dir, args_cls, **overrides)
    doctor = LoraDoctorCallback(config=DoctorConfig(time_budget=None))
    outcome = Outcome(onset=onset)
    with quiet_doctor(verbose) as collected:
        trainer = trainer_cls(
            model=model,
            args=args,
            train_dataset=train_data,
            eval_dataset=eval_data,
            callbacks=[*callbacks, doctor],
            optimizers=optimizers,
        )
        trainer.remove_callback(PrinterCallback)  # disable_tqdm prints every log dict instead
        try:
            trainer.train(resume_from_checkpoint=resume_from)
        except Exception as err:  # the fault may kill the run: that is an outcome, not a bug
            outcome.error = (
                f"{type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}"
            )
    start = 0
    if resume_from is not None:
        saved = json.loads((Path(resume_from) / "trainer_state.json").read_text(encoding="utf-8"))
        start = int(saved.get("global_step", 0))
    outcome.findings, outcome.report_written = _read_findings(
        output_dir / REPORT_NAME, doctor, start
    )
    outcome.internal_errors = collected.lines
    outcome.steps = int(trainer.state.global_step)
    outcome.log_history = list(trainer.state.log_history)
    return outcome
