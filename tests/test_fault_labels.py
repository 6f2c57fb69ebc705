"""The fault benchmark's cause labels name causes the diagnosis pass can rank (or, for a fault with
no symptom to rank, a finding the doctor reports), so the top-1 score compares like with like."""

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


def test_every_fault_is_labelled_with_names_a_run_can_give() -> None:
    """Every fault has a label, no control has one; each name in a label (``"a|b"``: the one cause
    under either name) is a cause the candidates rank or a finding of the scenario's ``must`` (the
    only findings the top-1 reading looks at, :mod:`benchmarks.faults.score`): a label no run can
    give would score 0 whatever the doctor does."""
    ids, registered = _cause_ids(), Registry().names
    assert {"learning-rate-too-high", "forward-numerics", "adapter-not-in-optimizer"} <= ids
    unreadable = {}
    for s in SCENARIOS:
        if s.healthy:
            assert not s.cause, s.name
            continue
        must = {slug for group in s.must for slug in group.split("|")} & registered
        bad = [name for name in s.cause.split("|") if name not in ids and name not in must]
        if not s.cause or bad:
            unreadable[s.name] = s.cause
    assert unreadable == {}
