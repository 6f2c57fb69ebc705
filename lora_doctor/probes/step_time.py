"""Each rank's wall time per optimizer step, as min/max over ranks at each log."""

from __future__ import annotations

import time

from lora_doctor.probes.base import Event, Probe

__all__ = ["StepTimeProbe"]


class StepTimeProbe(Probe):
    """Each rank's wall time per optimizer step, reported as min/max over ranks at each log.

    Reads only the host clock (no device sync): over a logging interval the average is the true
    step time, since the optimizer step waits for the device. A rank much slower than the others
    (data loading, a slower GPU, a thermal throttle) holds every other rank back in DDP and FSDP.
    Adds ``lora_doctor/step_seconds_min`` and ``_max`` to the logs when there are several ranks.
    """

    name = "step_time"

    def __init__(self) -> None:
        self._last: float | None = None
        self._total = 0.0
        self._steps = 0

    def train_begin(self, event: Event) -> None:
        self._last = time.perf_counter()

    def step_end(self, event: Event) -> None:
        now = time.perf_counter()
        if self._last is not None:
            self._total += now - self._last
            self._steps += 1
        self._last = now
        if event.ranks is not None and self._steps:
            event.ranks.put("step_seconds", self._total / self._steps)

    def log(self, event: Event) -> None:
        spread = event.ranks.spread.get("step_seconds") if event.ranks is not None else None
        if spread is not None and spread.ranks > 1 and event.logs is not None:
            event.logs["lora_doctor/step_seconds_min"] = spread.min
            event.logs["lora_doctor/step_seconds_max"] = spread.max
        self._total, self._steps = 0.0, 0
