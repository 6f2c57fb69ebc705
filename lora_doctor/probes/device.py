"""Waiting for the training's queued device work before the doctor reads tensors.

The Trainer queues a step's kernels and moves on; the first time the doctor fetches a result from
the device (``.tolist()``, ``float()``), the host waits until every kernel queued before it has run,
the training's included. That wait would happen anyway, but it is the training's time, not the
doctor's: waiting for it first, and apart, keeps the doctor's time budget honest.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

import torch

from lora_doctor.probes.budget import TimeBudget

__all__ = ["drain"]


def drain(budget: TimeBudget | None, tensors: Iterable[torch.Tensor | None], step: int) -> float:
    """Waits for the work queued on the CUDA device of the first of ``tensors`` and leaves that
    wait out of the doctor's time; returns it, in seconds.

    Nothing is done (0.0) without a budget, or when the tensors are not on a CUDA device: a CPU
    run has no queue.

    Example:
        >>> drain(TimeBudget(0.005), [torch.zeros(2)], step=1)
        0.0
    """
    if budget is None:
        return 0.0
    device = next((t.device for t in tensors if t is not None), None)
    if device is None or device.type != "cuda":
        return 0.0
    return budget.wait(functools.partial(torch.cuda.synchronize, device), step)
