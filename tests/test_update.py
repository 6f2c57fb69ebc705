"""learning-rate-too-high and update-too-large: the rules on plain numbers, the checks on plain
facts, and the learning rate and update size as causes the diagnosis pass ranks (no model)."""

from __future__ import annotations

import math

import pytest

from lora_doctor.checks.update import lr_verdict, update_verdict
from lora_doctor.config import DoctorConfig
from lora_doctor.diagnosis.causes import Findings, Look, diagnose, lr_too_high
from lora_doctor.engine import Doctor
from lora_doctor.facts import AdapterFacts, LayerSpectrum, RunFacts, SetupFacts, SpectrumSnapshot
from lora_doctor.findings import Finding, Severity
from lora_doctor.history import History

CFG = DoctorConfig()
LORA = {"default": AdapterFacts(r=8, lora_alpha=16)}


# --- the learning-rate rule ---------------------------------------------------------------------
@pytest.mark.parametrize(
    ("lr", "optimizer", "severity", "factor"),
    [
        (2e-4, "adamw_torch", None, None),
        (1e-3, "adamw_torch", None, None),
        (2e-3, "adamw_torch", Severity.INFO, 2.0),
        (1e-2, "adamw_torch", Severity.WARNING, 10.0),
        (0.05, None, Severity.WARNING, 50.0),
        (0.1, "paged_adamw_8bit", Severity.ERROR, 100.0),
        (0.5, "adamw_torch_fused", Severity.ERROR, 500.0),
        (3e-3, "lion_32bit", Severity.WARNING, 10.0),
        (0.05, "SGD", None, None),
        (1e-2, "adafactor", Severity.INFO, 10 / 3),
        (None, "adamw_torch", None, None),
        (0.0, "adamw_torch", None, None),
        (math.nan, "adamw_torch", None, None),
    ],
    ids=[
        "adamw-qlora-rate",
        "adamw-top-of-range",
        "adamw-tiny-model-rate",
        "adamw-10x",
        "unknown-optimizer-0.05",
        "paged-adamw-100x",
        "adamw-0.5",
        "lion-10x",
        "sgd-in-its-range",
        "adafactor-above",
        "unknown-rate",
        "zero-rate",
        "nan-rate",
    ],
)
def test_lr_verdict(
    lr: float | None, optimizer: str | None, severity: Severity | None, factor: float | None
) -> None:
    v = lr_verdict(lr, optimizer, CFG)
    if severity is None:
        assert v is None
        return
    assert v is not None
    assert (v.severity, v.factor) == (severity, pytest.approx(factor))
    assert v.far is (severity is not Severity.INFO)


@pytest.mark.parametrize(
    ("hidden_size", "lr", "severity", "top"),
    [
        (None, 2e-3, Severity.INFO, 1e-3),  # unknown width: a 7B model's range
        (4096, 1e-3, None, 1e-3),
        (768, 2e-3, None, 2.3e-3),  # LoRA's RoBERTa-base runs: 4e-4 to 5e-4
        (64, 2e-3, None, 2.3e-3),  # below the widths the sources cover: a 768-wide model's range
        (64, 0.05, Severity.WARNING, 2.3e-3),
        (8192, 1e-3, Severity.INFO, 7.1e-4),  # QLoRA's 65B runs: 1e-4
        (16384, 1e-3, Severity.INFO, 7.1e-4),  # above: a 65B model's range
    ],
    ids=["unknown", "7b", "768", "tiny", "tiny-far-above", "65b", "wider-than-covered"],
)
def test_lr_range_follows_the_hidden_size(
    hidden_size: int | None, lr: float, severity: Severity | None, top: float
) -> None:
    """LoRA's usual rates fall about as 1 / sqrt(hidden size) (LoRA's and QLoRA's published
    rates), held to the 768 to 8192 the sources cover."""
    from lora_doctor.practice import lr_range

    rng = lr_range("adamw_torch", hidden_size=hidden_size)
    assert rng.high == pytest.approx(top)
    assert rng.low < rng.typical < rng.high and rng.typical == pytest.approx(top / 5, rel=0.05)
    v = lr_verdict(lr, "adamw_torch", CFG, hidden_size=hidden_size)
    assert (v.severity if v else None) == severity


def test_lr_verdict_thresholds_follow_the_config() -> None:
    cfg = DoctorConfig(lr_high_warning=3.0, lr_high_error=5.0)
    assert [lr_verdict(x, None, cfg).severity for x in (2e-3, 3e-3, 5e-3)] == [  # type: ignore[union-attr]
        Severity.INFO,
        Severity.WARNING,
        Severity.ERROR,
    ]


@pytest.mark.parametrize(
    ("fields", "name"),
    [
        ({"lr_high_warning": 0.5}, "lr_high_warning"),
        ({"lr_high_error": math.inf}, "lr_high_error"),
        ({"lr_high_warning": 200.0}, "lr_high_warning must be <= lr_high_error"),
        ({"update_too_large": 0}, "update_too_large"),
        ({"reward_tied_steps": 0}, "reward_tied_steps"),
    ],
    ids=["warning-below-1", "error-infinite", "warning-above-error", "update-zero", "ties-zero"],
)
def test_config_rejects_bad_values(fields: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        DoctorConfig(**fields)


# --- the learning-rate check ------------------------------------------------------------------
def _setup_findings(facts: RunFacts) -> list[Finding]:
    doctor = Doctor(facts=facts, emit=False)
    doctor.start()
    return [f for f in doctor.findings if f.slug == "learning-rate-too-high"]


@pytest.mark.parametrize(
    ("facts", "severity"),
    [
        (RunFacts(has_lora=True, adapters=LORA, learning_rate=2e-4), None),
        (RunFacts(has_lora=True, adapters=LORA, learning_rate=2e-3), Severity.INFO),
        (
            RunFacts(
                has_lora=True, adapters=LORA, learning_rate=2e-3, setup=SetupFacts(hidden_size=64)
            ),
            None,
        ),
        (RunFacts(has_lora=True, adapters=LORA, learning_rate=0.05), Severity.WARNING),
        (RunFacts(has_lora=None, adapters=LORA, learning_rate=0.3), Severity.ERROR),
        (RunFacts(has_lora=None, learning_rate=0.02), Severity.INFO),
        (RunFacts(has_lora=False, learning_rate=0.3), None),
        (
            RunFacts(has_lora=True, learning_rate=0.05, setup=SetupFacts(optimizer="sgd")),
            None,
        ),
    ],
    ids=[
        "usual",
        "tiny-model-rate-info",
        "tiny-model-rate-known-width",
        "far-above",
        "offline-lora-config",
        "offline-no-lora-config",
        "no-lora",
        "sgd",
    ],
)
def test_learning_rate_too_high_fires_and_stays_quiet(
    facts: RunFacts, severity: Severity | None
) -> None:
    found = _setup_findings(facts)
    assert [f.severity for f in found] == ([severity] if severity else [])


def test_far_too_high_rate_sets_one_in_the_range_and_says_what_is_assumed() -> None:
    (f,) = _setup_findings(RunFacts(has_lora=True, adapters=LORA, learning_rate=0.05))
    assert f.code == "LD114" and f.step is None
    assert "50x the top of LoRA's usual range" in f.message
    assert "250x its usual 0.0002" in f.message
    assert "AdamW, assumed as the optimizer is not known" in f.message
    assert "width is not known here" in f.message and "7B model's (hidden size 4096)" in f.message
    assert f.evidence["optimizer_assumed"] is True
    assert f.recommendation is not None
    assert f.recommendation.config_changes == {"learning_rate": 2e-4}
    assert f.recommendation.restart_from_scratch


def test_a_known_width_is_said_and_not_assumed() -> None:
    facts = RunFacts(
        has_lora=True, adapters=LORA, learning_rate=0.05, setup=SetupFacts(hidden_size=64)
    )
    (f,) = _setup_findings(facts)
    assert "at hidden size 64, as for 768, the narrowest the sources cover" in f.message
    assert "width is not known" not in f.message and f.evidence["hidden_size"] == 64


def test_rate_a_little_above_the_range_changes_nothing() -> None:
    (f,) = _setup_findings(RunFacts(has_lora=True, adapters=LORA, learning_rate=2e-3))
    assert f.recommendation is None  # a two-layer model trains well at 2e-3: no config change


def test_offline_run_reads_the_peak_logged_rate() -> None:
    from lora_doctor.offline import diagnose as diagnose_run

    log = [{"step": s, "loss": 2.0, "learning_rate": 0.2 * s / 10} for s in range(1, 11)]
    lora = {"r": 8, "lora_alpha": 16, "peft_type": "LORA"}
    (f,) = diagnose_run(log, adapter_config=lora).by_slug("learning-rate-too-high")
    assert f.severity is Severity.ERROR and f.evidence["learning_rate"] == pytest.approx(0.2)
    assert "assumed" in f.message


def test_offline_rate_without_a_lora_config_may_be_prompt_tuning() -> None:
    """P-tuning v2 trains at 2e-2 (two runs of the wild corpus): information, no change."""
    from lora_doctor.offline import diagnose as diagnose_run

    log = [{"step": s, "loss": 2.0, "learning_rate": 0.02} for s in range(1, 11)]
    (f,) = diagnose_run(log).by_slug("learning-rate-too-high")
    assert f.severity is Severity.INFO and f.recommendation is None
    assert "prompt tuning" in f.message


# --- the update-size rule and check -----------------------------------------------------------
def _layer(i: int, value: float | None, **kw) -> LayerSpectrum:
    return LayerSpectrum(
        f"model.layers.{i}.self_attn.q_proj", "q_proj", relative_update=value, **kw
    )


@pytest.mark.parametrize(
    ("values", "fires", "over"),
    [
        ([0.1, 0.2, 0.3], False, 0),
        ([500.0, 740.0, 610.0], True, 3),
        ([3.0, 0.5, 2.5], True, 2),
        ([3.0, 0.5, 0.4], False, 0),
        ([None, None], False, 0),
        ([math.nan, 5.0, 4.0], True, 2),
        ([], False, 0),
    ],
    ids=[
        "healthy",
        "lr-0.5",
        "median-over",
        "one-layer-over",
        "unreadable",
        "nan-left-out",
        "no-layers",
    ],
)
def test_update_verdict(values: list[float | None], fires: bool, over: int) -> None:
    v = update_verdict([_layer(i, x) for i, x in enumerate(values)], 2.0)
    assert (v is not None) is fires
    if v is not None:
        assert len(v.largest) == over
        assert [x for _, x in v.largest] == sorted((x for _, x in v.largest), reverse=True)


def test_update_verdict_leaves_out_layers_that_start_nonzero() -> None:
    pissa = [_layer(i, 5.0, init_nonzero=True) for i in range(3)]
    assert update_verdict(pissa, 2.0) is None
    assert update_verdict([*pissa, _layer(9, 3.0)], 2.0) is not None


def _spectrum(values: list[float], step: int = 50) -> SpectrumSnapshot:
    layers = [_layer(i, x, r=8, singular_values=[1.0] * 8) for i, x in enumerate(values)]
    return SpectrumSnapshot(step=step, kinds={"q_proj": {"relative_update": 600.0}}, layers=layers)


def _looked(facts: RunFacts) -> Doctor:
    doctor = Doctor(facts=facts, emit=False)
    doctor.observe(50, {"loss": 3.0})
    return doctor


@pytest.mark.parametrize(
    ("lr", "adapter", "top"),
    [
        (0.5, LORA, "learning-rate-too-high"),
        (2e-4, {"default": AdapterFacts(r=8, lora_alpha=128)}, "alpha-too-large"),
        (2e-3, LORA, "learning-rate-too-high"),
        (2e-4, LORA, None),
    ],
    ids=["lr-far-too-high", "alpha-16r", "lr-above-range-with-the-big-update", "no-fact"],
)
def test_update_too_large_names_its_cause(lr: float, adapter: dict, top: str | None) -> None:
    facts = RunFacts(has_lora=True, adapters=adapter, learning_rate=lr, max_steps=100)
    facts.spectrum.append(_spectrum([500.0, 740.0, 610.0]))
    (f,) = [f for f in _looked(facts).findings if f.slug == "update-too-large"]
    assert f.code == "LD405" and f.severity is Severity.WARNING
    assert "740" in f.message and f.evidence["median_relative_update"] == 610.0
    causes = f.evidence["causes"]
    supported = [c["cause"] for c in causes if c["verdict"] == "supported"]
    assert (supported[0] if supported else None) == top
    if top is None:  # learning rate in range, alpha = 2r: both ruled out, and said
        assert "Ruled out by the run's facts" in f.message


def test_update_too_large_quiet_on_a_healthy_update() -> None:
    facts = RunFacts(has_lora=True, adapters=LORA, learning_rate=2e-4, max_steps=100)
    facts.spectrum.append(_spectrum([0.1, 0.3, 0.2]))
    assert "update-too-large" not in {f.slug for f in _looked(facts).findings}


# --- the learning rate as a cause ---------------------------------------------------------------
def _look(slug: str, facts: RunFacts, log: list[dict], found: tuple[Finding, ...] = ()) -> Look:
    history = History()
    for entry in log:
        history.add(entry["step"], entry)
    symptom = Finding("LD000", slug, Severity.ERROR, log[-1]["step"] if log else 1, "t", "m")
    return Look(symptom, Findings([*found, symptom]), facts, CFG, history)


def _log(losses: list[float], rates: list[float]) -> list[dict]:
    return [
        {"step": 5 * (i + 1), "loss": x, "learning_rate": r}
        for i, (x, r) in enumerate(zip(losses, rates, strict=True))
    ]


@pytest.mark.parametrize(
    ("lr", "adapters", "found", "verdict"),
    [
        (0.3, LORA, (), "supported"),
        (2e-3, LORA, (), "open"),
        (2e-4, LORA, (), "ruled-out"),
        (2e-3, LORA, ("update-too-large",), "supported"),
        (None, LORA, (), "open"),
        (0.3, {}, (), "open"),
    ],
    ids=[
        "far-above",
        "a-little-above",
        "in-range",
        "a-little-above-big-update",
        "unknown-rate",
        "far-above-no-lora-config",
    ],
)
def test_lr_too_high_verdict(
    lr: float | None, adapters: dict, found: tuple[str, ...], verdict: str
) -> None:
    others = tuple(Finding("LD405", s, Severity.WARNING, 5, s, s) for s in found)
    facts = RunFacts(learning_rate=lr, adapters=adapters)
    look = _look("loss-divergence", facts, _log([2.0], [lr or 0]), others)
    assert lr_too_high(look).verdict == verdict


@pytest.mark.parametrize(
    ("losses", "rates", "target"),
    [
        ([4.0, 2.0, 1.0, 3.0, 4.5], [0.01, 0.02, 0.03, 0.2, 0.3], 1e-3),
        ([4.0, 2.0, 3.0], [1e-4, 1e-3, 0.3], 5e-4),
        ([0.0, 0.0, 0.0], [0.05, 0.05, 0.05], 2e-4),
        ([4.0, 5.0, 6.0], [0.5, 0.5, 0.5], 2e-4),
        ([4.0, 3.9, 4.1], [0.05, 0.05, 0.05], 2e-4),
        ([math.nan, math.nan], [0.05, 0.05], 2e-4),
    ],
    ids=[
        "best-under-warmup-capped-at-top",
        "best-inside-range-halved",
        "hidden-nan-zeros-are-no-best",
        "never-fell",
        "noise-is-no-fall",
        "nan-from-start",
    ],
)
def test_lr_fix_sets_a_rate_in_the_range(
    losses: list[float], rates: list[float], target: float
) -> None:
    facts = RunFacts(adapters=LORA, learning_rate=rates[-1])
    look = _look("loss-divergence", facts, _log(losses, rates))
    fix = lr_too_high(look).fix
    assert fix is not None and fix.config_changes == {"learning_rate": target}
    assert 1e-5 <= target <= 1e-3
    own = "at which this run reached its best loss" in fix.steps[0]
    assert own is (target != 2e-4)


@pytest.mark.parametrize("hidden_size", [64, 1024, 1536, 2048, 5120, 6656, 8192])
def test_the_fix_from_the_run_stays_in_the_range_at_any_width(hidden_size: int) -> None:
    """Half the rate at the best loss, capped at the top: rounding to one digit never lifts it
    above a top such as 1.6e-3 (1536 wide), which would drop the run's own rate for the usual one."""
    from lora_doctor.practice import lr_range

    facts = RunFacts(adapters=LORA, learning_rate=0.3, setup=SetupFacts(hidden_size=hidden_size))
    look = _look("loss-divergence", facts, _log([4.0, 2.0, 1.0, 3.0], [0.005, 0.01, 0.02, 0.3]))
    fix = lr_too_high(look).fix
    top = lr_range(None, hidden_size=hidden_size).high
    assert fix is not None and fix.config_changes == {"learning_rate": top}
    assert "capped at the top of the range" in fix.steps[0]


@pytest.mark.parametrize(
    ("slug", "lr", "top"),
    [
        ("non-finite-values", 0.05, "learning-rate-too-high"),
        ("grad-norm-spike", 0.2, "learning-rate-too-high"),
        ("loss-plateau", 0.2, "learning-rate-too-high"),
        ("loss-divergence", 2e-3, None),
    ],
    ids=["nan", "spike", "plateau", "a-little-above-is-no-verdict"],
)
def test_far_too_high_rate_is_the_top_cause_of_each_symptom(
    slug: str, lr: float, top: str | None
) -> None:
    facts = RunFacts(adapters=LORA, learning_rate=lr)
    diagnosed = diagnose(_look(slug, facts, _log([2.0, 2.1], [lr, lr])))
    assert diagnosed is not None
    assert (diagnosed.top.cause if diagnosed.top else None) == top
