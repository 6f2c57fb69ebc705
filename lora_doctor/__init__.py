"""lora-doctor: tells the person training a LoRA adapter what is going wrong, with the numbers,
and what to do about it.

The engine (findings, history, facts, config, checks, report) needs only numpy; the
Trainer callback and the probes import torch, transformers and peft when they are first used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lora_doctor._version import __version__
from lora_doctor.config import DoctorConfig
from lora_doctor.engine import Doctor
from lora_doctor.findings import Finding, Recommendation, Severity
from lora_doctor.offline import diagnose
from lora_doctor.report import Diagnosis

if TYPE_CHECKING:
    from lora_doctor.integrations.hf import LoraDoctorCallback
    from lora_doctor.integrations.loop import LoopDoctor, read_model
    from lora_doctor.integrations.watch import watch
    from lora_doctor.sweep import SweepResult, SweepRow, rank_sweep

__all__ = [
    "Diagnosis",
    "Doctor",
    "DoctorConfig",
    "Finding",
    "LoopDoctor",
    "LoraDoctorCallback",
    "Recommendation",
    "Severity",
    "SweepResult",
    "SweepRow",
    "__version__",
    "diagnose",
    "rank_sweep",
    "read_model",
    "watch",
]

_LAZY = {
    "LoraDoctorCallback": "lora_doctor.integrations.hf",
    "watch": "lora_doctor.integrations.watch",
    "read_model": "lora_doctor.integrations.loop",
    "LoopDoctor": "lora_doctor.integrations.loop",
    # imported when first used: `lora-doctor diagnose` starts without them
    "SweepResult": "lora_doctor.sweep",
    "SweepRow": "lora_doctor.sweep",
    "rank_sweep": "lora_doctor.sweep",
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
