"""Curve checks in real Trainer runs on a tiny Llama: a plateau from a learning rate far too low,
stop_on stopping training, and the same verdicts live and offline (with evaluations)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from lora_doctor import LoraDoctorCallback, diagnose

VOCAB = 64


def _model(r: int = 8) -> torch.nn.Module:  # the usual LoRA set-up: alpha = 2r, all linear layers
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return get_peft_model(
        LlamaForCausalLM(config),
        LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules="all-linear"),
    )


def _data(n: int, seed: int, length: int = 24) -> list[dict]:
    """Random token sequences: nothing to learn but the token frequencies."""
    g = torch.Generator().manual_seed(seed)
    return [
        {"input_ids": (ids := torch.randint(0, VOCAB, (length,), generator=g)), "labels": ids}
        for _ in range(n)
    ]


def _train(tmp_path: Path, callback: LoraDoctorCallback, **kwargs) -> Trainer:
    model = _model()
    train = kwargs.pop("train_dataset", None) or _data(32, 1)
    kwargs.setdefault("lr_scheduler_type", "constant")
    defaults = {
        "output_dir": str(tmp_path / "out"),
        "per_device_train_batch_size": 4,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": [],
        "use_cpu": True,
        "disable_tqdm": True,
        "seed": 3,
    }
    args = TrainingArguments(**{**defaults, **kwargs})  # type: ignore[arg-type]
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=_data(8, 2) if args.eval_strategy != "no" else None,
        callbacks=[callback],
    )
    trainer.train()
    # what a checkpoint folder holds: the trainer state and the adapter config
    trainer.state.save_to_json(str(tmp_path / "trainer_state.json"))
    model.peft_config["default"].save_pretrained(str(tmp_path))
    return trainer


def _curve_verdicts(findings) -> list[tuple[str, int | None]]:
    """The curve findings and their steps. loss-at-chance's step is left out: live, the doctor
    knows the vocabulary and can tell a loss at chance as soon as it judges; offline it knows
    only that the loss never fell, which takes a flat window."""
    return [
        (f.slug, None if f.slug == "loss-at-chance" else f.step)
        for f in findings
        if f.code.startswith("LD2")
    ]


@pytest.mark.slow
def test_same_verdicts_live_and_offline_with_evaluations(tmp_path: Path) -> None:
    """A run with evaluations: each is observed once (on_log, then on_evaluate), and diagnose() on
    the saved trainer_state.json gives the same curve findings at the same steps."""
    callback = LoraDoctorCallback(report_path=tmp_path / "live.json")
    trainer = _train(
        tmp_path,
        callback,
        max_steps=30,
        learning_rate=1e-6,
        eval_strategy="steps",
        eval_steps=5,
        per_device_eval_batch_size=8,
    )
    live = callback.doctor.diagnosis("live")
    evals = [e for e in trainer.state.log_history if "eval_loss" in e]
    assert callback.doctor.history.count("eval_loss") == len(evals) == 6
    assert live.by_slug("loss-at-chance"), live.summary()  # flat at ln(64): nothing learned
    offline = diagnose(tmp_path / "trainer_state.json")
    assert _curve_verdicts(offline.findings) == _curve_verdicts(live.findings)
    saved = json.loads((tmp_path / "live.json").read_text())
    in_file = [(f["slug"], f["step"]) for f in saved["findings"] if f["code"].startswith("LD2")]
    assert in_file == [(f.slug, f.step) for f in live.findings if f.code.startswith("LD2")]


@pytest.mark.slow
def test_low_learning_rate_loss_at_chance_and_stop_on(tmp_path: Path) -> None:
    """learning_rate=1e-6 leaves the loss at chance, ln(64): loss-at-chance (not a plateau) is
    reported by 20% of training, its first cause is the learning rate, and stop_on stops the run
    there."""
    callback = LoraDoctorCallback(report_path=False, stop_on={"loss-at-chance"})
    trainer = _train(
        tmp_path,
        callback,
        max_steps=100,
        learning_rate=1e-6,
        train_dataset=_data(64, 4),
    )
    plateau = callback.doctor.diagnosis().by_slug("loss-at-chance")  # data: random tokens
    assert len(plateau) == 1
    assert not callback.doctor.diagnosis().by_slug("loss-plateau")
    assert plateau[0].step is not None and plateau[0].step <= 25
    # LoRA's usual rate for this 64-wide model (a 768-wide model's, the narrowest the sources cover)
    assert plateau[0].recommendation.config_changes == {"learning_rate": 4.6e-4}
    assert trainer.state.global_step == plateau[0].step < 100  # stopped, as asked
    offline = diagnose(tmp_path)  # the folder: trainer_state.json and adapter_config.json
    assert _curve_verdicts(offline.findings) == _curve_verdicts(callback.doctor.findings)
