"""Keeps the doctor's metrics out of the log lines the Trainer prints, not out of the trackers.

The Trainer hands one logs dict to every callback in turn. The doctor adds its ``lora_doctor/...``
metrics to it early (it places itself before the reporting callbacks), so that TensorBoard, W&B,
MLflow and the others record them; but the callbacks that print the dict (transformers'
``ProgressCallback`` through ``tqdm.write``, ``PrinterCallback`` with ``disable_tqdm=True``, TRL's
``RichProgressCallback``) would print them too: some 1,750 characters a line with the spectrum's
per-kind metrics. Each printer's ``on_log`` is therefore wrapped, on that instance only, so that it
sees the dict without the doctor's keys; they are put back right after it returns. The printer
gets the very dict the Trainer passed (what it changes in it, such as ``PrinterCallback`` popping
``total_flos``, stays changed, as without the doctor), and callbacks after it, in any order, still
see the doctor's metrics.
"""

from __future__ import annotations

from typing import Any

from transformers.trainer_callback import PrinterCallback, ProgressCallback

__all__ = ["PREFIX", "hide_from_printers"]

#: The prefix of every metric the doctor adds to the Trainer's logs.
PREFIX = "lora_doctor/"

#: Printing callbacks of packages that are not a dependency, known by class name.
_PRINTER_NAMES = frozenset({"RichProgressCallback"})  # TRL


class _WithoutDoctorMetrics:
    """A printer's ``on_log`` that is called without the doctor's metrics in the logs dict."""

    def __init__(self, on_log: Any) -> None:
        self.on_log = on_log

    def __call__(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> Any:
        hidden: dict[str, Any] = {}
        if isinstance(logs, dict):
            for key in [k for k in logs if isinstance(k, str) and k.startswith(PREFIX)]:
                hidden[key] = logs.pop(key)
        try:
            return self.on_log(args, state, control, logs=logs, **kwargs)
        finally:
            if hidden:
                logs.update(hidden)


def _is_printer(callback: Any) -> bool:
    return isinstance(callback, (ProgressCallback, PrinterCallback)) or (
        type(callback).__name__ in _PRINTER_NAMES
    )


def hide_from_printers(handler: Any) -> None:
    """Wraps the ``on_log`` of every printing callback of a Trainer's callback handler (once).

    Example:
        >>> hide_from_printers(trainer.callback_handler)  # doctest: +SKIP
    """
    for callback in list(getattr(handler, "callbacks", None) or ()):
        on_log = getattr(callback, "on_log", None)
        if not _is_printer(callback) or isinstance(on_log, _WithoutDoctorMetrics):
            continue
        try:
            callback.on_log = _WithoutDoctorMetrics(on_log)
        except AttributeError:  # a printer with __slots__: left as it is
            continue
