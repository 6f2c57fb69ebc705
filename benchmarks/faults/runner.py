"""Runs one real training job with ``LoraDoctorCallback`` and collects what the doctor reported.

The findings are read from the diagnosis file the doctor writes (``<output_dir>/lora_doctor.json``,
the public contract). When a run dies before that file is written, the findings the doctor had
already logged are taken from the callback itself and the outcome says the file was missing: the
scorer counts those runs so that a missing report is seen, not hidden.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from peft import LoraConfig
from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments
from transformers.utils import logging as hf_logging

from benchmarks.faults.score import Finding
from lora_doctor import DoctorConfig, LoraDoctorCallback
from lora_doctor.report import REPORT_NAME

__all__ = [
    "Outcome",
    "Spec",
    "lora_config",
    "map_runs",
    "plan_runs",
    "quiet_doctor",
    "set_up_process",
    "train",
    "training_args",
]


T = TypeVar("T")


@dataclass(frozen=True)
class Spec:
    """Where and how one benchmark run trains.

    Attributes:
        arch: the tiny model's architecture (``"llama"`` or ``"gpt2"``).
        seed: seeds the weights, the data and the Trainer.
        workdir: an empty folder for this run's outputs.
        device: ``"cpu"`` or ``"cuda"``.
        lora_changes: ``LoraConfig`` fields to set over the scenario's own (the fix loop's
            re-run: the changes ``Diagnosis.apply`` made); every LoraConfig the run builds
            through :func:`lora_config` gets them.
        training_changes: ``TrainingArguments`` fields to set over the scenario's own, likewise
            through :func:`training_args`.
    """

    arch: str
    seed: int
    workdir: Path
    device: str = "cpu"
    lora_changes: Mapping[str, Any] = field(default_factory=dict)
    training_changes: Mapping[str, Any] = field(default_factory=dict)


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
        report: the diagnosis file's content (None when it was not written).
        lora_config: the run's ``LoraConfig`` (None when the model has no peft config).
        training_args: the run's ``TrainingArguments``.
        eval_loss: the loss of the model the run ended with on its evaluation set (with
            ``load_best_model_at_end``, the best checkpoint's), measured after training with the
            doctor detached; None without an evaluation set or when the run died.
    """

    findings: list[Finding] = field(default_factory=list)
    onset: int = 0
    steps: int = 0
    error: str | None = None
    report_written: bool = False
    internal_errors: list[str] = field(default_factory=list)
    log_history: list[dict[str, Any]] = field(default_factory=list)
    report: dict[str, Any] | None = None
    lora_config: Any = None
    training_args: Any = None
    eval_loss: float | None = None


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


def _read_report(path: Path, callback: LoraDoctorCallback) -> tuple[dict[str, Any], bool]:
    """The report file's content, or the callback's findings when the file is missing."""
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8")), True
    doctor = callback.doctor
    return {"findings": [f.to_dict() for f in doctor.findings] if doctor is not None else []}, False


def _findings(report: Mapping[str, Any], start: int) -> list[Finding]:
    """The report's findings as the scorer sees them, each with its first-ranked cause and that
    cause's verdict (``evidence.causes[0]``) when it ranks causes.

    A finding without a step (made before the first step) counts at ``start``, the step this
    training job began at (0, or the step of the checkpoint it resumed).

    Example:
        >>> causes = [{"cause": "learning-rate-too-low", "verdict": "supported"}]
        >>> flat = {"slug": "loss-plateau", "severity": "warning", "step": 50,
        ...         "evidence": {"causes": causes}}
        >>> _findings({"findings": [flat]}, 0)[0].cause
        'learning-rate-too-low'
    """
    out = []
    for f in report.get("findings", []):
        causes = (f.get("evidence") or {}).get("causes") or [{}]
        top = causes[0]
        out.append(
            Finding(
                slug=str(f["slug"]),
                severity=str(f["severity"]),
                step=start if f.get("step") is None else int(f["step"]),
                cause=None if top.get("cause") is None else str(top["cause"]),
                verdict=None if top.get("verdict") is None else str(top["verdict"]),
            )
        )
    return out


def lora_config(spec: Spec, **kwargs: Any) -> LoraConfig:
    """``LoraConfig(**kwargs)`` with ``spec.lora_changes`` set over ``kwargs``.

    Example:
        >>> lora_config(Spec("llama", 0, Path("/tmp/x"), lora_changes={"r": 4}), r=8).r
        4
    """
    return LoraConfig(**{**kwargs, **spec.lora_changes})


def training_args(
    spec: Spec,
    output_dir: Path,
    args_cls: Callable[..., TrainingArguments] = TrainingArguments,
    **overrides: Any,
) -> TrainingArguments:
    """The benchmark's usual Trainer arguments; ``overrides`` replace any of them; ``args_cls``
    builds them (a subclass such as TRL's ``GRPOConfig``), and ``spec.training_changes`` replace
    those.

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
    kwargs.update(spec.training_changes)
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
    outcome.report, outcome.report_written = _read_report(output_dir / REPORT_NAME, doctor)
    outcome.findings = _findings(outcome.report, start)
    outcome.internal_errors = collected.lines
    outcome.steps = int(trainer.state.global_step)
    outcome.log_history = list(trainer.state.log_history)
    outcome.training_args = args
    peft_config = getattr(model, "peft_config", None)
    if isinstance(peft_config, Mapping) and peft_config:
        outcome.lora_config = next(iter(peft_config.values()))
    if eval_data is not None and outcome.error is None:
        trainer.remove_callback(doctor)  # the measurement is not part of the diagnosed run
        outcome.eval_loss = float(trainer.evaluate()["eval_loss"])
    return outcome


def set_up_process(threads: int) -> None:
    """What every process that trains benchmark runs sets first: ``threads`` torch CPU threads
    (on a machine shared by several runs, more threads than cores spin against each other) and
    transformers' warnings off."""
    torch.set_num_threads(threads)
    hf_logging.set_verbosity_error()


def _timed(fn: Callable[..., T], *args: Any) -> tuple[T, float]:
    start = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - start


def plan_runs(
    scenarios: Sequence[Any], archs: Sequence[str], seeds: Sequence[int], workdir: Path, device: str
) -> list[tuple[Any, Spec]]:
    """Every (scenario, spec) pair to run, scenario by scenario, then architecture, then seed; each
    run gets the folder ``<workdir>/<scenario>/<arch>-s<seed>``.

    Example:
        >>> from types import SimpleNamespace
        >>> [spec.workdir.name for _, spec in plan_runs([SimpleNamespace(name="a")], ["llama"], [0, 1], Path("w"), "cpu")]
        ['llama-s0', 'llama-s1']
    """
    return [
        (scenario, Spec(arch, seed, workdir / scenario.name / f"{arch}-s{seed}", device))
        for scenario in scenarios
        for arch in archs
        for seed in seeds
    ]


def map_runs(
    fn: Callable[..., T],
    runs: Sequence[tuple[Any, ...]],
    jobs: int = 1,
    threads: int = 1,
    done: Callable[[tuple[Any, ...], T, float], None] | None = None,
) -> list[T]:
    """``[fn(*args) for args in runs]``, in ``jobs`` worker processes when ``jobs`` > 1.

    The workers are started with the ``"spawn"`` method (a fork of a process that has run torch
    can deadlock in its thread pools) and each calls :func:`set_up_process` with ``threads``. The
    results come back in the order of ``runs`` whatever order the runs finish in, so a table built
    from them does not depend on ``jobs``.

    Args:
        fn: one run; with ``jobs`` > 1, a module-level function (the workers import it by name),
            whose arguments and result pickle.
        runs: the arguments of each call.
        jobs: worker processes; 1 runs everything in this process, one after the other.
        threads: torch CPU threads per worker (this process's own setting is left alone).
        done: called in this process as each run finishes (in finishing order) with its
            arguments, its result and the seconds it took: progress lines.

    Raises:
        ValueError: ``jobs`` below 1.
        Exception: whatever ``fn`` raised, for the first failed run in the order of ``runs``.

    Example:
        >>> map_runs(pow, [(2, 3), (3, 2)])
        [8, 9]
    """
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    results: dict[int, T] = {}

    def finished(i: int, result: T, seconds: float) -> None:
        results[i] = result
        if done is not None:
            done(runs[i], result, seconds)

    if jobs == 1:
        for i, args in enumerate(runs):
            finished(i, *_timed(fn, *args))
        return [results[i] for i in range(len(runs))]
    context = multiprocessing.get_context("spawn")
    failed: dict[int, BaseException] = {}
    with ProcessPoolExecutor(
        jobs, context, initializer=set_up_process, initargs=(threads,)
    ) as pool:
        futures = {pool.submit(_timed, fn, *args): i for i, args in enumerate(runs)}
        for future in as_completed(futures):
            error = future.exception()
            if error is not None:
                failed[futures[future]] = error
            else:
                finished(futures[future], *future.result())
    if failed:
        raise failed[min(failed)]
    return [results[i] for i in range(len(runs))]
