"""Nothing learned and catastrophes in the first logs: ``loss-at-chance`` (LD208),
``weights-not-updating`` (LD209), and the early rules of ``loss-divergence`` and
``grad-norm-spike``. Table tests of each rule (must fire, must stay quiet), the cases rebuilt from
real reports (``tests/cases``), and real Trainer runs on tiny models."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from lora_doctor import diagnose
from lora_doctor.checks import Phase
from lora_doctor.checks.curves import spike_scan
from lora_doctor.checks.learning import stuck_loss
from lora_doctor.config import DoctorConfig
from lora_doctor.engine import Doctor
from lora_doctor.facts import LayerFacts, RunFacts
from lora_doctor.findings import Finding, Severity
from lora_doctor.offline import replay

CASES = Path(__file__).resolve().parent / "cases"
N = 100
LN128 = math.log(128)


def _noise(n: int, sd: float, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0.0, sd, n)


def _log(
    loss: np.ndarray | list[float],
    grad: np.ndarray | list[float] | None = None,
    lr: float | list[float] = 2e-4,
    per_epoch: int | None = None,
    **extra: float,
) -> list[dict]:
    """Log entries at steps 1..n; ``per_epoch`` steps make one epoch (the ``epoch`` key)."""
    n = len(loss)
    grads = [0.8] * n if grad is None else list(grad)
    rates = [lr] * n if isinstance(lr, float) else list(lr)
    out = []
    for i in range(n):
        entry = {"loss": float(loss[i]), "grad_norm": float(grads[i]), "learning_rate": rates[i]}
        if per_epoch:
            entry["epoch"] = (i + 1) / per_epoch
        out.append({**entry, **extra, "step": i + 1})
    return out


def _doctor(
    entries: list[dict],
    max_steps: int = N,
    vocab: int | None = None,
    config: DoctorConfig | None = None,
    **facts: object,
) -> Doctor:
    run = RunFacts(max_steps=max_steps, **facts)  # type: ignore[arg-type]
    run.setup.vocab_size = vocab
    return replay(Doctor(config, run, emit=False), entries)


def _slugs(doctor: Doctor) -> set[str]:
    return {f.slug for f in doctor.findings}


def _one(findings: list[Finding], slug: str) -> Finding:
    found = [f for f in findings if f.slug == slug]
    assert len(found) == 1, [(f.slug, f.step, f.title) for f in findings]
    return found[0]


def _causes(finding: Finding) -> list[tuple[str, str]]:
    return [(c["cause"], c["verdict"]) for c in finding.evidence.get("causes", [])]


def _no_rank_advice(finding: Finding) -> None:
    """Neither check ever points at the rank: no rank cause, no change of r, no rank words."""
    assert all(c != "rank-too-small" for c, _ in _causes(finding))
    changes = finding.recommendation.config_changes if finding.recommendation else {}
    assert "r" not in changes
    assert "rank" not in finding.title.lower()


T = np.arange(1, N + 1) / N


# --- loss-at-chance: the rule on arrays -------------------------------------------------------------
STUCK = {
    # (loss, vocab_size) -> "chance", "first" (never fell) or None (quiet)
    "at-chance-from-start": (LN128 + _noise(N, 0.05), 128, "chance"),
    "rose-to-chance": (np.r_[np.full(3, 1.5), LN128 + _noise(N - 3, 0.05, 1)], 128, "chance"),
    "above-chance": (1.3 * LN128 + _noise(N, 0.05, 2), 128, "chance"),
    "never-fell-offline": (3.0 + _noise(N, 0.03, 3), None, "first"),
    "never-fell-below-chance": (2.0 + _noise(N, 0.02, 4), 32000, "first"),
    "healthy-from-chance": (
        LN128 * (0.5 + 0.53 * np.exp(-T / 0.05)) + _noise(N, 0.03, 5),
        128,
        None,
    ),
    "falls-through-chance": (LN128 * (1.6 - 1.1 * T) + _noise(N, 0.03, 6), 128, None),
    "fell-then-flat": (1.6 + 0.4 * np.exp(-T / 0.03) + _noise(N, 0.02, 7), 32000, None),
    "summed-loss": (500 + 300 * np.exp(-T / 0.03) + _noise(N, 2.0, 8), 32000, None),
    "classification": (0.3 + 0.4 * np.exp(-T / 0.1) + _noise(N, 0.02, 9), 50265, None),
}


@pytest.mark.parametrize("case", list(STUCK), ids=list(STUCK))
def test_stuck_loss_rule(case: str) -> None:
    loss, vocab, want = STUCK[case]
    x = np.arange(1.0, N + 1)
    verdict = stuck_loss(x, loss, float(N), math.log(vocab) if vocab else None, DoctorConfig())
    got = None if verdict is None else ("first" if verdict.chance is None else "chance")
    assert got == want, verdict


# --- loss-at-chance: in the engine ------------------------------------------------------------------
@pytest.mark.parametrize(
    ("case", "severity"),
    [
        ("at-chance-from-start", Severity.ERROR),
        ("above-chance", Severity.ERROR),
        ("never-fell-offline", Severity.WARNING),
    ],
    ids=["at-chance", "above-chance", "never-fell"],
)
def test_loss_at_chance_fires_no_later_than_the_plateau(case: str, severity: Severity) -> None:
    loss, vocab, _ = STUCK[case]
    doctor = _doctor(_log(loss), vocab=vocab)
    found = _one(doctor.findings, "loss-at-chance")
    assert found.severity is severity
    assert "loss-plateau" not in _slugs(doctor)  # explained: a loss that never learned
    _no_rank_advice(found)
    ignored = DoctorConfig(ignore={"loss-at-chance"})
    plateau = _one(_doctor(_log(loss), vocab=vocab, config=ignored).findings, "loss-plateau")
    assert found.step is not None and plateau.step is not None and found.step <= plateau.step


def test_loss_at_chance_tells_a_destroyed_model() -> None:
    """Rising to chance from far below is a model its updates destroyed: the verdict says so, and
    the learning rate far above LoRA's range is the most likely cause."""
    loss, vocab, _ = STUCK["rose-to-chance"]
    config = DoctorConfig(ignore={"loss-divergence"})  # the early divergence would explain it
    # live (the vocabulary is read from the model): a LoRA run, so LoRA's rates apply
    doctor = _doctor(
        _log(loss, lr=0.3), vocab=vocab, config=config, learning_rate=0.3, has_lora=True
    )
    found = _one(doctor.findings, "loss-at-chance")
    assert found.evidence["damaged"] is True and "destroyed" in found.message
    assert _causes(found)[0] == ("learning-rate-too-high", "supported")
    assert found.recommendation is not None
    assert found.recommendation.config_changes == {"learning_rate": 2e-4}


@pytest.mark.parametrize(
    ("lr", "top"),
    [(1e-6, "learning-rate-too-low"), (0.3, "learning-rate-too-high")],
    ids=["lr-too-low", "lr-too-high"],
)
def test_loss_at_chance_causes_follow_the_learning_rate(lr: float, top: str) -> None:
    loss, vocab, _ = STUCK["at-chance-from-start"]
    doctor = _doctor(_log(loss, lr=lr), vocab=vocab, learning_rate=lr, has_lora=True)
    found = _one(doctor.findings, "loss-at-chance")
    assert _causes(found)[0] == (top, "supported")
    assert "Most likely cause" in found.message


def test_a_jump_to_chance_is_a_divergence_first() -> None:
    """A loss destroyed at its fourth log: loss-divergence reports it within the first ten logs,
    and the loss at chance it then sits at is not reported again."""
    loss, vocab, _ = STUCK["rose-to-chance"]
    doctor = _doctor(_log(loss), vocab=vocab)
    assert _slugs(doctor) == {"loss-divergence"}
    assert _one(doctor.findings, "loss-divergence").step == 10


@pytest.mark.parametrize(
    "case",
    ["healthy-from-chance", "falls-through-chance", "fell-then-flat", "classification"],
    ids=["healthy-tiny", "falls-through", "pretrained-plateau", "classification"],
)
def test_loss_at_chance_quiet(case: str) -> None:
    loss, vocab, _ = STUCK[case]
    assert "loss-at-chance" not in _slugs(_doctor(_log(loss), vocab=vocab))


def test_loss_at_chance_is_off_for_rl_runs() -> None:
    loss, vocab, _ = STUCK["at-chance-from-start"]
    doctor = _doctor(_log(loss, reward=0.5, reward_std=0.1), vocab=vocab)
    assert "loss-at-chance" not in _slugs(doctor)


# --- weights-not-updating -----------------------------------------------------------------------------
EPOCH = [0.9741, 1.3742, 1.239, 0.967, 1.0386, 1.1681, 1.224, 0.961]  # the reported case's epoch
FLAT = 2.0 + _noise(40, 0.02, 11)


def _shuffled_epochs() -> list[float]:
    rng = np.random.default_rng(0)
    return [v for _ in range(4) for v in rng.permutation(EPOCH)]


def _decay_to_zero(n: int) -> list[float]:
    return [2e-4 * (1 - (i + 1) / n) for i in range(n)]


NOT_UPDATING = {
    "repeats-every-epoch": (_log(EPOCH * 4, per_epoch=8), 14),
    "repeats-every-epoch-sparse-logs": (
        [{**e, "step": 2 * e["step"], "epoch": e["step"] / 8} for e in _log(EPOCH * 4)],
        28,
    ),
    "learning-rate-zero": (_log(FLAT, lr=0.0), 5),
    "grad-norm-zero": (_log(FLAT, grad=[0.0] * 40), 5),
}
UPDATING = {
    "healthy": _log(2.0 * np.exp(-np.arange(40) / 10) + 1.0 + _noise(40, 0.02), per_epoch=8),
    "shuffled-epochs": _log(_shuffled_epochs(), per_epoch=8),
    "tiny-repeating-loss": _log([0.0002, 0.0003, 0.0002, 0.0002] * 8, per_epoch=4),
    "constant-loss": _log([1.5] * 32, per_epoch=4),
    "learning-rate-zero-at-the-end": _log(FLAT, lr=_decay_to_zero(40)),
    "learning-rate-zero-at-warm-up": _log(FLAT, lr=[0.0, *[2e-4] * 39]),
    "grad-norm-zero-while-loss-falls": _log(1.0 + np.exp(-np.arange(40.0)), grad=[0.0] * 40),
    "grad-norm-zero-on-few-logs": _log(FLAT, grad=[0.0] * 3 + [0.8] * 37),
    "grad-norm-zero-in-rl": _log(FLAT, grad=[0.0] * 40, reward=0.5, reward_std=0.0),
    "masked-labels": _log(np.zeros(40), grad=[0.0] * 40),
}


@pytest.mark.parametrize("case", list(NOT_UPDATING), ids=list(NOT_UPDATING))
def test_weights_not_updating_fires(case: str) -> None:
    entries, step = NOT_UPDATING[case]
    doctor = _doctor(entries, max_steps=entries[-1]["step"])
    found = _one(doctor.findings, "weights-not-updating")
    assert found.severity is Severity.ERROR
    assert found.step == step
    assert not _slugs(doctor) & {"loss-plateau", "loss-at-chance"}
    _no_rank_advice(found)
    plateau = DoctorConfig(ignore={"weights-not-updating"})
    later = _doctor(entries, max_steps=entries[-1]["step"], config=plateau).findings
    assert all(f.step is None or f.step >= step for f in later if f.slug.startswith("loss-"))


@pytest.mark.parametrize("case", list(UPDATING), ids=list(UPDATING))
def test_weights_not_updating_quiet(case: str) -> None:
    entries = UPDATING[case]
    assert "weights-not-updating" not in _slugs(_doctor(entries, max_steps=entries[-1]["step"]))


def _first_steps(facts: RunFacts) -> Doctor:
    doctor = Doctor(facts=facts, emit=False)
    doctor.start()
    doctor.run_phase(Phase.FIRST_STEPS, 2)
    return doctor


def _live(trainable_params: int, frozen: int, no_grad: int = 0) -> RunFacts:
    layers = [LayerFacts(name=f"model.layers.{i}.q_proj", r=8) for i in range(4)]
    return RunFacts(
        has_lora=True,
        layers=layers,
        lora_params=400,
        trainable_lora_params=400,
        trainable_params=trainable_params,
        frozen_in_place=[lf.name for lf in layers[:frozen]],
        no_grad_layers=[lf.name for lf in layers[:no_grad]],
    )


@pytest.mark.parametrize(
    ("facts", "slugs"),
    [
        (_live(400, 4), {"weights-not-updating"}),  # gradients arrive, nothing moves
        (_live(900, 4), {"adapter-not-learning"}),  # a head still trains: the adapters are stuck
        (_live(400, 2), {"adapter-not-learning"}),  # some layers moved
        (_live(400, 4, no_grad=4), {"adapter-not-learning"}),  # no gradient (masked labels ...)
        (_live(400, 0), set()),
    ],
    ids=["all-frozen", "head-trains", "some-frozen", "no-gradient", "all-moved"],
)
def test_weights_not_updating_from_the_adapter_probe(facts: RunFacts, slugs: set[str]) -> None:
    doctor = _first_steps(facts)
    assert _slugs(doctor) & {"weights-not-updating", "adapter-not-learning"} == slugs


# --- loss-divergence: a catastrophe in the first logs ---------------------------------------------
DIVERGES = {
    "jump-at-second-log": ([1.5, *(10.4 + _noise(N - 1, 0.05))], 1),
    "jump-at-third-log": ([1.5, 1.45, *(10.4 + _noise(N - 2, 0.05, 1))], 2),
}
HOLDS = {
    "fast-early-fall": [19.2, 14.4, 5.46, 0.41, 0.12, *(0.1 * np.exp(-T[:95] * 5) + 0.003)],
    "first-log-low-then-twice": [1.0, *(2.0 + _noise(N - 1, 0.05, 2))],
    "early-spike-not-held": [1.5, 10.0, *(1.4 + _noise(N - 2, 0.05, 3))],
    "tiny-noisy-from-start": list(1e-3 + _noise(N, 1e-3, 4)),
}


@pytest.mark.parametrize("case", list(DIVERGES), ids=list(DIVERGES))
def test_early_divergence_fires(case: str) -> None:
    loss, best_step = DIVERGES[case]
    found = _one(_doctor(_log(loss)).findings, "loss-divergence")
    assert found.step == 9  # the fifth rolling median in a row that stands high
    assert found.evidence["best_step"] == best_step and found.evidence["best"] <= 1.5


@pytest.mark.parametrize("case", list(HOLDS), ids=list(HOLDS))
def test_early_divergence_quiet(case: str) -> None:
    assert "loss-divergence" not in _slugs(_doctor(_log(HOLDS[case])))


# --- grad-norm-spike: an extreme jump among the first grad norms --------------------------------------
@pytest.mark.parametrize(
    ("norms", "spike_at"),
    [
        ([8.0, 9.0, 7.0, 8.0, 11140.0], 5),  # 1,400x the median of four
        ([8.0, 9.0, 7.0, 400.0], None),  # 50x: too little so early
        ([0.1, 84.0, 3.0, 2.0], None),  # one point before: not judged
        ([0.05, 0.2, 0.6, 1.2, 1.5, 1.6], None),  # B growing from zero: the norm ramps up
        ([1.0] * 5 + [40.0], None),  # 40x at the sixth point: early, below 100x
        ([1.0] * 10 + [40.0], 11),  # ... and at the eleventh, a spike by the usual 10x
    ],
    ids=["extreme", "large-but-early", "one-before", "ramp", "40x-early", "40x-later"],
)
def test_early_spike_rule(norms: list[float], spike_at: int | None) -> None:
    spike = spike_scan([], list(range(1, len(norms) + 1)), norms, 0, DoctorConfig())
    assert (None if spike is None else spike.step) == spike_at
    if spike is not None:
        assert spike.factor == (100.0 if spike.before < 10 else 10.0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"spike_early_factor": 5.0},
            "spike_early_factor must be >= spike_factor, got 5.0 < 10.0",
        ),
        ({"chance_tolerance": 1.0}, "chance_tolerance must be a number in [0, 1), got 1.0"),
        ({"chance_max": 0.9}, "chance_max must be a number >= 1, got 0.9"),
        ({"repeat_min_logs": 1}, "repeat_min_logs must be an integer >= 2, got 1"),
        ({"divergence_early_factor": 1}, "divergence_early_factor must be a number > 1, got 1"),
    ],
    ids=["spike-early-below-spike", "chance-tolerance", "chance-max", "repeats", "early-div"],
)
def test_config_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError) as err:
        DoctorConfig(**kwargs)
    assert message in str(err.value)


# --- the cases rebuilt from real reports --------------------------------------------------------------
def test_case_loss_repeats_every_epoch() -> None:
    """Eight per-step losses repeating to four decimals over 18 epochs: the weights never change
    (an error) with what to check in order, not a plateau blamed on the rank."""
    d = diagnose(CASES / "loss-repeats-every-epoch")
    found = _one(d.findings, "weights-not-updating")
    assert found.severity is Severity.ERROR
    assert found.evidence["steps_per_epoch"] == 8 and found.step == 14
    assert not d.slugs & {"loss-plateau", "loss-at-chance", "rank-saturated"}
    assert [c for c, _ in _causes(found)][:4] == [
        "lora-not-trainable",
        "adapter-not-in-optimizer",
        "learning-rate-zero",
        "checkpointing-without-input-grads",
    ]
    assert all(v == "open" for _, v in _causes(found))  # nothing logged tells which
    assert "rule these out in order" in found.message
    _no_rank_advice(found)
    assert "rank" not in found.message.lower()
    log = json.loads((CASES / "loss-repeats-every-epoch" / "trainer_state.json").read_text())
    ignored = diagnose(log, config=DoctorConfig(ignore={"weights-not-updating"}))
    assert all(f.step is None or f.step >= found.step for f in ignored.findings)


def test_case_early_grad_norm_spikes() -> None:
    """Nine logs, norms near 8 with one of 92 and one of 11,140: the spike at the extreme step."""
    d = diagnose(CASES / "early-grad-norm-spikes")
    spike = _one(d.findings, "grad-norm-spike")
    assert spike.step == 9 and spike.evidence["value"] == 11140.0
    assert "threshold 100x" in spike.message


# --- real Trainer runs ------------------------------------------------------------------------------
def _report(outcome_dir: Path) -> dict[str, dict]:
    report = json.loads((outcome_dir / "run" / "lora_doctor.json").read_text())
    return {f["slug"]: f for f in report["findings"]}


def _top(finding: dict) -> tuple[str, str]:
    cause = finding["evidence"]["causes"][0]
    return cause["cause"], cause["verdict"]


@pytest.mark.slow
def test_learning_rate_zero_in_a_trainer(tmp_path: Path) -> None:
    """learning_rate=0: the weights never move; weights-not-updating names the learning rate."""
    from tiny import Rows, tiny_args, tiny_peft
    from transformers import Trainer

    from lora_doctor import LoraDoctorCallback

    args = tiny_args(tmp_path, max_steps=12, learning_rate=0.0, lr_scheduler_type="constant")
    trainer = Trainer(
        model=tiny_peft(), args=args, train_dataset=Rows(32), callbacks=[LoraDoctorCallback()]
    )
    trainer.train()
    found = {
        f["slug"]: f for f in json.loads((tmp_path / "lora_doctor.json").read_text())["findings"]
    }
    wnu = found["weights-not-updating"]
    assert wnu["severity"] == "error" and wnu["step"] == 5
    assert _top(wnu) == ("learning-rate-zero", "supported")
    assert wnu["recommendation"]["config_changes"] == {"learning_rate": 4.6e-4}  # 64 wide
    assert not found.keys() & {"loss-plateau", "loss-at-chance", "adapter-not-learning"}


@pytest.mark.slow
def test_optimizer_without_the_adapter_in_a_trainer(tmp_path: Path) -> None:
    """The optimizer built before get_peft_model: no LoRA parameter in it, nothing moves. One
    error for the run (weights-not-updating, not also adapter-not-learning), its cause the
    optimizer."""
    from benchmarks.faults import scenarios
    from benchmarks.faults.runner import Spec

    scenarios.optimizer_without_adapter(Spec("llama", 0, tmp_path))
    found = _report(tmp_path)
    assert found["weights-not-updating"]["step"] == 2
    assert _top(found["weights-not-updating"]) == ("adapter-not-in-optimizer", "supported")
    assert "adapter-not-in-optimizer" in found and "adapter-not-learning" not in found


@pytest.mark.slow
@pytest.mark.parametrize(
    ("build", "slug", "latest"),
    [("early_divergence", "loss-divergence", 10), ("loss_at_chance", "loss-at-chance", 40)],
    ids=["logged-every-step", "logged-every-5-steps"],
)
def test_destroyed_model_in_a_trainer(tmp_path: Path, build: str, slug: str, latest: int) -> None:
    """A base that knows the language, fine-tuned at learning rate 0.3 (the fault benchmark's
    scenarios): its first updates destroy it and the loss sits at ln(128). Logged every step, the
    jump within the first logs is a divergence; logged every 5 steps the first log already holds
    the jump, and the loss at chance says it. Either way the learning rate is the cause, and the
    rank is not named."""
    from benchmarks.faults import scenarios
    from benchmarks.faults.runner import Spec

    getattr(scenarios, build)(Spec("llama", 0, tmp_path))
    found = _report(tmp_path)
    assert found[slug]["severity"] == "error" and found[slug]["step"] <= latest
    assert _top(found[slug]) == ("learning-rate-too-high", "supported")
    assert (
        "loss-plateau" not in found and "r" not in found[slug]["recommendation"]["config_changes"]
    )
