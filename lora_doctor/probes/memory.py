"""CUDA memory readings: the allocator's counters at each logging interval, never a device sync.

A reading is one call to ``torch.cuda.memory_stats_as_nested_dict`` (peaks, current bytes,
allocator retries and out-of-memory count: host-side counters of the caching allocator) and one
``cudaMemGetInfo`` (capacity and free memory, a driver query that does not wait for the GPU). It
resets nothing: the peak counters are the user's (a script's own ``torch.cuda.max_memory_allocated()``
after training reports the run's true peak, with or without the doctor), so a reading's peak is the
allocator's peak since the process started or since whoever last reset it (the Trainer's own memory
metrics, ``skip_memory_metrics=False``, reset it when ``train`` starts). The reader is injectable:
tests script readings, another accelerator can bring its own.

On a machine without CUDA, ``torch.cuda.is_available()`` is asked once and nothing else of
``torch.cuda`` is touched (CPU torch's CUDA functions raise).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from lora_doctor.checks.memory import (
    KEY_ALLOC,
    KEY_ALLOC_RETRIES,
    KEY_CAPACITY,
    KEY_FREE,
    KEY_HEADROOM,
    KEY_OOMS,
    KEY_PEAK_ALLOC,
    KEY_PEAK_RESERVED,
)
from lora_doctor.facts import MemoryFacts
from lora_doctor.memory_estimate import GIB, estimates_by_rank
from lora_doctor.probes.base import Event, Probe

if TYPE_CHECKING:
    from lora_doctor.engine import Doctor
    from lora_doctor.probes.view import ModelView

logger = logging.getLogger("lora_doctor")

__all__ = [
    "CudaMemoryReader",
    "MemoryProbe",
    "MemoryReader",
    "MemoryReading",
    "is_out_of_memory",
    "record_out_of_memory",
]


@dataclass(frozen=True)
class MemoryReading:
    """One reading of a device's memory, in bytes (counts for retries and OOMs).

    Attributes:
        device: the device read, e.g. ``"cuda:0"``.
        peak_allocated: peak memory allocated to tensors: the allocator's peak, which the doctor
            never resets (since the process started, or since the user or the Trainer reset it).
        peak_reserved: peak memory the caching allocator held from the device, likewise.
        allocated: memory allocated to tensors now (read after an optimizer step: what the run
            holds between steps, which a leak makes grow).
        reserved: memory the caching allocator holds now.
        capacity: the device's total memory.
        free: the device's free memory now (all processes).
        alloc_retries: cumulative allocations retried after freeing the cache (``num_alloc_retries``).
        ooms: cumulative out-of-memory errors raised by the allocator (``num_ooms``).
    """

    device: str
    peak_allocated: int
    peak_reserved: int
    allocated: int
    reserved: int
    capacity: int
    free: int
    alloc_retries: int = 0
    ooms: int = 0

    @property
    def outside(self) -> int:
        """Device memory in use outside this process's caching allocator (CUDA context, NCCL,
        other processes)."""
        return max(0, self.capacity - self.free - self.reserved)

    @property
    def headroom(self) -> int:
        """What was left at the peak: capacity minus the peak allocated minus :attr:`outside`."""
        return self.capacity - self.outside - self.peak_allocated

    def metrics(self) -> dict[str, float]:
        """The ``lora_doctor/mem_*`` metrics added to the Trainer's logs (GiB, and counts)."""
        return {
            KEY_PEAK_ALLOC: round(self.peak_allocated / GIB, 4),
            KEY_ALLOC: round(self.allocated / GIB, 4),
            KEY_PEAK_RESERVED: round(self.peak_reserved / GIB, 4),
            KEY_CAPACITY: round(self.capacity / GIB, 4),
            KEY_FREE: round(self.free / GIB, 4),
            KEY_HEADROOM: round(self.headroom / GIB, 4),
            KEY_ALLOC_RETRIES: self.alloc_retries,
            KEY_OOMS: self.ooms,
        }

    def figures(self) -> dict[str, Any]:
        """The reading in GiB with readable names (a finding's evidence)."""
        return {
            "device": self.device,
            "peak_alloc_gib": self.peak_allocated / GIB,
            "peak_reserved_gib": self.peak_reserved / GIB,
            "allocated_gib": self.allocated / GIB,
            "reserved_gib": self.reserved / GIB,
            "capacity_gib": self.capacity / GIB,
            "free_gib": self.free / GIB,
            "outside_gib": self.outside / GIB,
            "alloc_retries": self.alloc_retries,
            "ooms": self.ooms,
        }


@runtime_checkable
class MemoryReader(Protocol):
    """Reads a device's memory. :class:`CudaMemoryReader` is the default; tests script their own.

    ``available()`` is asked before anything else and must not raise; ``read`` is called only when
    it said True and the Trainer trains on a device of type ``device_type``.
    """

    device_type: str

    def available(self) -> bool:
        """True when there is a device to read."""
        ...

    def read(self, device: Any = None) -> MemoryReading:
        """Reads ``device`` (the current one when None); must leave every counter as it is."""
        ...


class CudaMemoryReader:
    """Reads the CUDA caching allocator's counters; never synchronizes the device, never resets
    a peak.

    Example:
        >>> reader = CudaMemoryReader()
        >>> reading = reader.read() if reader.available() else None  # doctest: +SKIP
    """

    device_type = "cuda"

    def __init__(self) -> None:
        self._available: bool | None = None
        self.reason = ""

    def available(self) -> bool:
        if self._available is None:
            try:
                import torch

                self._available = bool(torch.cuda.is_available())
                if not self._available:
                    self.reason = f"torch {torch.__version__} sees no CUDA device"
            except Exception as exc:  # a broken driver: memory checks off, training goes on
                self._available = False
                self.reason = f"torch.cuda.is_available() failed ({type(exc).__name__})"
        return self._available

    def read(self, device: Any = None) -> MemoryReading:
        import torch

        if device is None:
            device = torch.cuda.current_device()
        # The nested form is what memory_stats() flattens: the same counters, without the cost of
        # flattening some 150 keys in Python.
        stats = torch.cuda.memory_stats_as_nested_dict(device)
        free, total = torch.cuda.mem_get_info(device)
        allocated = stats.get("allocated_bytes", {}).get("all", {})
        reserved = stats.get("reserved_bytes", {}).get("all", {})
        index = device.index if isinstance(device, torch.device) else device
        return MemoryReading(
            device=f"cuda:{index}",
            peak_allocated=int(allocated.get("peak", 0)),
            peak_reserved=int(reserved.get("peak", 0)),
            allocated=int(allocated.get("current", 0)),
            reserved=int(reserved.get("current", 0)),
            capacity=int(total),
            free=int(free),
            alloc_retries=int(stats.get("num_alloc_retries", 0)),
            ooms=int(stats.get("num_ooms", 0)),
        )


#: Per-rank keys put into the callback's rank exchange: (reading attribute, worst is the max).
_RANK_KEYS = {
    "peak_allocated": True,
    "allocated": True,
    "peak_reserved": True,
    "free": False,
    "headroom": False,
    "alloc_retries": True,
    "ooms": True,
}


class MemoryProbe(Probe):
    """Reads device memory at each logging interval and measures the run's memory by component.

    - train begin: the device, its capacity, the frozen weights by storage type (4-bit, 8-bit,
      bf16 ...), trainable and LoRA parameters, the optimizer.
    - after ``check_after_steps`` steps (once): the static memory between steps, the peak so far
      and the optimizer states, hence the activations; estimates for r, 2r and r/2.
    - at the end of a step after which the Trainer logs (``control.should_log``): one reading,
      after the optimizer step (so its ``allocated`` is what the run holds between steps); its
      figures go into the rank exchange (every rank reads its own device), and at the log the
      ``lora_doctor/mem_*`` metrics (the worst rank's: highest peak, least headroom) are added to
      the logs, which the engine records. A log with no reading of its own (after an evaluation,
      the end-of-training summary) reads then.

    No reading resets a counter: the peak is the allocator's own, as the user's
    ``torch.cuda.max_memory_allocated()`` reports it.
    - training dies of out-of-memory: a last reading and the error, for the ``out-of-memory``
      report.

    Args:
        reader: reads the device; :class:`CudaMemoryReader` when None.
    """

    name = "memory"

    def __init__(self, reader: MemoryReader | None = None) -> None:
        self.reader: MemoryReader = reader if reader is not None else CudaMemoryReader()
        self.active = False
        self._device: Any = None
        self._measured = False
        self._pending: MemoryReading | None = None

    def train_begin(self, event: Event) -> None:
        mem = MemoryFacts(
            per_device_train_batch_size=getattr(event.args, "per_device_train_batch_size", None),
            gradient_accumulation_steps=getattr(event.args, "gradient_accumulation_steps", None),
        )
        event.doctor.facts.memory = mem
        self._measured = False
        self._pending = None
        device = getattr(event.args, "device", None)
        kind = getattr(device, "type", None) or self.reader.device_type
        if not self.reader.available() or kind != self.reader.device_type:
            mem.reason = getattr(self.reader, "reason", "") or f"training runs on {kind}"
            self.active = False
            if event.is_main:  # the one line: no finding, so CPU runs keep a clean report
                logger.info(
                    "lora-doctor: %s: the memory checks are off (an out-of-memory error would "
                    "still be reported).",
                    mem.reason,
                )
            return
        self.active = True
        self._device = device if getattr(device, "index", None) is not None else None
        reading = self.reader.read(self._device)
        mem.available = True
        mem.device = reading.device
        mem.capacity = reading.capacity
        mem.outside_bytes = reading.outside
        event.doctor.facts.device_total_memory = reading.capacity
        if event.model is not None:
            _measure_model(mem, event.model_view(), kind, event.doctor)
        from lora_doctor.probes.view import unwrap_optimizer  # torch: imported once it trains

        optimizer = unwrap_optimizer(event.optimizer)
        mem.optimizer = type(optimizer).__name__ if optimizer is not None else None
        mem.estimates = estimates_by_rank(mem)

    def step_end(self, event: Event) -> None:
        if not self.active:
            return
        mem = event.doctor.facts.memory
        if not self._measured and event.step >= event.doctor.config.check_after_steps:
            self._measured = True
            reading = self.reader.read(self._device)
            if mem is not None:
                mem.static_bytes = reading.allocated
                mem.first_peak_bytes = reading.peak_allocated
                mem.outside_bytes = reading.outside
                mem.optimizer_state_bytes = _optimizer_state_bytes(event.optimizer)
                mem.estimates = estimates_by_rank(mem)
        if getattr(event.control, "should_log", False):
            self._pending = self.reader.read(self._device)
            if event.ranks is not None:
                for key in _RANK_KEYS:
                    event.ranks.put(f"mem_{key}", getattr(self._pending, key))

    def log(self, event: Event) -> None:
        if not self.active or event.logs is None:
            return
        reading, self._pending = self._pending, None
        spread = event.ranks.spread if event.ranks is not None and reading is not None else {}
        if reading is None:
            reading = self.reader.read(self._device)
        metrics = reading.metrics()
        ranks = spread.get("mem_peak_allocated")
        if ranks is not None and ranks.ranks > 1:
            worst: dict[str, Any] = {
                key: int(spread[f"mem_{key}"].max if high else spread[f"mem_{key}"].min)
                for key, high in _RANK_KEYS.items()
                if f"mem_{key}" in spread
            }
            headroom = worst.pop("headroom", reading.headroom)
            metrics = dataclasses.replace(reading, **worst).metrics()
            metrics[KEY_HEADROOM] = round(headroom / GIB, 4)
            metrics[KEY_PEAK_ALLOC + "_min"] = round(ranks.min / GIB, 4)
            metrics[KEY_PEAK_ALLOC + "_max"] = round(ranks.max / GIB, 4)
            metrics[KEY_PEAK_ALLOC + "_max_rank"] = ranks.max_rank
        event.logs.update(metrics)
        mem = event.doctor.facts.memory
        if mem is not None:
            mem.outside_bytes = reading.outside
            mem.ranks = ranks.ranks if ranks is not None else 1
            peak = int(ranks.max) if ranks is not None else reading.peak_allocated
            mem.peak_bytes = max(mem.peak_bytes or 0, peak)
            mem.last_reading = reading.figures()

    def train_failed(self, event: Event, error: BaseException) -> None:
        record_out_of_memory(event.doctor, error, event.step, self.reader if self.active else None)


def _measure_model(mem: MemoryFacts, view: ModelView, device_type: str, doctor: Doctor) -> None:
    """Frozen weights by storage type, trainable and LoRA parameters, and the reference rank."""
    from lora_doctor.probes.view import storage

    for param, is_lora in view.tensors():
        if param.device.type != device_type:  # offloaded or meta: not on this device
            continue
        label, size = storage(param)
        if param.requires_grad:
            mem.trainable_numel += int(getattr(param, "ds_numel", 0) or param.numel())
            mem.trainable_bytes += size
            if is_lora:
                mem.lora_bytes += size
        else:
            mem.weights_by_dtype[label] = mem.weights_by_dtype.get(label, 0) + size
    ranks = [a.r for a in doctor.facts.adapters.values() if a.r]
    if not ranks:
        ranks = [int(c["r"]) for c in view.configs.values() if isinstance(c.get("r"), int)]
    mem.r = ranks[0] if ranks else None


def _optimizer_state_bytes(optimizer: Any) -> int | None:
    """Bytes of the optimizer's state tensors (None when it has none yet)."""
    import torch

    from lora_doctor.probes.view import unwrap_optimizer

    state = getattr(unwrap_optimizer(optimizer), "state", None)
    if not state:
        return None
    return sum(
        int(t.numel()) * int(t.element_size())
        for per_param in state.values()
        for t in per_param.values()
        if isinstance(t, torch.Tensor)
    )


def is_out_of_memory(exc: BaseException) -> bool:
    """True for a CUDA out-of-memory error: ``torch.OutOfMemoryError`` (``torch.cuda.
    OutOfMemoryError`` is the same class), or an older torch's ``RuntimeError("CUDA out of
    memory ...")``, raised directly or as the cause of the error that ended training.

    Example:
        >>> is_out_of_memory(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
        True
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if type(current).__name__ == "OutOfMemoryError":
            return True
        text = str(current)
        if isinstance(current, RuntimeError) and (
            "CUDA out of memory" in text or "CUDA error: out of memory" in text
        ):
            return True
        current = current.__cause__ or current.__context__
    return False


_EVAL_FRAMES = frozenset({"evaluate", "evaluation_loop", "prediction_step", "predict"})


def _where(exc: BaseException) -> str:
    """Whether the error came from evaluation or training, from its traceback's function names."""
    names: set[str] = set()
    tb = exc.__traceback__
    while tb is not None:
        names.add(tb.tb_frame.f_code.co_name)
        tb = tb.tb_next
    if names & _EVAL_FRAMES:
        return "evaluation"
    return "the training step" if "training_step" in names else "training"


def record_out_of_memory(
    doctor: Doctor, exc: BaseException, completed_steps: int, reader: MemoryReader | None = None
) -> bool:
    """Records a CUDA out-of-memory error in ``doctor.facts.memory.oom`` with a last memory
    reading (never resetting, never synchronizing), where the ``out-of-memory`` check reads it at
    the END phase. Any other error is left alone.

    Args:
        doctor: the run's engine.
        exc: the error, which the caller re-raises unchanged.
        completed_steps: optimizer steps finished before the error.
        reader: reads the device; :class:`CudaMemoryReader` when None.

    Returns:
        True when ``exc`` was an out-of-memory error (and is now recorded).

    Example:
        >>> from lora_doctor.engine import Doctor
        >>> doctor = Doctor(emit=False)
        >>> record_out_of_memory(doctor, RuntimeError("CUDA out of memory."), 3)  # doctest: +SKIP
        True
    """
    if not is_out_of_memory(exc):
        return False
    reader = reader if reader is not None else CudaMemoryReader()
    reading = None
    if reader.available():
        try:
            reading = reader.read(None)
        except Exception:  # the device may be in no state to answer; the report goes on
            reading = None
    where = _where(exc)
    mem = doctor.facts.memory
    if mem is None:
        mem = doctor.facts.memory = MemoryFacts(available=reading is not None)
    mem.oom = {
        "step": completed_steps if where == "evaluation" else completed_steps + 1,
        "completed_steps": completed_steps,
        "where": where,
        "exception": f"{type(exc).__module__}.{type(exc).__qualname__}",
        "error": str(exc)[:1000],
        "reading": reading.figures() if reading is not None else None,
    }
    return True
