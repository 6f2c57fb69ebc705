"""NaN before any update: the numerics of the pass, not the learning rate; DoRA on zero-norm rows;
fixes that follow the run's precision and adapter type. Rules on plain facts, and the shared cases
rebuilt from real reports with their right diagnosis."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
from tiny import shared_case

from lora_doctor.config import DoctorConfig
from lora_doctor.diagnosis.causes import Findings, Look, diagnose, dora_zero_norm_rows
from lora_doctor.engine import Doctor
from lora_doctor.facts import AdapterFacts, LayerFacts, RunFacts, SetupFacts
from lora_doctor.findings import Finding, Severity
from lora_doctor.history import History
from lora_doctor.offline import diagnose as diagnose_run

LORA = {"default": AdapterFacts(r=8, lora_alpha=16)}


def _nan_look(facts: RunFacts, first_step: int, rates: list[float]) -> Look:
    history = History()
    for step, rate in enumerate(rates, start=1):
        history.add(step, {"loss": 0.0, "grad_norm": math.nan, "learning_rate": rate})
    nan = Finding(
        "LD203",
        "non-finite-values",
        Severity.WARNING,
        first_step,
        "t",
        "m",
        {"key": "grad_norm", "first_step": first_step},
    )
    return Look(nan, Findings([nan]), facts, DoctorConfig(), history)


def _top(look: Look) -> str | None:
    diagnosed = diagnose(look)
    assert diagnosed is not None
    return diagnosed.top.cause if diagnosed.top else None


# --- the numerics of the pass -----------------------------------------------------------------
@pytest.mark.parametrize(
    ("first_step", "rates", "lr", "top"),
    [
        (1, [2e-4, 2e-4], 2e-4, "forward-numerics"),
        (1, [0.05, 0.05], 0.05, "forward-numerics"),
        (3, [0.0, 0.0, 0.0], 2e-4, "forward-numerics"),
        (3, [0.0, 1e-5, 2e-5], 0.05, "learning-rate-too-high"),
        (3, [2e-4, 2e-4, 2e-4], 2e-4, None),
    ],
    ids=[
        "step-1",
        "step-1-with-a-rate-far-too-high",
        "while-warm-up-is-at-0",
        "after-updates-far-too-high",
        "after-updates-no-fact",
    ],
)
def test_nan_before_any_update_is_the_pass_not_the_rate(
    first_step: int, rates: list[float], lr: float, top: str | None
) -> None:
    facts = RunFacts(has_lora=True, adapters=LORA, learning_rate=lr)
    look = _nan_look(facts, first_step, rates)
    assert _top(look) == top
    lr_cause = next(c for c in diagnose(look).causes if c.cause == "learning-rate-too-high")  # type: ignore[union-attr]
    before = "the first non-finite value came before any weight update"
    assert (before in lr_cause.against) is (top == "forward-numerics")


def test_a_nan_after_updates_with_no_fact_lists_the_pass_to_rule_out() -> None:
    """A NaN at step 40 of an fp32 run at a usual rate, with no rise or spike before it: no cause
    is named, and the pass's numerics are the first to rule out, then a bad batch."""
    facts = RunFacts(
        has_lora=True, adapters=LORA, learning_rate=2e-4, setup=SetupFacts(precision="fp32")
    )
    diagnosed = diagnose(_nan_look(facts, 3, [2e-4, 2e-4, 2e-4]))
    assert diagnosed is not None and diagnosed.top is None
    assert [c.cause for c in diagnosed.open] == ["forward-numerics", "bad-batch"]
    numerics = diagnosed.open[0]
    assert numerics.fix is not None and "learning rate is not the cause" not in numerics.fix.summary


@pytest.mark.parametrize(
    ("precision", "first_step", "absent"),
    [
        ("fp16", "Run one batch in fp32 (fp16=False)", "bf16=False"),
        ("bf16", "Run one batch in fp32 (bf16=False)", "fp16=False"),
        ("fp32", "Run one batch with torch.autograd.set_detect_anomaly(True)", "fp32 ("),
        (None, "Check the precision in use", "Run one batch in fp32"),
    ],
    ids=["fp16", "bf16", "fp32", "unknown"],
)
def test_numerics_fix_follows_the_precision(
    precision: str | None, first_step: str, absent: str
) -> None:
    facts = RunFacts(has_lora=True, adapters=LORA, setup=SetupFacts(precision=precision))
    diagnosed = diagnose(_nan_look(facts, 1, [0.0]))
    assert diagnosed is not None
    numerics = next(c for c in diagnosed.causes if c.cause == "forward-numerics")
    assert numerics.verdict == "supported" and numerics.fix is not None
    assert numerics.fix.steps[0].startswith(first_step)
    assert not any(absent in s for s in numerics.fix.steps)
    assert numerics.fix.config_changes == {}


def test_fp16_overflow_leads_an_fp16_run_and_is_ruled_out_on_fp32() -> None:
    fp16 = RunFacts(has_lora=True, adapters=LORA, setup=SetupFacts(precision="fp16"))
    fp32 = replace(fp16, setup=SetupFacts(precision="fp32"))
    assert _top(_nan_look(fp16, 1, [0.0])) == "fp16-overflow"
    causes = {c.cause: c for c in diagnose(_nan_look(fp32, 1, [0.0])).causes}  # type: ignore[union-attr]
    assert causes["fp16-overflow"].verdict == "ruled-out"
    assert _top(_nan_look(fp32, 1, [0.0])) == "forward-numerics"


# --- DoRA on rows of zero norm ----------------------------------------------------------------------
def _dora_layer(name: str, zero_rows: int | None, dora: bool = True) -> LayerFacts:
    return LayerFacts(name=name, r=8, use_dora=dora, d_out=64, zero_norm_rows=zero_rows)


@pytest.mark.parametrize(
    ("layers", "adapters", "verdict", "named"),
    [
        (
            [
                _dora_layer("m.layers.0.self_attn.q_proj", 0),
                _dora_layer("m.layers.0.self_attn.o_proj", 16),
            ],
            LORA,
            "supported",
            "o_proj",
        ),
        ([_dora_layer("m.layers.0.self_attn.q_proj", 0)], LORA, "ruled-out", ""),
        ([_dora_layer("m.layers.0.self_attn.q_proj", None)], LORA, "supported", ""),
        ([], {"default": AdapterFacts(r=8, lora_alpha=16, use_dora=True)}, "supported", ""),
        ([_dora_layer("m.layers.0.self_attn.q_proj", None, dora=False)], LORA, "ruled-out", ""),
    ],
    ids=[
        "zero-rows-read",
        "no-zero-rows",
        "rows-not-readable",
        "offline-config-says-dora",
        "not-dora",
    ],
)
def test_dora_cause(layers: list[LayerFacts], adapters: dict, verdict: str, named: str) -> None:
    facts = RunFacts(has_lora=True, adapters=adapters, layers=layers)
    cause = dora_zero_norm_rows(_nan_look(facts, 2, [2e-4, 2e-4]))
    assert cause is not None and cause.verdict == verdict
    if named:
        assert "16 of 64 rows" in cause.support[0]
        assert cause.fix is not None and f"({named})" in cause.fix.summary


# --- messages that fit the precision ----------------------------------------------------------------
@pytest.mark.parametrize(
    ("setup", "says_fp16"),
    [
        (SetupFacts(fp16=True), True),
        (SetupFacts(), True),
        (SetupFacts(bf16=True), False),
        (SetupFacts(trainable_dtypes=["float32"]), False),
    ],
    ids=["fp16", "unknown", "bf16", "fp32"],
)
def test_non_finite_grad_norm_message_fits_the_precision(
    setup: SetupFacts, says_fp16: bool
) -> None:
    doctor = Doctor(facts=RunFacts(setup=setup), emit=False)
    doctor.observe(5, {"loss": 2.0, "grad_norm": math.nan})
    (f,) = [f for f in doctor.findings if f.slug == "non-finite-values"]
    assert ("under fp16 the loss scaler" in f.message) is says_fp16


def test_loss_hidden_as_zero_gives_no_cause_specific_fix() -> None:
    doctor = Doctor(emit=False)
    doctor.observe(1, {"loss": 1.0, "grad_norm": 1.0})
    doctor.observe(2, {"loss": 0.0, "grad_norm": math.nan})
    (f,) = [f for f in doctor.findings if f.slug == "zero-loss"]
    assert f.recommendation is not None
    assert f.recommendation.config_changes == {"logging_nan_inf_filter": False}
    text = " ".join([f.recommendation.summary, *f.recommendation.steps])
    assert "learning_rate" not in text and "bf16" not in text and "Halve" not in text


# --- the shared cases -------------------------------------------------------------------------------
def _recommended(findings: list[Finding]) -> str:
    return " ".join(
        " ".join(
            [
                f.recommendation.summary,
                *f.recommendation.steps,
                str(f.recommendation.config_changes),
            ]
        )
        for f in findings
        if f.recommendation is not None
    )


def test_case_nan_before_any_update() -> None:
    """grad norm NaN from step 1, where the learning rate is still 0, then losses logged as 0.0:
    non-finite values hidden as a zero loss, from the forward/backward numerics; lowering the
    learning rate is not the first fix."""
    d = diagnose_run(shared_case("nan-before-any-update"))
    (nan,) = d.by_slug("non-finite-values")
    (hidden,) = d.by_slug("zero-loss")
    assert hidden.evidence["beside_nan_grad"] and "the real loss was NaN" in hidden.message
    assert nan.evidence["causes"][0]["cause"] == "forward-numerics"
    assert nan.evidence["causes"][0]["verdict"] == "supported"
    assert "Most likely cause: the forward or backward numerics" in nan.message
    lr = next(c for c in nan.evidence["causes"] if c["cause"] == "learning-rate-too-high")
    assert lr["verdict"] == "ruled-out"
    assert "learning_rate" not in _recommended(d.findings)
    assert "learning-rate-too-high" not in d.slugs


def test_case_lr_far_too_high_nan() -> None:
    """LoRA r 8 on q/v, cosine from a peak of 0.05, every log loss 0.0 and grad norm NaN: the
    learning rate named as the cause, about 250x LoRA's usual rate, and a fix in LoRA's range
    (halving would still blow up)."""
    d = diagnose_run(shared_case("lr-far-too-high-nan"))
    (nan,) = d.by_slug("non-finite-values")
    assert nan.evidence["causes"][0] == {
        **nan.evidence["causes"][0],
        "cause": "learning-rate-too-high",
        "verdict": "supported",
    }
    assert "250x its usual 0.0002" in nan.message
    assert nan.recommendation is not None
    target = nan.recommendation.config_changes["learning_rate"]
    assert 1e-5 <= target <= 1e-3
    (setup,) = d.by_slug("learning-rate-too-high")
    assert setup.severity is Severity.WARNING and "assumed" in setup.message
    assert 1e-5 <= setup.recommendation.config_changes["learning_rate"] <= 1e-3  # type: ignore[union-attr]
    assert "Halve" not in _recommended(d.findings)
