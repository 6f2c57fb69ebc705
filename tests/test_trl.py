"""TRL trainers (SFT, DPO, GRPO) with the callback, the RL rank checks, and Unsloth-style layers."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from tiny import Rows, tiny_args, tiny_llama, tiny_peft, tiny_tokenizer
from transformers import Trainer, TrainerCallback

from lora_doctor import DoctorConfig, LoraDoctorCallback

trl = pytest.importorskip("trl")

#: The tiny model's own adapter findings (budget, q/v-only targets) are not what these tests check.
_QUIET = {"lora-param-budget", "attention-only-targets"}


def _common(out: Path) -> dict[str, Any]:
    return {
        "output_dir": str(out),
        "max_steps": 2,
        "per_device_train_batch_size": 2,
        "logging_steps": 1,
        "report_to": [],
        "use_cpu": True,
        "save_strategy": "no",
        "disable_tqdm": True,
    }


def _lora(r: int) -> LoraConfig:
    return LoraConfig(
        r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"
    )


def _sft(out: Path, doctor: LoraDoctorCallback, r: int) -> Any:
    data = Dataset.from_dict({"text": ["hello world hello world", "the cat sat on the mat"] * 4})
    return trl.SFTTrainer(
        model=tiny_llama(),
        args=trl.SFTConfig(max_length=32, **_common(out)),
        train_dataset=data,
        processing_class=tiny_tokenizer(),
        peft_config=_lora(r),
        callbacks=[doctor],
    )


def _dpo(out: Path, doctor: LoraDoctorCallback, r: int) -> Any:
    data = Dataset.from_dict(
        {
            "prompt": ["what is 2 and 2?", "say hi"] * 4,
            "chosen": [" four", " hi"] * 4,
            "rejected": [" five", " bye"] * 4,
        }
    )
    return trl.DPOTrainer(
        model=tiny_llama(),
        args=trl.DPOConfig(max_length=32, **_common(out)),
        train_dataset=data,
        processing_class=tiny_tokenizer(),
        peft_config=_lora(r),
        callbacks=[doctor],
    )


def _grpo(out: Path, doctor: LoraDoctorCallback, r: int, model: Any = None) -> Any:
    def reward_length(completions: list[str], **kwargs: Any) -> list[float]:
        return [len(c) / 10 for c in completions]

    return trl.GRPOTrainer(
        model=model if model is not None else tiny_llama(),
        reward_funcs=reward_length,
        args=trl.GRPOConfig(max_completion_length=6, num_generations=2, **_common(out)),
        train_dataset=Dataset.from_dict({"prompt": ["count to three", "say hello"] * 4}),
        processing_class=tiny_tokenizer(),
        peft_config=_lora(r),
        callbacks=[doctor],
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    ("build", "trainer", "is_rl", "rl_low_rank"),
    [
        (_sft, "SFTTrainer", False, False),
        (_dpo, "DPOTrainer", True, False),
        (_grpo, "GRPOTrainer", True, True),
    ],
    ids=["sft", "dpo", "grpo"],
)
def test_trl_trainers_run_with_the_doctor(
    tmp_path: Path, build: Any, trainer: str, is_rl: bool, rl_low_rank: bool
) -> None:
    doctor = LoraDoctorCallback(ignore=_QUIET)
    run = build(tmp_path, doctor, 8)
    seen: list[dict[str, Any]] = []

    class Tracker(TrainerCallback):  # a reporter added last: reads the logs after the doctor
        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
            seen.append(dict(logs))

    run.add_callback(Tracker())
    run.train()
    assert doctor.doctor is not None
    facts = doctor.doctor.facts
    assert (facts.trainer, facts.is_rl, facts.has_lora) == (trainer, is_rl, True)
    assert {lf.name for lf in facts.layers} >= {"model.layers.0.self_attn.q_proj"}
    slugs = {f.slug for f in doctor.doctor.findings}
    assert ("rl-low-rank" in slugs) is rl_low_rank
    assert not slugs & {"adapter-not-learning", "no-trainable-params", "adapter-not-in-optimizer"}
    assert (tmp_path / "lora_doctor.json").is_file()
    assert "lora_doctor/findings" in seen[0]
    assert not [k for e in run.state.log_history for k in e if k.startswith("lora_doctor/")]


@pytest.mark.slow
def test_grpo_with_unsloth_style_vllm_engine_below_the_rank(tmp_path: Path) -> None:
    """Unsloth's fast_inference keeps its vLLM engine as model.vllm_engine; read by duck typing."""
    model = tiny_llama()
    lora_config = SimpleNamespace(max_lora_rank=4)
    model.vllm_engine = SimpleNamespace(  # type: ignore[attr-defined]
        llm_engine=SimpleNamespace(vllm_config=SimpleNamespace(lora_config=lora_config))
    )
    doctor = LoraDoctorCallback(ignore=_QUIET)
    _grpo(tmp_path, doctor, 8, model=model).train()
    assert doctor.doctor is not None
    found = {f.slug: f for f in doctor.doctor.findings}
    assert found["vllm-max-lora-rank"].severity.value == "error"
    assert found["vllm-max-lora-rank"].evidence == {
        "adapter": "default",
        "r": 8,
        "max_lora_rank": 4,
    }
    assert found["rl-low-rank"].severity.value == "info"


def _unsloth_style_forward(layer: Any, detached: bool) -> Any:
    """A fused LoRA forward that reads the layer's attributes the way Unsloth's kernels do
    (``unsloth/kernels/utils.py:get_lora_parameters``: ``base_layer.weight``,
    ``lora_A[adapter].weight``, ``lora_B[adapter].weight``, ``scaling[adapter]``) and never calls
    peft's own forward. ``detached``: a broken patch that cuts the adapters out of the graph."""

    def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        adapter = layer.active_adapters[0]
        w = layer.base_layer.weight
        a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
        if detached:
            a, b = a.detach(), b.detach()
        return x @ w.t() + (x @ a.t() @ b.t()) * layer.scaling[adapter]

    return forward


@pytest.mark.slow
@pytest.mark.parametrize("detached", [False, True], ids=["learning", "patch-detaches-adapters"])
def test_unsloth_style_fused_forward_is_read_right(tmp_path: Path, detached: bool) -> None:
    model = tiny_peft(4, 8)
    patched = [
        name
        for name, module in model.named_modules()
        if name.endswith(("q_proj", "v_proj")) and hasattr(module, "lora_A")
    ]
    broken = [n for n in patched if detached and n.endswith("q_proj")]  # v_proj keeps learning
    for name in patched:
        module = model.get_submodule(name)
        module.forward = _unsloth_style_forward(module, name in broken)
    doctor = LoraDoctorCallback(config=DoctorConfig(ignore=_QUIET, check_after_steps=2))
    trainer = Trainer(
        model=model, args=tiny_args(tmp_path), train_dataset=Rows(), callbacks=[doctor]
    )
    trainer.train()
    assert doctor.doctor is not None
    facts = doctor.doctor.facts
    assert len(facts.layers) == 4 and facts.layers[0].a_shape == (4, 64)
    assert sorted(facts.no_grad_layers) == sorted(
        n.removeprefix("base_model.model.") for n in broken
    )
    assert ("adapter-not-learning" in {f.slug for f in doctor.doctor.findings}) is detached
