"""Ecosystem checks (resume rank, RL rank, vLLM max_lora_rank) and the readings they rest on."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from lora_doctor.checks import Phase
from lora_doctor.config import DoctorConfig
from lora_doctor.engine import Doctor
from lora_doctor.facts import AdapterFacts, RunFacts
from lora_doctor.integrations.resume import checkpoint_adapters, ranks_from_error
from lora_doctor.probes.ecosystem import vllm_max_lora_rank


def _facts(r: int = 8, trainer: str = "Trainer", **extra: object) -> RunFacts:
    facts = RunFacts(has_lora=True, trainer=trainer)
    facts.adapters["default"] = AdapterFacts(name="default", r=r, lora_alpha=2.0 * r)
    for key, value in extra.items():
        setattr(facts, key, value)
    return facts


def _slugs(facts: RunFacts, config: DoctorConfig | None = None) -> dict[str, object]:
    doctor = Doctor(config, facts, emit=False)
    return {f.slug: f for f in doctor.run_phase(Phase.SETUP)}


@pytest.mark.parametrize(
    ("saved", "live_r", "pattern", "fires"),
    [
        ({"default": AdapterFacts(r=4, lora_alpha=8)}, 8, {}, True),
        ({"default": AdapterFacts(r=8, lora_alpha=16)}, 8, {}, False),
        ({"default": AdapterFacts(r=8, rank_pattern={"q_proj": 4})}, 8, {}, True),
        ({"other": AdapterFacts(r=4)}, 8, {}, False),
        ({}, 8, {}, False),
    ],
    ids=["r-changed", "same-rank", "rank-pattern-changed", "other-adapter", "fresh-run"],
)
def test_rank_changed_on_resume(saved: dict, live_r: int, pattern: dict, fires: bool) -> None:
    facts = _facts(live_r, resumed_from="out/checkpoint-4", checkpoint_adapters=saved)
    facts.adapters["default"].rank_pattern = pattern
    found = _slugs(facts).get("rank-changed-on-resume")
    assert (found is not None) is fires
    if fires:
        assert found.severity.value == "error"
        assert found.recommendation.restart_from_scratch
        assert found.evidence["model_r"] == live_r
        assert "out/checkpoint-4" in found.message


@pytest.mark.parametrize(
    ("trainer", "r", "pattern", "fires"),
    [
        ("GRPOTrainer", 16, {}, True),
        ("UnslothGRPOTrainer", 32, {}, True),
        ("GRPOTrainer", 64, {}, False),
        ("GRPOTrainer", 16, {"q_proj": 64}, False),
        ("SFTTrainer", 16, {}, False),
        ("DPOTrainer", 16, {}, False),
    ],
    ids=["grpo-r16", "unsloth-grpo-r32", "grpo-r64", "grpo-pattern-64", "sft", "dpo-offline"],
)
def test_rl_low_rank(trainer: str, r: int, pattern: dict, fires: bool) -> None:
    facts = _facts(r, trainer)
    facts.adapters["default"].rank_pattern = pattern
    found = _slugs(facts).get("rl-low-rank")
    assert (found is not None) is fires
    if fires:
        assert found.severity.value == "info" and found.evidence["r"] == r


@pytest.mark.parametrize(
    ("r", "facts_limit", "config_limit", "fires", "fit"),
    [
        (64, 16, None, True, 64),
        (16, 16, None, False, None),
        (4, 8, None, False, None),
        (48, None, 32, True, 64),
        (64, None, None, False, None),
    ],
    ids=["r64-limit16", "equal", "below", "config-declared-server", "unknown-limit"],
)
def test_vllm_max_lora_rank(
    r: int, facts_limit: int | None, config_limit: int | None, fires: bool, fit: int | None
) -> None:
    facts = _facts(r, "GRPOTrainer", vllm_max_lora_rank=facts_limit)
    found = _slugs(facts, DoctorConfig(vllm_max_lora_rank=config_limit)).get("vllm-max-lora-rank")
    assert (found is not None) is fires
    if fires:
        assert found.severity.value == "error"
        # max_lora_rank belongs to the vLLM engine, no field of LoraConfig or TrainingArguments
        assert found.recommendation.config_changes == {}
        assert f"max_lora_rank={fit}" in found.recommendation.steps[0]


def _engine(rank: int, old_layout: bool = False) -> SimpleNamespace:
    lora = SimpleNamespace(max_lora_rank=rank)
    if old_layout:
        return SimpleNamespace(llm_engine=SimpleNamespace(lora_config=lora))
    return SimpleNamespace(
        llm_engine=SimpleNamespace(vllm_config=SimpleNamespace(lora_config=lora))
    )


@pytest.mark.parametrize(
    ("args", "model", "expected"),
    [
        (SimpleNamespace(use_vllm=True, vllm_max_lora_rank=32), None, 32),
        (SimpleNamespace(max_lora_rank=16), None, 16),
        (SimpleNamespace(use_vllm=False, vllm_max_lora_rank=32), None, None),
        (SimpleNamespace(), SimpleNamespace(vllm_engine=_engine(64)), 64),
        (SimpleNamespace(), SimpleNamespace(vllm_engine=_engine(8, old_layout=True)), 8),
        (SimpleNamespace(), SimpleNamespace(module=SimpleNamespace(vllm_engine=_engine(16))), 16),
        (SimpleNamespace(), SimpleNamespace(vllm_engine=SimpleNamespace()), None),
        (SimpleNamespace(max_lora_rank=True), None, None),
    ],
    ids=[
        "args-vllm-field",
        "args-plain-field",
        "vllm-off",
        "unsloth-engine",
        "old-vllm-layout",
        "ddp-wrapped",
        "engine-without-lora",
        "bool-is-no-rank",
    ],
)
def test_reads_vllm_max_lora_rank(args: object, model: object, expected: int | None) -> None:
    assert vllm_max_lora_rank(args, model) == expected


def test_checkpoint_adapters_reads_root_and_named_subfolders(tmp_path: Path) -> None:
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 8, "lora_alpha": 16}))
    (tmp_path / "second").mkdir()
    (tmp_path / "second" / "adapter_config.json").write_text(json.dumps({"r": 4}))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "adapter_config.json").write_text("{not json")
    found = checkpoint_adapters(tmp_path)
    assert {k: v.r for k, v in found.items()} == {"default": 8, "second": 4}


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (
            "size mismatch for base_model.model.model.layers.0.self_attn.q_proj.lora_A.default"
            ".weight: copying a param with shape torch.Size([4, 64]) from checkpoint, the shape "
            "in current model is torch.Size([8, 64]).",
            {"default": 4},
        ),
        (
            "size mismatch for base_model.model.x.v_proj.lora_B.extra.weight: copying a param "
            "with shape torch.Size([32, 16]) from checkpoint, the shape in current model is "
            "torch.Size([32, 8]).",
            {"extra": 16},
        ),
        ("size mismatch for lm_head.weight: copying a param with shape torch.Size([4, 64])", {}),
        ("CUDA out of memory", {}),
    ],
    ids=["lora-A", "lora-B-named-adapter", "not-lora", "other-error"],
)
def test_ranks_from_error(message: str, expected: dict[str, int]) -> None:
    found = ranks_from_error(RuntimeError(message))
    assert {k: v.r for k, v in found.items()} == expected


def test_doctor_state_round_trip_keeps_findings_and_silences_repeats() -> None:
    facts = _facts(4, "GRPOTrainer")
    doctor = Doctor(facts=facts, emit=False)
    doctor.observe(5, {"loss": 1.0})
    first = doctor.run_phase(Phase.SETUP)
    assert [f.slug for f in first] == ["rl-low-rank"]
    saved = json.loads(json.dumps(doctor.export_state()))

    resumed = Doctor(emit=False)
    resumed.restore_state(saved, [{"step": 5, "loss": 1.0}])
    assert [f.slug for f in resumed.findings] == ["rl-low-rank"]
    assert resumed.facts.adapters["default"].r == 4
    assert resumed.history.series("loss").values.tolist() == [1.0]
    assert resumed.run_phase(Phase.SETUP) == []  # already reported before the checkpoint
