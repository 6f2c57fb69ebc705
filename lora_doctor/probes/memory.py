"""CUDA memory readings: the allocator's counters at each logging interval, never a device sync.

A reading is one call to ``torch.cuda.memory_stats`` (peaks, current bytes, allocator retries and
out-of-memory count, all host-side counters of the caching allocator), one ``cudaMemGetInfo``
(capacity and free memory, a driver query that does not wait for the GPU) and, by default, a
``torch.cuda.reset_peak_memory_stats`` so that the next reading's peak covers only its own
interval. The reader is injectable: tests script readings, another accelerator can bring its own.

On a machine without CUDA, ``torch.cuda.is_available()`` is asked once and nothing else of
``torch.cuda`` is touched (CPU torch's CUDA functions raise).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from lora_doctor.checks.base import Phase
from lora_doctor.checks.memory import (
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

__all__ = [
    "CudaMemoryReader",
    "Gather",
    "MemoryProbe",
    "MemoryReader",
    "MemoryReading",
    "is_out_of_memory",
    "record_training_error",
    "worst",
]


@dataclass(frozen=True)
class MemoryReading:
    """One reading of a device's memory, in bytes (counts for retries and OOMs).

    Attributes:
        device: the device read, e.g. ``"cuda:0"``.
        peak_allocated: peak memory allocated to tensors since the previous reset.
        peak_reserved: peak memory the caching allocator held from the device since then.
        allocated: memory allocated to tensors now.
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

    def read(self, device: Any = None, reset: bool = True) -> MemoryReading:
        """Reads ``device`` (the current one when None); resets the peak counters when ``reset``."""
        ...


class CudaMemoryReader:
    """Reads the CUDA caching allocator's counters; never synchronizes the device.

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

    def read(self, device: Any = None, reset: bool = True) -> MemoryReading:
        import torch

        if device is None:
            device = torch.cuda.current_device()
        stats = torch.cuda.memory_stats(device)
        free, total = torch.cuda.mem_get_info(device)
        if reset:
            torch.cuda.reset_peak_memory_stats(device)
        index = device.index if isinstance(device, torch.device) else device
        return MemoryReading(
            device=f"cuda:{index}",
            peak_allocated=int(stats.get("allocated_bytes.all.peak", 0)),
            peak_reserved=int(stats.get("reserved_bytes.all.peak", 0)),
            allocated=int(stats.get("allocated_bytes.all.current", 0)),
            reserved=int(stats.get("reserved_bytes.all.current", 0)),
            capacity=int(total),
            free=int(free),
            alloc_retries=int(stats.get("num_alloc_retries", 0)),
            ooms=int(stats.get("num_ooms", 0)),
        )


#: Collects every rank's reading (identity on one process). A multi-GPU gather returns the list
#: of all ranks' readings, and :func:`worst` keeps the figure that matters from each.
Gather = Callable[[MemoryReading], Sequence[MemoryReading]]


def _this_rank_only(reading: MemoryReading) -> Sequence[MemoryReading]:
    return (reading,)


def worst(readings: Sequence[MemoryReading]) -> MemoryReading:
    """Combines readings of several ranks into the one that matters: the highest peaks, current
    bytes and counts, the least free memory, and the device of the highest peak.

    Example:
        >>> a = MemoryReading("cuda:0", 10, 12, 5, 6, 100, 50, 1, 0)
        >>> b = MemoryReading("cuda:1", 20, 22, 4, 5, 100, 40, 0, 0)
        >>> w = worst([a, b]); (w.device, w.peak_allocated, w.free, w.alloc_retries)
        ('cuda:1', 20, 40, 1)
    """
    if len(readings) == 1:
        return readings[0]
    top = max(readings, key=lambda r: r.peak_allocated)
    return dataclasses.replace(
        top,
        peak_reserved=max(r.peak_reserved for r in readings),
        allocated=max(r.allocated for r in readings),
        reserved=max(r.reserved for r in readings),
        capacity=min(r.capacity for r in readings),
        free=min(r.free for r in readings),
        alloc_retries=max(r.alloc_retries for r in readings),
        ooms=max(r.ooms for r in readings),
    )


class MemoryProbe(Probe):
    """Reads device memory at each logging interval and measures the run's memory by component.

    - train begin: the device, its capacity, the frozen weights by storage type (4-bit, 8-bit,
      bf16 ...), trainable and LoRA parameters, the optimizer; the peak counters are reset.
    - after ``check_after_steps`` steps (once): the static memory between steps, the peak of the
      first steps and the optimizer states, hence the activations; estimates for r, 2r and r/2.
    - each log: one reading, its ``lora_doctor/mem_*`` metrics added to the logs (the engine
      records them from there), then the peak counters reset.

    Args:
        reader: reads the device; :class:`CudaMemoryReader` when None.
        gather: collects all ranks' readings (every rank reads its own device); identity by
            default. The worst figures over ranks are reported (:func:`worst`).
    """

    name = "memory"

    def __init__(self, reader: MemoryReader | None = None, gather: Gather | None = None) -> None:
        self.reader: MemoryReader = reader if reader is not None else CudaMemoryReader()
        self.gather: Gather = gather or _this_rank_only
        self.active = False
        self._device: Any = None
        self._measured = False
        self._reset = True
        self.ranks = 1

    def train_begin(self, event: Event) -> None:
        mem = MemoryFacts(
            per_device_train_batch_size=getattr(event.args, "per_device_train_batch_size", None),
            gradient_accumulation_steps=getattr(event.args, "gradient_accumulation_steps", None),
        )
        event.doctor.facts.memory = mem
        self._measured = False
        device = getattr(event.args, "device", None)
        kind = getattr(device, "type", None) or self.reader.device_type
        if not self.reader.available() or kind != self.reader.device_type:
            mem.reason = getattr(self.reader, "reason", "") or f"training runs on {kind}"
            self.active = False
            return
        self.active = True
        self._device = device if getattr(device, "index", None) is not None else None
        # The Trainer's own memory metrics (skip_memory_metrics=False) read the peak since the
        # start: leave the peak counters alone then, and let each reading cover the run so far.
        self._reset = getattr(event.args, "skip_memory_metrics", True) is not False
        reading = self._read(reset=self._reset)
        mem.available = True
        mem.device = reading.device
        mem.capacity = reading.capacity
        mem.peaks_reset = self._reset
        mem.ranks = self.ranks
        mem.outside_bytes = reading.outside
        event.doctor.facts.device_total_memory = reading.capacity
        if event.model is not None:
            _measure_model(mem, event.model, kind, event.doctor)
        mem.optimizer = (
            type(_unwrap_optimizer(event.optimizer)).__name__ if event.optimizer else None
        )
        mem.estimates = estimates_by_rank(mem)

    def step_end(self, event: Event) -> None:
        if not self.active or self._measured:
            return
        if event.step < event.doctor.config.check_after_steps:
            return
        self._measured = True
        mem = event.doctor.facts.memory
        if mem is None:
            return
        reading = self._read(reset=False)
        mem.static_bytes = reading.allocated
        mem.first_peak_bytes = reading.peak_allocated
        mem.outside_bytes = reading.outside
        mem.optimizer_state_bytes = _optimizer_state_bytes(event.optimizer)
        mem.estimates = estimates_by_rank(mem)

    def log(self, event: Event) -> None:
        if not self.active or event.logs is None:
            return
        reading = self._read(reset=self._reset)
        event.logs.update(reading.metrics())
        mem = event.doctor.facts.memory
        if mem is not None:
            mem.outside_bytes = reading.outside

    def _read(self, reset: bool) -> MemoryReading:
        readings = self.gather(self.reader.read(self._device, reset=reset))
        self.ranks = len(readings)
        return worst(readings)


def _unwrap_optimizer(optimizer: Any) -> Any:
    """The optimizer inside accelerate's AcceleratedOptimizer (or any ``.optimizer`` wrapper)."""
    inner = getattr(optimizer, "optimizer", None)
    return inner if inner is not None and hasattr(inner, "param_groups") else optimizer


def _storage(param: Any) -> tuple[str, int]:
    """A parameter's storage type label and its bytes on this device (ZeRO-3: its partition)."""
    import torch

    local = getattr(param, "ds_tensor", None)
    tensor = local if local is not None else param
    size = int(tensor.numel()) * int(tensor.element_size())
    cls = type(param).__name__
    if cls == "Params4bit":
        return "4-bit", size
    if cls == "Int8Params" or param.dtype == torch.int8:
        return "8-bit", size
    names = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
    return names.get(param.dtype, str(param.dtype).replace("torch.", "")), size


def _measure_model(mem: MemoryFacts, model: Any, device_type: str, doctor: Doctor) -> None:
    """Frozen weights by storage type, trainable and LoRA parameters, and the reference rank."""
    for name, param in model.named_parameters():
        if param.device.type != device_type:  # offloaded or meta: not on this device
            continue
        label, size = _storage(param)
        if param.requires_grad:
            mem.trainable_numel += int(getattr(param, "ds_numel", 0) or param.numel())
            mem.trainable_bytes += size
            if "lora_" in name:
                mem.lora_bytes += size
        else:
            mem.weights_by_dtype[label] = mem.weights_by_dtype.get(label, 0) + size
    ranks = [a.r for a in doctor.facts.adapters.values() if a.r]
    if not ranks:
        config = getattr(model, "peft_config", None) or {}
        ranks = [int(c.r) for c in config.values() if isinstance(getattr(c, "r", None), int)]
    mem.r = ranks[0] if ranks else None


def _optimizer_state_bytes(optimizer: Any) -> int | None:
    """Bytes of the optimizer's state tensors (None when it has none yet)."""
    import torch

    state = getattr(_unwrap_optimizer(optimizer), "state", None)
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


def record_training_error(
    doctor: Doctor, exc: BaseException, completed_steps: int, reader: MemoryReader | None = None
) -> None:
    """Records the error that ended training in the engine and runs the END checks.

    An out-of-memory error is recorded with a last (non-resetting) memory reading in
    ``facts.memory.oom``, where the ``out-of-memory`` check reads it. Never synchronizes, never
    raises for an unreadable device.

    Args:
        doctor: the run's engine.
        exc: the error, which the caller re-raises unchanged.
        completed_steps: optimizer steps finished before the error.
        reader: reads the device; :class:`CudaMemoryReader` when None.
    """
    if is_out_of_memory(exc):
        reader = reader if reader is not None else CudaMemoryReader()
        reading = None
        if reader.available():
            try:
                reading = reader.read(None, reset=False)
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
    doctor.run_phase(Phase.END, completed_steps)
