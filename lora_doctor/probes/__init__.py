"""Probes: the only code that touches torch, peft or transformers objects.

A probe reads the live model (or device) at Trainer events and hands plain data to the engine: it
fills :class:`~lora_doctor.facts.RunFacts`, adds log entries, or adds metrics to the Trainer's logs.
"""

from lora_doctor.probes.base import Event, Probe

__all__ = ["Event", "Probe"]
