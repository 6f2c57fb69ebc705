"""Online RL runs whose rewards tie within a group: zero gradients by design, no adapter error;
no-reward-variance as information. The adapter probe tells a None gradient from a zero one."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, get_peft_model
from tiny import probe_steps, run_case_repro, tiny_llama

from lora_doctor.checks import Phase
from lora_doctor.checks.reward import RewardTies, tied_steps
from lora_doctor.config import DoctorConfig
from lora_doctor.diagnosis.causes import Findings, Look, checkpointing_without_input_grads
from lora_doctor.engine import Doctor
from lora_doctor.facts import AdapterFacts, LayerFacts, RunFacts, SetupFacts
from lora_doctor.findings import Finding, Severity
from lora_doctor.history import History

Q, V = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"


# --- steps without reward variance ----------------------------------------------------------------
@pytest.mark.parametrize(
    ("share", "std", "tied", "logged"),
    [
        (([1, 2, 3], [1.0, 1.0, 0.0]), ((), ()), [1, 2], 3),
        (((), ()), ([1, 2], [0.0, 0.5]), [1], 2),
        (([1, 2], [0.5, math.nan]), ([1, 2], [0.2, 0.0]), [2], 2),
        (([1], [0.75]), ([1], [0.1]), [], 1),
    ],
    ids=["share-of-tied-groups", "reward-std-only", "nan-skipped", "some-groups-vary"],
)
def test_tied_steps(share: tuple, std: tuple, tied: list[int], logged: int) -> None:
    ties = tied_steps(RewardTies(), share, std)
    assert (sorted(ties.tied), len(ties.logged)) == (tied, logged)


def _grpo_log(tied: list[bool]) -> list[dict[str, float]]:
    return [
        {
            "step": i,
            "loss": 0.0 if t else 1e-8,
            "grad_norm": 0.0 if t else 0.7,
            "reward": 0.0 if t else 0.25,
            "reward_std": 0.0 if t else 0.5,
            "frac_reward_zero_std": 1.0 if t else 0.0,
        }
        for i, t in enumerate(tied, start=1)
    ]


@pytest.mark.parametrize(
    ("tied", "step"),
    [
        ([True, True, True, False, True, True, False, True], 3),
        ([True, False, False, True, False, True, False, False], 6),
        ([False] * 8, None),
        ([True, True, False, False, False, False, False, False], None),
    ],
    ids=["early-ties", "scattered-ties", "rewards-vary", "two-ties-only"],
)
def test_no_reward_variance(tied: list[bool], step: int | None) -> None:
    doctor = Doctor(facts=RunFacts(trainer="GRPOTrainer", is_rl=True), emit=False)
    for entry in _grpo_log(tied):
        doctor.observe(None, entry)
    doctor.run_phase(Phase.END)
    found = [f for f in doctor.findings if f.slug == "no-reward-variance"]
    assert [f.step for f in found] == ([step] if step else [])
    for f in found:
        assert f.severity is Severity.INFO and f.code == "LD210"
        assert f.recommendation is not None and not f.recommendation.config_changes
        assert "num_generations" in " ".join(f.recommendation.steps)


def test_supervised_run_has_no_reward_finding() -> None:
    doctor = Doctor(emit=False)
    for step in range(1, 10):
        doctor.observe(step, {"loss": 2.0, "grad_norm": 0.0})
    assert "no-reward-variance" not in {f.slug for f in doctor.findings}


# --- the adapter error on RL runs -------------------------------------------------------------------
def _stuck(trainer: str | None, zero: list[str], **kw: Any) -> RunFacts:
    fields: dict[str, Any] = {
        "has_lora": True,
        "trainer": trainer,
        "adapters": {"default": AdapterFacts(r=8, lora_alpha=16)},
        "layers": [LayerFacts(name=Q, r=8), LayerFacts(name=V, r=8)],
        "lora_params": 1000,
        "trainable_lora_params": 1000,
        "no_grad_layers": [Q, V],
        "b_still_zero_layers": [Q, V],
        "frozen_in_place": [Q, V],
        "zero_grad_layers": zero,
    }
    return RunFacts(**{**fields, **kw})


@pytest.mark.parametrize(
    ("facts", "error"),
    [
        (_stuck("GRPOTrainer", [Q, V]), False),
        (_stuck(None, [Q, V], rl_keys=["reward", "frac_reward_zero_std"]), False),
        (_stuck("GRPOTrainer", []), True),
        (_stuck("GRPOTrainer", [Q]), True),
        (_stuck("GRPOTrainer", [], trainable_lora_params=0), True),
        (_stuck("Trainer", [Q, V]), True),
        (_stuck("DPOTrainer", [Q, V]), True),
    ],
    ids=[
        "grpo-zero-gradients",
        "rl-keys-zero-gradients",
        "grpo-no-gradient-at-all",
        "grpo-one-layer-none",
        "grpo-frozen-adapter",
        "supervised-zero-gradients",
        "offline-preference-zero-gradients",
    ],
)
def test_zero_gradients_stand_the_adapter_error_down_only_on_online_rl(
    facts: RunFacts, error: bool
) -> None:
    found = Doctor(facts=facts, emit=False).run_phase(Phase.FIRST_STEPS, 2)
    errors = [f for f in found if f.slug == "adapter-not-learning"]
    assert bool(errors) is error


def test_zero_gradients_do_not_blame_checkpointing() -> None:
    setup = SetupFacts(gradient_checkpointing=True)
    symptom = Finding("LD121", "adapter-not-learning", Severity.ERROR, 2, "t", "m")

    def verdict(zero: list[str]) -> str:
        facts = _stuck("Trainer", zero, setup=setup)
        look = Look(symptom, Findings([symptom]), facts, DoctorConfig(), History())
        cause = checkpointing_without_input_grads(look)
        assert cause is not None
        return cause.verdict

    assert verdict([]) == "supported"  # None gradients under reentrant checkpointing
    assert verdict([Q, V]) == "open"  # zeros reached the layers: checkpointing did not cut them


# --- the probe: None gradient or zero gradient -----------------------------------------------------
def _probe_steps(model: torch.nn.Module, loss_scale: float, steps: int = 2) -> RunFacts:
    """The adapter probe around a plain loop whose loss is multiplied by ``loss_scale``."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable or [torch.nn.Parameter(torch.zeros(1))], lr=1e-2)
    facts: RunFacts = probe_steps(model, optimizer, steps, loss_scale).facts
    return facts


def _lora_model(frozen: bool = False) -> torch.nn.Module:
    model = get_peft_model(
        tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    )
    if frozen:
        model.requires_grad_(False)
    return model


@pytest.mark.parametrize(
    ("frozen", "scale", "no_grad", "zero"),
    [(False, 1.0, 0, 0), (False, 0.0, 4, 4), (True, 1.0, 4, 0)],
    ids=["learning", "loss-times-zero", "requires-grad-false"],
)
def test_probe_tells_a_zero_gradient_from_none(
    frozen: bool, scale: float, no_grad: int, zero: int
) -> None:
    facts = _probe_steps(_lora_model(frozen), scale)
    assert (len(facts.no_grad_layers), len(facts.zero_grad_layers)) == (no_grad, zero)


# --- the shared case: TRL GRPO on CPU ---------------------------------------------------------------
@pytest.mark.slow
def test_case_grpo_tied_rewards(tmp_path: Path) -> None:
    """GRPO whose first steps have no reward variance (loss 0, grad norm 0): no adapter error; at
    most the information that those steps had no reward variance, with reward-side fixes."""
    report = run_case_repro("grpo-tied-rewards", tmp_path)
    by_slug = {f["slug"]: f for f in report["findings"]}
    assert "adapter-not-learning" not in by_slug
    assert not [f for f in report["findings"] if f["severity"] == "error"]
    assert report["run"]["zero_grad_layers"] == report["run"]["no_grad_layers"] != []
    info = by_slug["no-reward-variance"]
    assert info["severity"] == "info"
    steps = " ".join(info["recommendation"]["steps"])
    assert "partial credit" in steps and "num_generations" in steps and "temperature" in steps
