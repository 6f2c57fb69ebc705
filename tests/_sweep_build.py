"""A tiny build function for the rank-sweep tests (also loaded by file path by the CLI test)."""

from __future__ import annotations

import tempfile
from typing import Any

import torch
from tiny import VOCAB, tiny_peft
from transformers import PrinterCallback, Trainer, TrainingArguments


def tiny_trainer(
    r: int,
    lora_alpha: float,
    output_dir: str | None = None,
    *,
    steps: int = 4,
    report_to: str = "none",
    trainer_cls: type[Trainer] = Trainer,
    callbacks: list[Any] | None = None,
) -> Trainer:
    """A fresh tiny Llama (no download) with LoRA rank ``r`` on q/v, and its Trainer on CPU."""
    model = tiny_peft(r, lora_alpha)
    ids = torch.randint(0, VOCAB, (16, 12), generator=torch.Generator().manual_seed(1))
    data = [{"input_ids": row, "labels": row} for row in ids]
    args = TrainingArguments(
        output_dir=output_dir or tempfile.mkdtemp(prefix="sweep_test_"),
        max_steps=steps,
        per_device_train_batch_size=8,
        per_device_eval_batch_size=8,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        report_to=report_to,
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = trainer_cls(
        model=model, args=args, train_dataset=data, eval_dataset=data[:8], callbacks=callbacks
    )
    trainer.remove_callback(PrinterCallback)
    return trainer


def build(r: int, lora_alpha: float) -> Trainer:
    """The CLI's MODULE:FUNCTION target."""
    return tiny_trainer(r, lora_alpha, steps=2)
