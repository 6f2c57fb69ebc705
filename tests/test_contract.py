"""The check contract: the engine owns cursors and the schedule, the config reaches every rule,
the registry belongs to each Doctor, the Doctor drives a custom loop, overfit is judged in linear
time. Each test is a defect of the earlier shape (issue 11)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest

from lora_doctor import Doctor, DoctorConfig, Finding, Severity, watch
from lora_doctor.checks import Check, Context, Phase, Reads
from lora_doctor.facts import AdapterFacts, LayerSpectrum, MemoryFacts, RunFacts, SpectrumSnapshot
from lora_doctor.history import History
from lora_doctor.memory_estimate import GIB
from lora_doctor.probes.memory import MemoryReading

CAP = 80 * GIB


def _reading(share: float) -> dict[str, float]:
    peak = int(share * CAP)
    return MemoryReading("cuda:0", peak, peak, peak // 2, peak, CAP, CAP - peak, 0, 0).metrics()


# --- 1. a check sees every point it declared, whatever the schedule ---------------------------------
@pytest.mark.parametrize("at", [600, 601, 602, 603, 605, 999])
def test_oom_risk_sees_a_peak_logged_between_two_looks(at: int) -> None:
    """Past 256 entries the engine looks once per n/256 entries; a peak at 94% logged between two
    looks must still be reported, at its own step."""
    facts = RunFacts(max_steps=1000, memory=MemoryFacts(available=True, capacity=CAP))
    doctor = Doctor(None, facts, emit=False)
    for step in range(1, 1001):
        doctor.observe(step, _reading(0.94 if step == at else 0.5))
    doctor.run_phase(Phase.END, 1000)
    risks = [f for f in doctor.findings if f.slug == "oom-risk"]
    assert [(f.evidence["rule"], f.step) for f in risks] == [("peak", at)]


class _Counts(Check):
    """A test check that records how many new points of ``loss`` it is handed at each look."""

    code, slug, severity = "LD990", "count-points", Severity.INFO
    phases = frozenset({Phase.LOG, Phase.END})
    reads = (Reads("loss"),)
    once = False
    seen: list[int]

    def run(self, ctx: Context) -> Iterable[Finding]:
        type(self).seen.append(len(ctx.points("loss")))
        return ()


def test_engine_hands_every_point_once() -> None:
    _Counts.seen = []
    doctor = Doctor(None, RunFacts(), checks=[_Counts], emit=False)
    for step in range(1, 3001):
        doctor.observe(step, {"loss": 1.0})
    doctor.run_phase(Phase.END)
    assert sum(_Counts.seen) == 3000
    assert len(_Counts.seen) < 3000  # batched past the first 256 entries


# --- 2. the user's thresholds reach the advice --------------------------------------------------------
def _measured(peak_gib: float) -> MemoryFacts:
    return MemoryFacts(
        available=True,
        capacity=CAP,
        weights_by_dtype={"bf16": 16 * GIB},
        trainable_numel=10**7,
        trainable_bytes=4 * 10**7,
        lora_bytes=4 * 10**7,
        r=8,
        optimizer="AdamW",
        static_bytes=17 * GIB,
        first_peak_bytes=int(peak_gib * GIB),
    )


def _saturated(config: DoctorConfig) -> Finding:
    """rank-saturated from the engine (the config reaches the check through the context)."""
    from lora_doctor.checks.rank import summarise

    facts = RunFacts(
        has_lora=True,
        max_steps=100,
        lora_params=10_000,
        adapters={"default": AdapterFacts(r=4, lora_alpha=8)},
        memory=_measured(30.0),
    )
    layers = [
        LayerSpectrum(
            f"l{i}.q_proj",
            "q_proj",
            r=4,
            singular_values=[1.0, 0.9, 0.8, 0.7],
            relative_update=0.05,
            b_norm=1.0,
        )
        for i in range(4)
    ]
    facts.spectrum = [SpectrumSnapshot(100, summarise(layers, 0.1), layers)]
    doctor = Doctor(config, facts, emit=False)
    for i, v in enumerate([2.0, 1.5, 1.2, 1.1, 1.1, 1.1, 1.1, 1.1, 1.1, 1.1]):
        doctor.observe(10 * (i + 1), {"loss": v})
    doctor.run_phase(Phase.END, 100)
    return next(f for f in doctor.findings if f.slug == "rank-saturated")


@pytest.mark.parametrize(
    ("share", "says"), [(0.9, "Memory: r=16 fits"), (0.3, "Memory: r=16 does not fit")]
)
def test_rollback_memory_advice_uses_the_users_threshold(share: float, says: str) -> None:
    saturated = _saturated(DoctorConfig(oom_peak_share=share))
    assert saturated.recommendation is not None
    step = next(s for s in saturated.recommendation.steps if s.startswith("Memory:"))
    assert step.startswith(says)
    assert f"({share:.0%} of 80.00 GiB)" in step


def test_rank_saturated_gives_the_same_rollback_as_the_plateau() -> None:
    from lora_doctor.diagnosis.causes import Findings, Look, diagnose

    config = DoctorConfig(oom_peak_share=0.3)
    saturated = _saturated(config)
    facts = RunFacts(
        has_lora=True,
        adapters={"default": AdapterFacts(r=4, lora_alpha=8)},
        memory=_measured(30.0),
    )
    flat = Finding("LD201", "loss-plateau", Severity.WARNING, 100, "flat", "flat")
    diagnosed = diagnose(Look(flat, Findings([saturated, flat]), facts, config, History()))
    assert diagnosed is not None and diagnosed.top is not None
    assert diagnosed.top.cause == "rank-too-small"
    assert saturated.recommendation == diagnosed.top.fix


# --- 3. a user's own check is a first-class check --------------------------------------------------
class _LossIsFive(Check):
    code, slug, severity = "LD999", "loss-is-five", Severity.WARNING
    phases = frozenset({Phase.LOG})
    reads = (Reads("loss"),)

    def run(self, ctx: Context) -> Iterable[Finding]:
        if 5.0 in ctx.points("loss").new_values:
            yield self.finding(ctx, "Loss hit 5", "It did.")


@pytest.mark.parametrize(
    ("config", "reported", "stops"),
    [
        (DoctorConfig(), True, False),
        (DoctorConfig(ignore={"loss-is-five"}), False, False),
        (DoctorConfig(ignore={"LD999"}), False, False),
        (DoctorConfig(stop_on={"loss-is-five"}), True, True),
    ],
    ids=["reported", "ignored-by-slug", "ignored-by-code", "stops"],
)
def test_user_check_can_be_silenced_and_stopped_on(
    config: DoctorConfig, reported: bool, stops: bool
) -> None:
    doctor = Doctor(config, extra_checks=[_LossIsFive], emit=False)
    doctor.observe(1, {"loss": 5.0})
    assert ("loss-is-five" in {f.slug for f in doctor.findings}) is reported
    assert (doctor.stop_reason is not None) is stops


def test_unknown_names_are_refused_by_the_doctor_that_lacks_the_check() -> None:
    with pytest.raises(ValueError, match=r"unknown finding names \['loss-is-five'\]"):
        Doctor(DoctorConfig(ignore={"loss-is-five"}))


def test_callback_accepts_the_names_of_its_extra_checks() -> None:
    from lora_doctor import LoraDoctorCallback

    LoraDoctorCallback(ignore={"loss-is-five"}, extra_checks=[_LossIsFive])
    with pytest.raises(ValueError, match="unknown finding names"):
        LoraDoctorCallback(ignore={"loss-is-five"})


# --- 4. the custom loop of the README runs the checks -----------------------------------------------
def test_custom_loop_with_watch_runs_the_checks(tmp_path: Path) -> None:
    report = tmp_path / "lora_doctor.json"
    doctor = Doctor(emit=False)
    with watch(doctor, report_path=report):
        doctor.start()
        for step in range(1, 41):
            loss = float("nan") if step == 30 else 2.0 / step
            doctor.observe(step, {"loss": loss})
        doctor.end(report)
    data = json.loads(report.read_text())
    assert [(f["slug"], f["step"]) for f in data["findings"]] == [("non-finite-values", 30)]


# --- 5. overfit is judged in time linear in the number of evaluations --------------------------------
def test_overfit_reads_each_evaluation_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """The eval points handed over across a run equal the evaluations (the earlier check rescanned
    every evaluation at each one: quadratic)."""
    handed = 0
    points = History.points

    def counting(self: History, key: str, start: int = 0):  # type: ignore[no-untyped-def]
        nonlocal handed
        out = points(self, key, start)
        if key.startswith("eval_"):
            handed += len(out[1])
        return out

    monkeypatch.setattr(History, "points", counting)
    doctor = Doctor(None, RunFacts(max_steps=20_000), emit=False)
    for i in range(1, 2001):
        doctor.observe(10 * i, {"loss": 1.0 / i})
        doctor.observe(10 * i, {"eval_loss": 1.0 + 0.001 * np.sin(i)})
    assert handed == 2 * 2000  # non-finite-values and overfit read eval_loss, each point once
