"""Device memory by component, and whether another rank would fit: arithmetic on MemoryFacts.

The memory probe measures what it can on the live run (weights by storage type, trainable
parameters, optimizer states, the static memory between steps and the peak of the first steps);
this module turns those numbers into an estimate by component and scales the LoRA part to another
rank. LoRA's parameters, their gradients and their optimizer states grow linearly with r; the
activations are taken as independent of r (LoRA's own, batch x sequence x r per layer, are small
next to the base model's), and the base weights do not change.

Example:
    >>> from lora_doctor.facts import MemoryFacts, RunFacts
    >>> mem = MemoryFacts(available=True, capacity=80 * GIB, weights_by_dtype={"bf16": 16 * GIB},
    ...                   trainable_numel=10**7, trainable_bytes=4 * 10**7, lora_bytes=4 * 10**7,
    ...                   r=8, optimizer="AdamW", static_bytes=17 * GIB, first_peak_bytes=60 * GIB)
    >>> estimate_memory(mem).r, estimate_memory(mem, r=16).lora_scale
    (8, 2.0)
    >>> fits_rank(RunFacts(memory=mem), 16, 0.9)
    True
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lora_doctor.facts import MemoryFacts, RunFacts

__all__ = [
    "GIB",
    "MemoryEstimate",
    "estimate_memory",
    "estimates_by_rank",
    "fits_rank",
    "optimizer_state_bytes_per_param",
    "rank_memory_step",
]

GIB = 1024**3


def optimizer_state_bytes_per_param(optimizer: str | None) -> float | None:
    """Bytes of optimizer state per trainable element for a known optimizer class name.

    Adam and AdamW keep two fp32 moments (8 bytes), their 8-bit forms (bitsandbytes, paged or not)
    two 1-byte moments (2), Lion one fp32 moment (4). None for others (Adafactor, SGD): the
    estimate then waits for the states measured after the first steps.

    Example:
        >>> optimizer_state_bytes_per_param("AdamW"), optimizer_state_bytes_per_param("PagedAdamW8bit")
        (8.0, 2.0)
    """
    name = (optimizer or "").lower()
    if "8bit" in name or "8_bit" in name:
        return 2.0
    if "adam" in name:
        return 8.0
    if "lion" in name:
        return 4.0
    return None


@dataclass(frozen=True)
class MemoryEstimate:
    """Device memory of a run by component, in bytes, at rank ``r``.

    Attributes:
        r: the rank the estimate is for (None when the run's rank is unknown).
        lora_scale: r over the measured rank (1.0 for the run's own rank).
        weights: frozen model weights, all storage types together.
        weights_by_dtype: the same by storage type ("4-bit", "bf16" ...), unscaled.
        trainable: trainable parameters (LoRA, scaled to r, and ``modules_to_save``).
        gradients: their gradients (as large as the parameters).
        optimizer_states: measured after the first steps, else predicted from the optimizer's kind
            (None when neither is possible).
        activations: peak of the first steps minus the static memory and the gradients (None
            before the first steps).
        outside: memory held outside PyTorch's allocator (CUDA context, other processes).
    """

    r: int | None
    lora_scale: float
    weights: int
    weights_by_dtype: dict[str, int]
    trainable: int
    gradients: int
    optimizer_states: int | None
    activations: int | None
    outside: int

    @property
    def complete(self) -> bool:
        """True when every component is known (after the first steps)."""
        return self.optimizer_states is not None and self.activations is not None

    @property
    def total(self) -> int:
        """The sum of the known components (a lower bound until :attr:`complete`)."""
        return (
            self.weights
            + self.trainable
            + self.gradients
            + (self.optimizer_states or 0)
            + (self.activations or 0)
            + self.outside
        )

    def to_dict(self) -> dict[str, Any]:
        """The estimate as JSON-able data, in bytes, with its total."""
        return {
            "r": self.r,
            "weights": self.weights,
            "weights_by_dtype": dict(self.weights_by_dtype),
            "trainable": self.trainable,
            "gradients": self.gradients,
            "optimizer_states": self.optimizer_states,
            "activations": self.activations,
            "outside": self.outside,
            "total": self.total,
            "complete": self.complete,
        }

    def describe(self) -> str:
        """One line: each component in GiB, e.g. for a finding's message."""
        by_dtype = ", ".join(f"{k} {_gib(v)}" for k, v in sorted(self.weights_by_dtype.items()))
        parts = [
            f"weights {_gib(self.weights)} GiB" + (f" ({by_dtype})" if by_dtype else ""),
            f"trainable parameters {_gib(self.trainable)}",
            f"gradients {_gib(self.gradients)}",
            "optimizer states "
            + (_gib(self.optimizer_states) if self.optimizer_states is not None else "unknown"),
            "activations "
            + (_gib(self.activations) if self.activations is not None else "not measured yet"),
        ]
        if self.outside:
            parts.append(f"outside PyTorch {_gib(self.outside)}")
        where = f" at r={self.r}" if self.r is not None else ""
        return f"{_gib(self.total)} GiB{where}: " + ", ".join(parts)


def _gib(n: float) -> str:
    return f"{n / GIB:.2f}"


def estimate_memory(mem: MemoryFacts, r: int | None = None) -> MemoryEstimate | None:
    """The run's memory by component at rank ``r`` (the measured rank when None).

    Returns None when the probe measured nothing (no CUDA device, or offline) or when ``r`` is
    asked for but the run's rank is unknown.

    Example:
        >>> mem = MemoryFacts(available=True, weights_by_dtype={"4-bit": 4 * GIB},
        ...                   trainable_numel=1000, trainable_bytes=4000, lora_bytes=4000, r=8,
        ...                   optimizer="AdamW")
        >>> estimate_memory(mem, r=4).optimizer_states
        4000
    """
    if not mem.available or not (mem.weights_by_dtype or mem.trainable_bytes):
        return None
    if r is None or r == mem.r:
        scale = 1.0
        r = mem.r
    elif mem.r:
        scale = r / mem.r
    else:
        return None
    trainable = mem.trainable_bytes - mem.lora_bytes + mem.lora_bytes * scale
    share = trainable / mem.trainable_bytes if mem.trainable_bytes else 1.0
    states: float | None
    if mem.optimizer_state_bytes is not None:
        states = mem.optimizer_state_bytes * share
    else:
        per_param = optimizer_state_bytes_per_param(mem.optimizer)
        states = per_param * mem.trainable_numel * share if per_param is not None else None
    activations = None
    if mem.first_peak_bytes is not None and mem.static_bytes is not None:
        activations = max(0, mem.first_peak_bytes - mem.static_bytes - mem.trainable_bytes)
    return MemoryEstimate(
        r=r,
        lora_scale=scale,
        weights=sum(mem.weights_by_dtype.values()),
        weights_by_dtype=dict(mem.weights_by_dtype),
        trainable=round(trainable),
        gradients=round(trainable),
        optimizer_states=round(states) if states is not None else None,
        activations=activations,
        outside=mem.outside_bytes,
    )


def estimates_by_rank(mem: MemoryFacts) -> dict[str, dict[str, Any]]:
    """The estimate at the run's rank, at twice and at half of it, keyed by rank (as strings).

    Only the run's own rank appears when the rank is unknown or 1.
    """
    ranks: list[int | None] = [mem.r]
    if mem.r:
        ranks += [mem.r * 2] + ([mem.r // 2] if mem.r > 1 else [])
    out: dict[str, dict[str, Any]] = {}
    for r in ranks:
        est = estimate_memory(mem, r)
        if est is not None:
            out[str(r)] = est.to_dict()
    return out


def fits_rank(facts: RunFacts, r: int, max_share: float) -> bool | None:
    """Whether training at LoRA rank ``r`` would keep peak memory within ``max_share`` of the
    device's capacity (pass the run's ``DoctorConfig.oom_peak_share``).

    For recommendations that change r ("double r and lora_alpha, if memory allows"). The answer
    rests on the run's measured memory scaled to ``r`` (see :func:`estimate_memory`).

    Returns:
        True or False once the first steps were measured; before that, False when the weights,
        trainable parameters, gradients and optimizer states alone pass the limit, else None.
        None as well when nothing was measured (no CUDA device, offline diagnosis).

    Example:
        >>> fits_rank(RunFacts(), 16, 0.9) is None
        True
    """
    mem = facts.memory
    if mem is None or not mem.capacity:
        return None
    est = estimate_memory(mem, r)
    if est is None:
        return None
    fits = est.total <= max_share * mem.capacity
    if est.complete or not fits:
        return fits
    return None


def rank_memory_step(facts: RunFacts, r: int, max_share: float) -> str:
    """A recommendation step that says whether rank ``r`` fits in memory (see :func:`fits_rank`),
    for recommendations that change r.

    Example:
        >>> rank_memory_step(RunFacts(), 16, 0.9)
        'If memory allows: r=16 changes the LoRA parameters, their gradients and optimizer states in proportion (this run has no memory reading to check it)'
    """
    fits = fits_rank(facts, r, max_share)
    mem = facts.memory
    est = estimate_memory(mem, r) if mem is not None else None
    if fits is None or est is None or mem is None or not mem.capacity:
        return (
            f"If memory allows: r={r} changes the LoRA parameters, their gradients and optimizer "
            "states in proportion (this run has no memory reading to check it)"
        )
    figures = (
        f"estimated peak {_gib(est.total)} GiB at r={r} against {_gib(max_share * mem.capacity)} "
        f"GiB ({max_share:.0%} of {_gib(mem.capacity)} GiB)"
    )
    if fits:
        return f"Memory: r={r} fits ({figures})"
    return (
        f"Memory: r={r} does not fit ({figures}): make room first, e.g. halve "
        "per_device_train_batch_size and double gradient_accumulation_steps, or "
        "gradient_checkpointing=True"
    )
