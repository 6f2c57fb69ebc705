"""lora-doctor: tells the person training a LoRA adapter what is going wrong, with the numbers,
and what to do about it.

The engine (findings, history, facts, config, checks, report) needs only numpy and scipy; the
Trainer callback and the probes import torch, transformers and peft when they are first used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

from lora_doctor.config import DoctorConfig
from lora_doctor.findings import Finding, Recommendation, Severity
from lora_doctor.offline import diagnose
from lora_doctor.report import Diagnosis
from lora_doctor.sweep import SweepResult, SweepRow, rank_sweep

if TYPE_CHECKING:
    from lora_doctor.integrations.hf import LoraDoctorCallback
    from lora_doctor.integrations.watch import watch

__all__ = [
    "Diagnosis",
    "DoctorConfig",
    "Finding",
    "LoraDoctorCallback",
    "Recommendation",
    "Severity",
    "SweepResult",
    "SweepRow",
    "__version__",
    "diagnose",
    "rank_sweep",
    "watch",
]

_LAZY = {
    "LoraDoctorCallback": "lora_doctor.integrations.hf",
    "watch": "lora_doctor.integrations.watch",
}
#: The packages of the ``hf`` extra, which the lazy names need.
_HF_EXTRA = frozenset({"torch", "transformers", "peft", "accelerate"})


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'lora_doctor' has no attribute {name!r}")
    import importlib

    try:
        return getattr(importlib.import_module(module), name)
    except ModuleNotFoundError as err:
        missing = (err.name or "").partition(".")[0]
        if missing not in _HF_EXTRA:
            raise
        raise ModuleNotFoundError(
            f"lora_doctor.{name} needs {missing}, which is not installed: "
            "pip install 'lora-doctor[hf]'",
            name=err.name,
        ) from None
