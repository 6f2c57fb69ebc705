"""The fault benchmark's cause labels name causes the diagnosis pass can rank (or, for a fault with
no symptom to rank, a finding the doctor reports), so a later top-1 score compares like with like."""

from __future__ import annotations

import math

from benchmarks.faults.scenarios import SCENARIOS
from lora_doctor.checks import Registry
from lora_doctor.config import DoctorConfig
from lora_doctor.diagnosis.causes import CANDIDATES, Findings, Look
from lora_doctor.facts import AdapterFacts, RunFacts
from lora_doctor.findings import Finding, Severity
from lora_doctor.history import History


def _cause_ids() -> set[str]:
    """Every cause id the candidates give for a LoRA run with a NaN at step 1 (where every
    candidate, the numerics of the pass included, has something to say)."""
    facts = RunFacts(has_lora=True, adapters={"default": AdapterFacts(r=8, lora_alpha=16)})
    facts.lora_params = facts.trainable_lora_params = 100
    history = History()
    history.add(1, {"loss": 0.0, "grad_norm": math.nan, "learning_rate": 0.0})
    ids = set()
    for slug, candidates in CANDIDATES.items():
        symptom = Finding("LD000", slug, Severity.ERROR, 1, "t", "m", {"first_step": 1})
        look = Look(symptom, Findings([symptom]), facts, DoctorConfig(), history)
        ids |= {c.cause for c in (candidate(look) for candidate in candidates) if c is not None}
    return ids


def test_every_label_is_a_cause_or_a_finding() -> None:
    known = _cause_ids() | Registry().names
    labels = {s.name: s.cause for s in SCENARIOS if s.cause}
    assert labels, "no scenario carries a cause label"
    assert {name: cause for name, cause in labels.items() if cause not in known} == {}
    assert all(not s.cause for s in SCENARIOS if s.healthy)
