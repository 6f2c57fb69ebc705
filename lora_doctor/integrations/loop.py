"""Custom training loops: the run's facts from a live PEFT model, for a hand-driven Doctor.

The Trainer callback reads the model for you; a plain PyTorch (or Accelerate) loop calls
:func:`read_model` once, hands the facts to a :class:`~lora_doctor.engine.Doctor`, and drives it
with ``start``, ``observe`` and ``end`` (see ``examples/custom_loop.py``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from lora_doctor.facts import RunFacts
from lora_doctor.probes.model import facts_from_view
from lora_doctor.probes.setup import read_setup
from lora_doctor.probes.view import ModelView

__all__ = ["read_model"]


def read_model(model: Any, optimizer: Any = None, **run: Any) -> RunFacts:
    """Reads a live PEFT model (and its optimizer) into run facts for a :class:`Doctor`.

    Args:
        model: the model being trained: a ``peft.PeftModel``, possibly wrapped (DDP, FSDP,
            DeepSpeed, ``accelerator.prepare``).
        optimizer: the optimizer, to check that it holds every trainable LoRA parameter.
        **run: other facts of the run, by their :class:`~lora_doctor.facts.RunFacts` name:
            ``max_steps`` (the planned optimizer steps: the curve checks judge progress against
            it), ``learning_rate`` (the peak rate), ``num_train_epochs``, ``train_examples`` ...

    Returns:
        The facts: adapters and their configuration, LoRA layers with true shapes, parameter
        counts, which trainable LoRA parameters the optimizer lacks, and ``run``'s values.

    Raises:
        ValueError: a keyword of ``run`` is no field of RunFacts.

    Example:
        >>> facts = read_model(peft_model, optimizer, max_steps=200, learning_rate=2e-4)  # doctest: +SKIP
        >>> doctor = Doctor(facts=facts)  # doctest: +SKIP
    """
    names = {f.name for f in dataclasses.fields(RunFacts)}
    unknown = sorted(set(run) - names)
    if unknown:
        raise ValueError(
            f"read_model(...) got unknown run facts {unknown}: use RunFacts field names such as "
            "max_steps, learning_rate, num_train_epochs, train_examples"
        )
    facts = RunFacts(**run)
    view = ModelView.build(model, optimizer)
    facts_from_view(view, facts)
    read_setup(facts.setup, view, None, optimizer, max_steps=facts.max_steps)
    return facts
