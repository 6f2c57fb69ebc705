"""Rank sweep: choose the LoRA rank r from measurements, and keep the provenance.

Train a few ranks from scratch on a slice of the data, measure each (the metric, training time, peak
memory, the doctor's findings), and lock the smallest rank that gives most of the quality for much
less time.

Layers, lowest first (all pure, standard library only):

- :mod:`~lora_doctor.sweep.row`: :class:`SweepRow`, one rank's measurements.
- :mod:`~lora_doctor.sweep.choose`: the choice rule (:func:`choose_rank`, described in that
  module's docstring) and the prose of its reason.
- :mod:`~lora_doctor.sweep.results`: :class:`SweepResult` and its files (JSON, CSV, plot).
- :mod:`~lora_doctor.sweep.run`: :func:`rank_sweep`, which checks its arguments, then hands the
  training to :mod:`lora_doctor.integrations.hf_sweep` (torch, transformers; imported when a sweep
  runs).

The ``lora-doctor sweep`` command is in :mod:`lora_doctor.cli`.
"""

from __future__ import annotations

from lora_doctor.sweep.choose import choose_rank, metric_direction
from lora_doctor.sweep.results import SWEEP_SCHEMA_VERSION, SweepResult, summary_logs
from lora_doctor.sweep.row import SweepRow
from lora_doctor.sweep.run import is_main_process, rank_sweep

__all__ = [
    "SWEEP_SCHEMA_VERSION",
    "SweepResult",
    "SweepRow",
    "choose_rank",
    "is_main_process",
    "metric_direction",
    "rank_sweep",
    "summary_logs",
]
