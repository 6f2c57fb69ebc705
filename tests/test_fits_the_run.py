"""Fixes that fit the run (issue 12): LoRA advice only on LoRA runs, the model's own module names,
checkpoints that were saved, the run's own best-model metric, and each fix said once."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from lora_doctor.advice import go_back, saved_checkpoints
from lora_doctor.checks import Context, Phase
from lora_doctor.checks.adapter import AttentionOnlyTargets
from lora_doctor.checks.memory import OutOfMemory
from lora_doctor.config import DoctorConfig
from lora_doctor.diagnosis.causes import Findings, Look, diagnose
from lora_doctor.engine import Doctor
from lora_doctor.facts import AdapterFacts, LayerFacts, MemoryFacts, RunFacts, SetupFacts
from lora_doctor.findings import Finding, Severity
from lora_doctor.history import History
from lora_doctor.offline import replay
from lora_doctor.probes.base import Event
from lora_doctor.probes.setup import SetupProbe

N = 500
T = np.arange(1, N + 1) / N
LLAMA = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GPT2 = ["c_attn", "c_proj", "c_fc"]


def _noise(sd: float, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0.0, sd, N)


def _log(loss: np.ndarray, evals: dict[str, list[float]] | None = None, every: int = 50) -> list:
    """Training logs every step, and evaluations of ``evals`` (name -> values) every ``every``."""
    out: list[dict] = []
    evals = evals or {}
    for i, v in enumerate(loss):
        step = i + 1
        out.append({"loss": float(v), "grad_norm": 0.8, "learning_rate": 2e-4, "step": step})
        k = step // every - 1
        if step % every == 0 and evals and k < len(next(iter(evals.values()))):
            entry = {f"eval_{name}": vals[k] for name, vals in evals.items()}
            out.append({**entry, "epoch": step / every, "step": step})
    return out


def _run(entries: list[dict], **facts) -> Doctor:
    doctor = Doctor(None, RunFacts(max_steps=N, **facts), emit=False)
    replay(doctor, entries)
    return doctor


def _one(doctor: Doctor, slug: str) -> Finding:
    found = [f for f in doctor.findings if f.slug == slug]
    assert len(found) == 1, doctor.findings
    return found[0]


# --- checkpoints that exist ---------------------------------------------------------------------
@pytest.mark.parametrize(
    ("setup", "step", "back", "says"),
    [
        (SetupFacts(output_dir="out", checkpoint_steps=[100, 200]), 200, 200, "checkpoint-200 in"),
        (SetupFacts(output_dir="out", checkpoint_steps=[100, 200]), 150, 100, "before step 150"),
        (SetupFacts(save_strategy="no"), 150, None, "save_strategy='no'"),
        (
            SetupFacts(output_dir="out", save_strategy="steps", save_steps=500),
            150,
            None,
            "save checkpoints more often",
        ),
        (SetupFacts(), 150, None, "if one was"),
    ],
    ids=["saved-at-the-step", "nearest-before", "none-saved", "saved-too-rarely", "unknown"],
)
def test_go_back_names_only_saved_checkpoints(
    setup: SetupFacts, step: int, back: int | None, says: str
) -> None:
    where = go_back(RunFacts(setup=setup), step)
    assert where.step == back
    assert says in where.text
    assert where.known is (saved_checkpoints(RunFacts(setup=setup)) is not None)


@pytest.mark.parametrize(
    ("facts", "known"),
    [
        (RunFacts(setup=SetupFacts(output_dir="o")), True),
        (RunFacts(saved_global_step=50, setup=SetupFacts(output_dir="o")), False),
        (
            RunFacts(saved_global_step=50, setup=SetupFacts(output_dir="o", checkpoint_steps=[9])),
            True,
        ),
    ],
    ids=["live-folder-read", "offline-folder-without-checkpoints", "offline-checkpoints-found"],
)
def test_offline_a_folder_without_checkpoints_proves_nothing(facts: RunFacts, known: bool) -> None:
    """A trainer_state.json copied out of its run sits in a folder without its checkpoints."""
    assert (saved_checkpoints(facts) is not None) is known


@pytest.mark.parametrize(
    ("start", "found"), [(0, [10, 20]), (5, [5, 10, 20, 30])], ids=["fresh-run", "resumed-run"]
)
def test_the_setup_probe_knows_the_checkpoints_of_this_run(
    tmp_path: Path, start: int, found: list[int]
) -> None:
    """Read again after each save; a run that starts from step 0 does not count the checkpoints
    another run left in its folder (5 and 30 here), but counts one it saved over (10)."""
    for step in (5, 10, 30):
        (tmp_path / f"checkpoint-{step}").mkdir()
    doctor = Doctor(None, RunFacts(), emit=False)
    args = SimpleNamespace(output_dir=str(tmp_path))
    probe = SetupProbe()
    probe.train_begin(Event(doctor, args, SimpleNamespace(global_step=start)))
    for step in (10, 20):
        (tmp_path / f"checkpoint-{step}").mkdir(exist_ok=True)
        probe.save(Event(doctor, args, SimpleNamespace(global_step=step)))
    assert doctor.facts.setup.checkpoint_steps == found


@pytest.mark.slow
def test_a_live_run_knows_the_checkpoints_it_saved(tmp_path: Path) -> None:
    from tiny import Rows, tiny_args, tiny_peft
    from transformers import Trainer

    from lora_doctor import LoraDoctorCallback

    callback = LoraDoctorCallback()
    args = tiny_args(tmp_path, max_steps=6, save_strategy="steps", save_steps=2, save_total_limit=2)
    Trainer(model=tiny_peft(), args=args, train_dataset=Rows(), callbacks=[callback]).train()
    assert callback.doctor is not None
    assert callback.doctor.facts.setup.checkpoint_steps == [4, 6]  # the limit removed checkpoint-2


DIVERGING = np.concatenate([2.0 - 1.0 * T[:250], 1.0 + 2.0 * T[:250]]) + _noise(0.01)


@pytest.mark.parametrize(
    ("facts", "first_step", "back"),
    [
        ({"setup": SetupFacts(output_dir="o", checkpoint_steps=[100, 200, 300])}, "Stop", "200"),
        ({"setup": SetupFacts(save_strategy="no")}, "Stop", "No checkpoint was saved"),
        (
            {"setup": SetupFacts(output_dir="o", checkpoint_steps=[200]), "saved_global_step": N},
            "Go back",
            "checkpoint-200",
        ),
    ],
    ids=["live-with-checkpoints", "live-none-saved", "offline-finished-run"],
)
def test_divergence_goes_back_to_a_saved_checkpoint(
    facts: dict, first_step: str, back: str
) -> None:
    finding = _one(_run(_log(DIVERGING), **facts), "loss-divergence")
    rec = finding.recommendation
    assert rec is not None and rec.steps[0].startswith(first_step)
    assert any(s.startswith(("Go back", "No checkpoint")) and back in s for s in rec.steps)
    assert back in rec.summary or back == "No checkpoint was saved"
    assert any("Stop training" in s for s in rec.steps) is (first_step == "Stop")


# --- steps that remain --------------------------------------------------------------------------
FLAT = 2.0 + 1.5 * np.exp(-T / 0.02) + _noise(0.02)


@pytest.mark.parametrize(
    ("facts", "max_steps", "says"),
    [
        ({}, N, "the remaining 400 steps would be mostly wasted"),
        ({"saved_global_step": N}, N, "steps since then were mostly wasted"),
        ({}, 0, "further steps are mostly wasted"),
    ],
    ids=["live", "offline", "plan-unknown"],
)
def test_plateau_says_wasted_steps_only_when_there_are_some(
    facts: dict, max_steps: int, says: str
) -> None:
    doctor = Doctor(None, RunFacts(max_steps=max_steps, **facts), emit=False)
    replay(doctor, _log(FLAT))
    finding = _one(doctor, "loss-plateau")
    assert says in finding.message
    assert ("remaining" in finding.message) is (says.startswith("the remaining"))


def test_a_nan_at_the_last_step_of_a_finished_run_wastes_no_later_step() -> None:
    entries = _log(FLAT[:100])
    entries[-1]["loss"] = math.nan
    doctor = Doctor(None, RunFacts(max_steps=100, saved_global_step=100), emit=False)
    replay(doctor, entries)
    finding = _one(doctor, "non-finite-values")
    assert "later step" not in finding.message
    rec = finding.recommendation
    assert rec is not None and not any("Stop training" in s for s in rec.steps)
    assert rec.summary == "Remove the cause of the NaN before training again"


# --- overfit: LoRA or not, the run's own metric --------------------------------------------------
TRAIN = 2.0 * np.exp(-T / 0.3) + 0.05 + _noise(0.01)
U_SHAPE = [1.5, 1.2, 1.0, 0.92, 0.95, 1.02, 1.1, 1.2, 1.3, 1.4]


@pytest.mark.parametrize(
    ("facts", "lora_changes", "other_changes"),
    [
        (
            {"has_lora": True, "adapters": {"default": AdapterFacts(r=32, lora_alpha=64)}},
            {"r": 8, "lora_alpha": 16, "lora_dropout": 0.1},
            set(),
        ),
        ({"has_lora": False, "learning_rate": 2e-5}, {}, {"weight_decay", "learning_rate"}),
        ({}, {}, set()),
    ],
    ids=["lora", "full-fine-tune", "unknown"],
)
def test_overfit_gives_lora_advice_only_to_lora_runs(
    facts: dict, lora_changes: dict, other_changes: set[str]
) -> None:
    finding = _one(_run(_log(TRAIN, {"loss": U_SHAPE}), **facts), "overfit")
    rec = finding.recommendation
    assert rec is not None
    lora_keys = {"r", "lora_alpha", "lora_dropout"}
    assert {k: v for k, v in rec.config_changes.items() if k in lora_keys} == lora_changes
    assert other_changes <= set(rec.config_changes)
    text = " ".join(rec.steps)
    if facts.get("has_lora") is False:
        assert "lora" not in text.lower() and "rank" not in text
        assert "the model is memorising" in finding.message
        assert rec.config_changes["learning_rate"] == 1e-5
    elif facts.get("has_lora") is True:
        assert "lora_dropout" in text and "the adapter is memorising" in finding.message
    else:  # not known to train LoRA: one conditional step
        assert "If this run trains LoRA: lower the rank" in text
        assert rec.config_changes["weight_decay"] == 0.05


def test_overfit_goes_back_to_the_checkpoint_of_the_best_evaluation() -> None:
    setup = SetupFacts(output_dir="o", checkpoint_steps=[50, 100, 150, 200, 250, 300])
    rec = _one(_run(_log(TRAIN, {"loss": U_SHAPE}), setup=setup), "overfit").recommendation
    assert (
        rec is not None and rec.steps[0] == "Go back to checkpoint-200 in o (the best evaluation)"
    )
    assert rec.summary.startswith("Go back to checkpoint-200")


@pytest.mark.parametrize(
    ("metric", "greater", "values", "severity", "back"),
    [
        ("accuracy", None, [0.5, 0.6, 0.7, 0.75, 0.78, 0.8, 0.81, 0.82, 0.83, 0.84], "info", None),
        ("accuracy", True, [0.5, 0.6, 0.7, 0.75, 0.72, 0.7, 0.7, 0.69, 0.68, 0.67], "warning", 200),
        ("accuracy", None, [0.5, 0.8, 0.7, 0.65, 0.64, 0.62, 0.6, 0.6, 0.58, 0.57], "warning", 100),
        ("perplexity", False, [9.0, 8.0, 7.0, 6.5, 6.2, 6.0, 5.9, 5.8, 5.7, 5.6], "info", None),
        ("loss", None, [], "warning", 200),
    ],
    ids=[
        "accuracy-still-improves",
        "accuracy-peaked-with-the-loss",
        "accuracy-peaked-earlier",
        "lower-is-better-still-improves",
        "metric-is-the-loss",
    ],
)
def test_overfit_respects_the_runs_own_best_model_metric(
    metric: str, greater: bool | None, values: list[float], severity: str, back: int | None
) -> None:
    evals = {"loss": U_SHAPE, **({metric: values} if values else {})}
    setup = SetupFacts(
        metric_for_best_model=metric,
        greater_is_better=greater,
        output_dir="o",
        checkpoint_steps=[50 * k for k in range(1, 11)],
    )
    finding = _one(_run(_log(TRAIN, evals), setup=setup), "overfit")
    assert finding.severity.value == severity
    rec = finding.recommendation
    assert rec is not None and rec.config_changes["metric_for_best_model"] == metric
    if back is None:  # the run's own measure still improves: no rollback
        assert "still improves" in finding.title and "No reason to roll back" in finding.message
        assert all("checkpoint-" not in s for s in rec.steps)
    else:
        assert rec.steps[0].startswith(f"Go back to checkpoint-{back} ")


def test_a_plain_overfit_is_still_reported_once_the_metric_stops_improving() -> None:
    """The nuanced report while accuracy improves does not silence the plain one later."""
    accuracy = [0.5, 0.6, 0.7, 0.75, 0.78, 0.8, 0.79, 0.77, 0.76, 0.75]
    setup = SetupFacts(metric_for_best_model="accuracy")
    doctor = _run(_log(TRAIN, {"loss": U_SHAPE, "accuracy": accuracy}), setup=setup)
    found = [(f.severity, f.step) for f in doctor.findings if f.slug == "overfit"]
    assert found == [(Severity.INFO, 400), (Severity.WARNING, 450)]


# --- the model's own module names ---------------------------------------------------------------
@pytest.mark.parametrize(
    ("kinds", "targets", "adds"),
    [
        (LLAMA, LLAMA, "gate_proj, up_proj, down_proj"),
        (GPT2, GPT2, "c_proj, c_fc"),
        ([], "all-linear", None),
    ],
    ids=["llama", "gpt2", "offline-names-unknown"],
)
def test_attention_only_fix_uses_the_models_own_module_names(
    kinds: list[str], targets: object, adds: str | None
) -> None:
    first = "c_attn" if kinds == GPT2 else "q_proj"
    facts = RunFacts(
        has_lora=True,
        adapters={"default": AdapterFacts(r=8, lora_alpha=16, target_modules=[first])},
        setup=SetupFacts(module_kinds=kinds),
    )
    ctx = Context(facts, History(), DoctorConfig(), Phase.SETUP, 0)
    (finding,) = AttentionOnlyTargets().run(ctx)
    rec = finding.recommendation
    assert rec is not None and rec.config_changes == {"target_modules": targets}
    told = finding.log_line()
    assert "gate_proj" not in told if kinds == GPT2 else True
    assert (adds in told) if adds else "'all-linear'" in told
    # the plateau's cause gives the same fix
    flat = Finding("LD201", "loss-plateau", Severity.WARNING, 9, "t", "m")
    look = Look(flat, Findings([finding, flat]), facts, DoctorConfig(), History())
    diagnosed = diagnose(look)
    assert diagnosed is not None and diagnosed.top is not None
    assert diagnosed.top.cause == "attention-only-targets" and diagnosed.top.fix == rec


def _oom(**facts: object) -> Finding:
    mem = MemoryFacts(
        available=True, per_device_train_batch_size=8, oom={"step": 3, "where": "training"}
    )
    doctor = Doctor(None, RunFacts(memory=mem, **facts), checks=[OutOfMemory], emit=False)
    (finding,) = doctor.run_phase(Phase.END, 3)
    return finding


@pytest.mark.parametrize(
    ("facts", "says", "never"),
    [
        (
            {"has_lora": True, "adapters": {"default": AdapterFacts(r=8, target_modules=GPT2)}},
            "Target fewer modules (now c_attn, c_proj, c_fc)",
            "k_proj",
        ),
        (
            {
                "has_lora": True,
                "adapters": {"default": AdapterFacts(r=8, target_modules="all-linear")},
                "setup": SetupFacts(module_kinds=GPT2),
            },
            "Target fewer modules (now c_attn, c_proj, c_fc)",
            "k_proj",
        ),
        ({"has_lora": False}, 'optim="adamw_bnb_8bit"', "r="),
    ],
    ids=["gpt2-list", "gpt2-all-linear", "full-fine-tune"],
)
def test_memory_fixes_fit_the_model(facts: dict, says: str, never: str) -> None:
    rec = _oom(**facts).recommendation
    assert rec is not None
    text = " ".join([rec.summary, *rec.steps])
    assert says in text and never not in text
    if facts.get("has_lora") is False:
        assert "target" not in text.lower() and "lower r" not in rec.summary


# --- causes of a full fine-tune -----------------------------------------------------------------
def _plateau_causes(facts: RunFacts) -> dict[str, object]:
    flat = Finding("LD201", "loss-plateau", Severity.WARNING, 9, "t", "m")
    look = Look(flat, Findings([flat]), facts, DoctorConfig(), History())
    diagnosed = diagnose(look)
    assert diagnosed is not None
    return {c.cause: c for c in diagnosed.causes}


@pytest.mark.parametrize(
    ("lr", "low", "high"),
    [
        (2e-5, "ruled-out", "ruled-out"),
        (5e-7, "supported", "ruled-out"),
        (1e-3, "ruled-out", "supported"),
    ],
    ids=["full-ft-rate", "below-full-ft-range", "lora-rate-on-full-ft"],
)
def test_a_full_fine_tune_is_judged_by_full_fine_tuning_rates(
    lr: float, low: str, high: str
) -> None:
    causes = _plateau_causes(RunFacts(has_lora=False, learning_rate=lr))
    assert causes["learning-rate-too-low"].verdict == low  # type: ignore[attr-defined]
    assert causes["learning-rate-too-high"].verdict == high  # type: ignore[attr-defined]
    assert "full fine-tuning" in causes["learning-rate-too-high"].name  # type: ignore[attr-defined]
    assert not {"alpha-too-small", "attention-only-targets", "rank-too-small"} & set(causes)
    not_learning = causes["adapters-not-learning"]
    assert not_learning.name == "weights not learning"  # type: ignore[attr-defined]
    assert "LoRA" not in " ".join(not_learning.fix.steps)  # type: ignore[attr-defined]


def test_the_alpha_fix_sets_scaling_two_under_rslora() -> None:
    facts = RunFacts(
        has_lora=True,
        layers=[LayerFacts("l.q_proj", r=16, lora_alpha=1, scaling=0.25, use_rslora=True)],
    )
    fix = _plateau_causes(facts)["alpha-too-small"].fix  # type: ignore[attr-defined]
    assert fix.config_changes == {"lora_alpha": 8}  # 2 * sqrt(16): scaling 2 with rsLoRA


# --- each fix once --------------------------------------------------------------------------------
def test_the_alpha_fix_is_said_once_in_the_log_line() -> None:
    facts = RunFacts(has_lora=True, adapters={"default": AdapterFacts(r=16, lora_alpha=8)})
    doctor = Doctor(None, facts, emit=False)
    (ratio,) = [f for f in doctor.start() if f.slug == "alpha-rank-ratio"]
    line = ratio.log_line()
    assert line.count("lora_alpha=32") == 1, line
    assert ratio.recommendation is not None and "lora_alpha=32" in ratio.recommendation.summary


def test_offline_the_best_model_metric_is_read_from_the_trainer_state() -> None:
    """trainer_state.json keeps best_metric and best_global_step but not the metric's name: the
    one evaluation metric logged with that value at that step is it."""
    from lora_doctor.offline import diagnose as diagnose_offline

    accuracy = [0.5, 0.6, 0.7, 0.75, 0.78, 0.8, 0.81, 0.82, 0.83, 0.84]
    state = {
        "log_history": _log(TRAIN, {"loss": U_SHAPE, "accuracy": accuracy}),
        "max_steps": N,
        "global_step": N,
        "best_metric": 0.84,
        "best_global_step": 500,
    }
    (finding,) = [f for f in diagnose_offline(state).findings if f.slug == "overfit"]
    assert finding.severity is Severity.INFO
    assert finding.evidence["metric_for_best_model"] == "eval_accuracy"
    state["best_metric"] = 0.5  # matches no metric logged at step 500: unknown, a plain overfit
    (finding,) = [f for f in diagnose_offline(state).findings if f.slug == "overfit"]
    assert finding.severity is Severity.WARNING and "metric_for_best_model" not in finding.evidence


@pytest.mark.parametrize(
    ("precision", "says"),
    [("fp32", "in fp32 no loss scaler skips the step"), ("fp16", "under fp16 the loss scaler")],
    ids=["fp32", "fp16"],
)
def test_a_nan_grad_norm_is_explained_in_the_precision_in_use(precision: str, says: str) -> None:
    entries = _log(FLAT[:100])
    entries[39]["grad_norm"] = math.nan
    dtype = {"fp32": "float32", "fp16": "float16"}[precision]
    setup = SetupFacts(trainable_dtypes=[dtype])  # the engine derives the precision in use
    doctor = Doctor(None, RunFacts(max_steps=100, setup=setup), emit=False)
    replay(doctor, entries)
    (finding,) = [f for f in doctor.findings if f.slug == "non-finite-values"]
    assert says in finding.message


@pytest.mark.parametrize(
    ("loss", "says"),
    [
        (FLAT, "after a fall from"),
        (2.0 + _noise(0.02), "about where it started"),
        (np.concatenate([np.full(20, 1.5), np.full(N - 20, 1.8)]) + _noise(0.02), "above where"),
    ],
    ids=["fell", "flat-from-the-start", "rose"],
)
def test_the_plateau_tells_how_the_loss_got_there(loss: np.ndarray, says: str) -> None:
    """A loss that never fell is loss-at-chance's ("never fell from its first value"), and the
    plateau stands down beside it; with that check ignored, the plateau tells it as it is."""
    doctor = Doctor(DoctorConfig(ignore={"loss-at-chance"}), RunFacts(max_steps=N), emit=False)
    replay(doctor, _log(loss))
    finding = _one(doctor, "loss-plateau")
    assert says in finding.message


def _never_fell(lr: float) -> list[dict]:
    return [{"step": 10 * (i + 1), "loss": 2.0 + 0.01 * ((i * 7) % 5 - 2), "learning_rate": lr}
            for i in range(100)]  # fmt: skip


@pytest.mark.parametrize(
    ("adapter", "verdict"),
    [(None, "open"), ({"peft_type": "LORA", "r": 8, "lora_alpha": 16}, "supported")],
    ids=["unknown-if-lora", "lora-config"],
)
def test_a_low_rate_is_a_cause_only_where_lora_is_known(adapter: dict | None, verdict: str) -> None:
    """Offline without an adapter config the run may be a full fine-tune, whose usual rate 2e-5
    is: the low rate stays open there; with the LoRA config it is the supported cause."""
    from lora_doctor.offline import diagnose

    d = diagnose({"max_steps": 1000, "log_history": _never_fell(2e-5)}, adapter)
    (stuck,) = d.by_slug("loss-at-chance")
    causes = {c["cause"]: c["verdict"] for c in stuck.evidence["causes"]}
    assert causes["learning-rate-too-low"] == verdict
    assert ("Most likely cause: learning rate too low" in stuck.message) is (verdict == "supported")


def test_attention_only_targets_are_a_cause_of_a_loss_that_never_fell() -> None:
    from lora_doctor.offline import diagnose

    lora = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj"]}
    d = diagnose({"max_steps": 1000, "log_history": _never_fell(2e-4)}, lora)
    (stuck,) = d.by_slug("loss-at-chance")
    causes = {c["cause"]: c["verdict"] for c in stuck.evidence["causes"]}
    assert causes["attention-only-targets"] == "supported"


def test_a_rate_above_loras_low_end_is_never_too_low_even_offline() -> None:
    """Unknown whether the run trains LoRA, 0.02 is still not too low for either kind of run."""
    from lora_doctor.offline import diagnose

    d = diagnose({"max_steps": 1000, "log_history": _never_fell(0.02)})
    (stuck,) = d.by_slug("loss-at-chance")
    causes = {c["cause"]: c["verdict"] for c in stuck.evidence["causes"]}
    assert causes["learning-rate-too-low"] == "ruled-out"
