"""Probes: the only code that touches torch, peft or transformers objects.

A probe reads the live model (or device) at Trainer events and hands plain data to the engine: it
fills :class:`~lora_doctor.facts.RunFacts`, adds log entries, or adds metrics to the Trainer's logs.

Layers, lowest first (a module imports only from those before it; ``tests/test_import_graph.py``):

- :mod:`~lora_doctor.probes.dist`: ranks and the per-rank exchange of readings (no torch at import).
- :mod:`~lora_doctor.probes.view`: :class:`~lora_doctor.probes.view.ModelView`, THE reading of the
  model: unwrapping, LoRA layers, every parameter's role and true size (ZeRO-3, FSDP, 4-bit),
  storage type, optimizer membership. A probe never walks the model itself.
- :mod:`~lora_doctor.probes.base`: :class:`Event` (what a Trainer event offers) and :class:`Probe`.
  :meth:`Event.model_view` builds the view once per run, at train begin, for the first probe that
  asks, and hands the same view to the others.
- the probes, which read the view: :mod:`~lora_doctor.probes.model` (the adapter's facts and first
  steps), :mod:`~lora_doctor.probes.spectrum` (the learned update's spectrum) and
  :mod:`~lora_doctor.probes.memory` (device memory); and :mod:`~lora_doctor.probes.step_time` and
  :mod:`~lora_doctor.probes.ecosystem` (the vLLM engine's ``max_lora_rank``).
"""

from lora_doctor.probes.base import Event, Probe

__all__ = ["Event", "Probe"]
