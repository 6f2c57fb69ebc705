"""Memory checks on scripted readings: where oom-risk fires and where it stays quiet, the
out-of-memory report, the estimate by component and fits_rank."""

from __future__ import annotations

import numpy as np
import pytest

from lora_doctor.checks import Phase
from lora_doctor.config import DoctorConfig
from lora_doctor.engine import Doctor
from lora_doctor.facts import AdapterFacts, MemoryFacts, RunFacts
from lora_doctor.memory_estimate import GIB, estimate_memory, estimates_by_rank, fits_rank
from lora_doctor.probes.memory import MemoryReading

CAP = 80 * GIB


def _reading(
    peak_share: float, outside: float = 0.0, retries: int = 0, held_share: float | None = None
) -> MemoryReading:
    """A reading of an 80 GiB device: the allocator's peak at ``peak_share`` of it, ``held_share``
    held between steps (half the peak when None) and ``outside`` GiB held outside PyTorch."""
    peak = int(peak_share * CAP)
    held = int(held_share * CAP) if held_share is not None else peak // 2
    reserved = peak + GIB // 4
    free = CAP - reserved - int(outside * GIB)
    return MemoryReading("cuda:0", peak, reserved, held, reserved, CAP, free, retries, 0)


def _run(
    shares: list[float],
    *,
    held: list[float] | None = None,
    every: int = 10,
    max_steps: int = 1000,
    outside: float = 0.0,
    retries: list[int] | None = None,
    config: DoctorConfig | None = None,
) -> list[str]:
    """Feeds one reading per logging interval to a doctor; returns the oom-risk rules fired.

    ``shares`` are each interval's own peak; like the CUDA allocator, whose peak the doctor never
    resets, the readings report the highest so far. ``held`` is what the run holds between steps
    (each interval's peak minus 20% of the device when None: a leak raises both).
    """
    facts = RunFacts(max_steps=max_steps, memory=MemoryFacts(available=True, capacity=CAP))
    doctor = Doctor(config, facts, emit=False)
    held = held if held is not None else [s - 0.2 for s in shares]
    peak = 0.0
    for i, share in enumerate(shares):
        step = (i + 1) * every
        peak = max(peak, share)
        retry = (retries or [0] * len(shares))[i]
        doctor.observe(step, _reading(peak, outside, retry, held[i]).metrics())
        doctor.run_phase(Phase.LOG, step)
    return [f.evidence["rule"] for f in doctor.findings if f.slug == "oom-risk"]


_noise = np.random.default_rng(0).normal(0, 0.02, 30)


@pytest.mark.parametrize(
    ("kwargs", "rules"),
    [
        ({"shares": [0.6, 0.93, 0.93]}, ["peak"]),
        ({"shares": [0.6, 0.87, 0.87], "outside": 3.0}, ["peak"]),
        ({"shares": [0.7] * 7, "retries": [0, 0, 2, 5, 9, 14, 20]}, ["retries"]),
        ({"shares": [0.30 + 0.01 * i for i in range(12)], "max_steps": 1000}, ["growth"]),
        ({"shares": [0.5] * 30}, []),
        ({"shares": [0.88] * 30}, []),
        ({"shares": list(0.6 + _noise)}, []),
        ({"shares": [0.7] * 7, "retries": [0, 0, 4, 4, 4, 4, 4]}, []),
        ({"shares": [0.30 + 0.001 * i for i in range(12)], "max_steps": 1000}, []),
        ({"shares": [0.30 + 0.01 * i for i in range(12)], "max_steps": 0}, []),
        ({"shares": [0.6] * 6 + [0.7] * 6}, []),
        ({"shares": [0.30 + 0.01 * i for i in range(4)], "max_steps": 1000}, []),
        ({"shares": [0.85, 0.86], "config": DoctorConfig(oom_peak_share=0.8)}, ["peak"]),
        (
            {"shares": [0.30] * 200 + [0.30 + 0.005 * i for i in range(40)], "max_steps": 5000},
            ["growth"],
        ),
        (
            {
                "shares": [0.30] * 200 + [0.30 + 0.005 * i for i in range(40)],
                "max_steps": 5000,
                "config": DoctorConfig(oom_growth_window=300),
            },
            [],
        ),
        (
            {
                "shares": [0.85] + [0.40] * 11,
                "held": [0.10 + 0.01 * i for i in range(12)],
                "max_steps": 1000,
            },
            ["growth"],
        ),
        (
            # the old rule, fed the never-reset peak (a staircase), projected it to capacity
            {"shares": list(0.6 + _noise), "held": [0.4] * 30, "max_steps": 100_000},
            [],
        ),
        ({"shares": [0.4] * 12, "held": list(0.3 + _noise[:12] / 4), "max_steps": 10_000}, []),
    ],
    ids=[
        "peak-93pct",
        "peak-87pct-plus-outside",
        "retries-keep-rising",
        "growth-reaches-capacity",
        "comfortable",
        "flat-below-threshold",
        "noisy-peak",
        "retries-once",
        "growth-too-slow",
        "growth-without-max-steps",
        "one-jump-then-flat",
        "growth-too-few-readings",
        "threshold-from-config",
        "growth-after-long-flat-in-window",
        "growth-diluted-by-wide-window",
        "leak-under-an-earlier-peak",
        "peak-staircase-held-flat",
        "held-noise-long-run",
    ],
)
def test_oom_risk(kwargs: dict, rules: list[str]) -> None:
    assert _run(**kwargs) == rules


def test_oom_risk_growth_names_the_step_it_fills() -> None:
    facts = RunFacts(max_steps=1000, memory=MemoryFacts(available=True, capacity=CAP))
    doctor = Doctor(None, facts, emit=False)
    for i in range(12):
        reading = _reading(0.30 + 0.01 * i, held_share=0.10 + 0.01 * i)
        doctor.observe((i + 1) * 10, reading.metrics())
        doctor.run_phase(Phase.LOG)
    (finding,) = doctor.findings
    # Held memory grows 0.8 GiB per 10 steps; the peak, 32.8 GiB at step 120, reaches 80 GiB
    # near step 710.
    assert 690 <= finding.evidence["full_at_step"] <= 730
    assert finding.evidence["signal"] == "lora_doctor/mem_alloc_gib"
    assert "before max_steps=1000" in finding.message


def test_oom_risk_static_before_training() -> None:
    mem = MemoryFacts(
        available=True,
        capacity=CAP,
        weights_by_dtype={"bf16": 72 * GIB},
        trainable_numel=10**8,
        trainable_bytes=4 * 10**8,
        lora_bytes=4 * 10**8,
        r=16,
        optimizer="AdamW",
    )
    doctor = Doctor(None, RunFacts(memory=mem), emit=False)
    (finding,) = doctor.run_phase(Phase.SETUP)
    assert finding.slug == "oom-risk" and finding.evidence["rule"] == "static"
    mem.weights_by_dtype = {"4-bit": 20 * GIB}
    assert Doctor(None, RunFacts(memory=mem), emit=False).run_phase(Phase.SETUP) == []


def test_no_memory_facts_no_memory_findings() -> None:
    """Offline (no probe ran): the memory checks say nothing."""
    doctor = Doctor(emit=False)
    assert doctor.run_phase(Phase.SETUP) == [] and doctor.run_phase(Phase.END) == []


def _oom_doctor(where: str, batch: int | None = 8, r: int = 8) -> Doctor:
    mem = MemoryFacts(
        available=True,
        capacity=CAP,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=2,
        oom={
            "step": 3,
            "where": where,
            "exception": "torch.OutOfMemoryError",
            "error": "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has ...",
            "reading": _reading(0.98).figures(),
        },
    )
    adapter = AdapterFacts(r=r, lora_alpha=2 * r, target_modules=["q_proj", "k_proj", "v_proj"])
    return Doctor(None, RunFacts(memory=mem, adapters={"default": adapter}), emit=False)


def test_out_of_memory_report_has_figures_step_and_fixes_in_order() -> None:
    (finding,) = _oom_doctor("the training step").run_phase(Phase.END, 2)
    assert (finding.slug, finding.code, finding.step) == ("out-of-memory", "LD302", 3)
    assert finding.evidence["tried_to_allocate"] == "2.00 GiB"
    assert finding.evidence["reading"]["capacity_gib"] == pytest.approx(80.0)
    steps = finding.recommendation.steps
    assert (
        "per_device_train_batch_size=4" in steps[0] and "gradient_accumulation_steps=4" in steps[0]
    )
    assert "r=4 (from 8)" in steps[1] and "lora_alpha=8" in steps[1]
    assert "drop k_proj" in steps[2] and "['q_proj', 'v_proj']" in steps[2]
    assert "gradient_checkpointing=True" in steps[3] and 'optim="paged_adamw_8bit"' in steps[3]
    assert finding.recommendation.config_changes == {
        "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 4,
    }
    assert "78.40 GiB" in finding.message  # the peak at the time


@pytest.mark.parametrize(
    ("where", "batch", "first"),
    [
        ("evaluation", 8, "per_device_eval_batch_size"),
        ("the training step", 1, "shorter sequences"),
        ("training", None, "halve per_device_train_batch_size"),
    ],
    ids=["evaluation", "batch-of-one", "batch-unknown"],
)
def test_out_of_memory_first_fix_follows_the_situation(
    where: str, batch: int | None, first: str
) -> None:
    (finding,) = _oom_doctor(where, batch).run_phase(Phase.END)
    assert first in finding.recommendation.steps[0]


# --- estimate ---------------------------------------------------------------------------------


def _measured(r: int = 8, peak: float = 60.0, optimizer_states: int | None = None) -> MemoryFacts:
    lora = 4 * 10**7  # 10M fp32 LoRA parameters
    return MemoryFacts(
        available=True,
        capacity=CAP,
        weights_by_dtype={"bf16": 14 * GIB, "fp32": GIB // 2},
        trainable_numel=10**7,
        trainable_bytes=lora,
        lora_bytes=lora,
        r=r,
        optimizer="AdamW",
        optimizer_state_bytes=optimizer_states,
        static_bytes=int(14.5 * GIB) + lora + 2 * lora,
        first_peak_bytes=int(peak * GIB),
        outside_bytes=GIB // 2,
    )


def test_estimate_components_and_rank_scaling() -> None:
    mem = _measured()
    base, double, half = (estimate_memory(mem, r) for r in (8, 16, 4))
    assert base.weights == int(14.5 * GIB)
    assert base.optimizer_states == 8 * 10**7  # Adam: two fp32 states per parameter
    assert (double.trainable, half.trainable) == (2 * base.trainable, base.trainable // 2)
    assert double.optimizer_states == 2 * base.optimizer_states
    assert (
        double.activations
        == base.activations
        == mem.first_peak_bytes - mem.static_bytes - 4 * 10**7
    )
    assert double.total - base.total == base.trainable * 2 + base.optimizer_states
    assert set(estimates_by_rank(mem)) == {"8", "16", "4"}


def test_estimate_uses_measured_optimizer_states() -> None:
    assert estimate_memory(_measured(optimizer_states=10**6), 16).optimizer_states == 2 * 10**6


@pytest.mark.parametrize(
    ("mem", "r", "expected"),
    [
        (_measured(peak=60.0), 16, True),
        (_measured(peak=71.0), 64, False),
        (_measured(peak=71.0), 4, True),
        (MemoryFacts(available=False), 16, None),
        (
            MemoryFacts(
                available=True,
                capacity=CAP,
                weights_by_dtype={"bf16": 10 * GIB},
                r=8,
                optimizer="AdamW",
            ),
            16,
            None,
        ),
        (
            MemoryFacts(
                available=True,
                capacity=CAP,
                weights_by_dtype={"bf16": 75 * GIB},
                r=8,
                optimizer="AdamW",
            ),
            16,
            False,
        ),
    ],
    ids=[
        "double-fits",
        "64-does-not",
        "half-fits",
        "no-cuda",
        "before-first-steps",
        "weights-too-big",
    ],
)
def test_fits_rank(mem: MemoryFacts, r: int, expected: bool | None) -> None:
    assert fits_rank(RunFacts(memory=mem), r, 0.9) is expected


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"oom_peak_share": 0}, "DoctorConfig.oom_peak_share must be a number in (0, 1], got 0"),
        (
            {"oom_peak_share": 1.5},
            "DoctorConfig.oom_peak_share must be a number in (0, 1], got 1.5",
        ),
        ({"oom_retry_intervals": 6}, "oom_retry_intervals must be <= oom_retry_window"),
        ({"oom_growth_min_readings": 2}, "oom_growth_min_readings must be an integer >= 3, got 2"),
        (
            {"oom_growth_confidence": 1.0},
            "oom_growth_confidence must be a number in (0, 1), got 1.0",
        ),
        ({"oom_growth_window": 4}, "oom_growth_min_readings must be <= oom_growth_window"),
    ],
    ids=[
        "share-zero",
        "share-above-one",
        "retries-window",
        "growth-readings",
        "confidence",
        "growth-window",
    ],
)
def test_memory_config_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError) as err:
        DoctorConfig(**kwargs)
    assert message in str(err.value)


@pytest.mark.parametrize(
    ("mem", "expected"),
    [
        (
            _measured(peak=60.0),
            "Memory: r=16 fits (estimated peak 60.65 GiB at r=16 against 72.00 GiB",
        ),
        (_measured(peak=71.8), "Memory: r=16 does not fit (estimated peak 72.45 GiB"),
        (None, "If memory allows: r=16"),
    ],
    ids=["fits", "does-not-fit", "no-reading"],
)
def test_rank_rollback_says_whether_the_doubled_rank_fits(
    mem: MemoryFacts | None, expected: str
) -> None:
    from lora_doctor.diagnosis.causes import rollback

    rec = rollback(8, 16, RunFacts(memory=mem), DoctorConfig())
    (step,) = [s for s in rec.steps if "r=16" in s and "emory" in s]
    assert step.startswith(expected)
    assert rec.steps[-1].startswith("Restart from step 0")


@pytest.mark.parametrize(
    ("peaks", "rule"),
    [([0.30 + 0.01 * i for i in range(12)], "growth"), ([0.5, 0.93, 0.93], "peak")],
    ids=["growth-from-interval-peaks", "peak"],
)
def test_offline_logs_saved_by_earlier_versions(peaks: list[float], rule: str) -> None:
    """A trainer_state.json whose log_history holds the lora_doctor/mem_* keys an earlier version
    copied there (the peak since each previous reading, no held memory): the memory checks still
    read them offline."""
    from lora_doctor import diagnose

    log = []
    for i, share in enumerate(peaks):
        metrics = _reading(share).metrics()
        del metrics["lora_doctor/mem_alloc_gib"]  # not recorded before
        log.append({"step": (i + 1) * 10, "loss": 2.0, **metrics})
    found = diagnose({"max_steps": 1000, "log_history": log}).by_slug("oom-risk")
    assert [f.evidence["rule"] for f in found] == [rule]
    if rule == "growth":
        assert found[0].evidence["signal"] == "lora_doctor/mem_peak_alloc_gib"
