"""The doctor never changes the training: same losses and bitwise-identical adapter weights with and
without the callback, and an internal error of the doctor does not reach the training loop."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from lora_doctor import DoctorConfig, LoraDoctorCallback


def _train(
    tmp_path: Path, callbacks: list, name: str
) -> tuple[list[float], dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = get_peft_model(
        LlamaForCausalLM(config),
        LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules="all-linear"),
    )
    g = torch.Generator().manual_seed(1)
    data = [
        {"input_ids": (ids := torch.randint(0, 64, (16,), generator=g)), "labels": ids}
        for _ in range(32)
    ]
    args = TrainingArguments(
        output_dir=str(tmp_path / name),
        max_steps=6,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=3,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=callbacks)
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    weights = {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}
    return losses, weights


@pytest.mark.slow
def test_losses_and_weights_bitwise_identical(tmp_path: Path) -> None:
    plain_losses, plain_weights = _train(tmp_path, [], "plain")
    doc_losses, doc_weights = _train(
        tmp_path, [LoraDoctorCallback(config=DoctorConfig(check_after_steps=2))], "doctor"
    )
    assert plain_losses == doc_losses
    assert plain_weights.keys() == doc_weights.keys()
    for key, value in plain_weights.items():
        assert torch.equal(value, doc_weights[key]), key
    assert (tmp_path / "doctor" / "lora_doctor.json").exists()


@pytest.mark.slow
def test_internal_error_does_not_stop_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from lora_doctor.engine import Doctor

    def boom(self, *args, **kwargs):
        raise RuntimeError("simulated bug in the doctor")

    monkeypatch.setattr(Doctor, "observe", boom)
    plain_losses, _ = _train(tmp_path, [], "plain")
    doc_losses, _ = _train(tmp_path, [LoraDoctorCallback()], "doctor")
    assert doc_losses == plain_losses
    errors = [r for r in caplog.records if "internal error" in r.getMessage()]
    assert len(errors) == 1
