"""``watch``: the explicit form of the callback's crash report, for notebooks and custom loops."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

from lora_doctor.checks import Phase
from lora_doctor.engine import Doctor
from lora_doctor.probes.crash import record_crash
from lora_doctor.probes.memory import MemoryReader, record_out_of_memory

__all__ = ["watch"]

logger = logging.getLogger("lora_doctor")


def _callback_of(target: Any) -> Any:
    """The LoraDoctorCallback that ``target`` is or holds, else None."""
    from lora_doctor.integrations.hf import LoraDoctorCallback

    if isinstance(target, LoraDoctorCallback):
        return target
    handler = getattr(target, "callback_handler", None)
    for cb in getattr(handler, "callbacks", ()) or ():
        if isinstance(cb, LoraDoctorCallback):
            return cb
    return None


@contextlib.contextmanager
def watch(
    target: Any,
    report_path: str | os.PathLike[str] | None = None,
    *,
    memory_reader: MemoryReader | None = None,
) -> Iterator[None]:
    """Records an error that ends training in the diagnosis (``out-of-memory`` for CUDA
    out-of-memory, else ``training-died`` with its cause when the doctor knows it), writes it, and
    lets the error go on unchanged.

    The callback already does this for ``trainer.train()``; use ``watch`` where that does not
    reach: a notebook cell that calls ``trainer.evaluate()``, or a custom loop that feeds a
    :class:`~lora_doctor.engine.Doctor` itself.

    Args:
        target: a ``transformers.Trainer`` holding a ``LoraDoctorCallback``, the callback itself,
            or a :class:`~lora_doctor.engine.Doctor` (custom loops).
        report_path: where a Doctor's diagnosis JSON goes (required with a Doctor; a Trainer's
            callback writes where it always does, set with ``LoraDoctorCallback(report_path=...)``).
        memory_reader: reads device memory for a Doctor (the CUDA allocator when None).

    Raises:
        ValueError: when ``target`` is none of those, a Doctor comes without ``report_path``, or
            a Trainer or callback comes with one.

    Example:
        >>> with lora_doctor.watch(trainer):  # doctest: +SKIP
        ...     trainer.evaluate()
        >>> doctor = Doctor()  # a custom loop
        >>> with lora_doctor.watch(doctor, report_path="run/lora_doctor.json"):  # doctest: +SKIP
        ...     for step, batch in enumerate(loader, 1):
        ...         loss = train_step(batch)
        ...         doctor.observe(step, {"loss": loss.item()})
    """
    is_doctor = isinstance(target, Doctor)
    callback = None if is_doctor else _callback_of(target)
    if callback is None and not is_doctor:
        raise ValueError(
            "lora_doctor.watch(target) needs a Trainer built with callbacks=[LoraDoctorCallback()], "
            f"a LoraDoctorCallback or a lora_doctor Doctor, got {type(target).__name__}"
        )
    if is_doctor and report_path is None:
        raise ValueError(
            "lora_doctor.watch(doctor, report_path=...) needs report_path with a Doctor (a custom "
            "loop has no output_dir), got None"
        )
    if not is_doctor and report_path is not None:
        raise ValueError(
            "lora_doctor.watch(trainer, report_path=...): a Trainer's callback writes where it "
            f"always does; set LoraDoctorCallback(report_path=...) instead, got {report_path!r}"
        )
    try:
        yield
    except (Exception, KeyboardInterrupt) as exc:
        if callback is not None:
            trainer = None if target is callback else target
            callback.record_failure(exc, trainer)
        else:
            _record(target, exc, report_path, memory_reader)
        raise


def _record(
    doctor: Doctor,
    exc: BaseException,
    report_path: str | os.PathLike[str] | None,
    reader: MemoryReader | None,
) -> None:
    """Records ``exc`` in a custom loop's doctor (out-of-memory, else the crash for
    ``training-died``), runs the END checks and writes the diagnosis; never raises."""
    try:
        if not record_out_of_memory(doctor, exc, doctor.step, reader):
            record_crash(doctor, exc, doctor.step)
        doctor.run_phase(Phase.END, doctor.step)
        if report_path is not None:
            doctor.diagnosis("live").to_json(report_path)
    except Exception:
        logger.warning(
            "lora-doctor: could not record the error that ended training; the error itself goes "
            "on unchanged.",
            exc_info=True,
        )
