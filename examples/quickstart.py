"""lora-doctor quickstart: a tiny Llama, LoRA with a deliberate mistake, and the doctor's diagnosis.

Runs on a CPU in well under a minute, with no download: the model is built from a config and the
data is made up (sequences that repeat a short random pattern, so there is something to learn).

The mistake: ``r=16`` with ``lora_alpha=8``. peft scales the update by lora_alpha / r = 0.5, half of
the usual alpha = r, so the adapter learns slowly; the doctor says so before the first step, with the
fix. When the loss then stays flat it reports a plateau whose first suspect is that scaling, and it
writes ``out/quickstart/lora_doctor.json`` at the end.

Usage:
    python examples/quickstart.py [--output-dir out/quickstart] [--steps 60]
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from torch.utils.data import Dataset
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from lora_doctor import LoraDoctorCallback


class PatternDataset(Dataset):
    """Token sequences that repeat a random pattern of 4 to 8 tokens: learnable, made up."""

    def __init__(self, n: int, length: int = 32, vocab: int = 256, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.rows = []
        for _ in range(n):
            period = int(torch.randint(4, 9, (1,), generator=g))
            pattern = torch.randint(0, vocab, (period,), generator=g)
            self.rows.append(pattern.repeat(length // period + 1)[:length])

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.rows[i]
        return {"input_ids": ids, "labels": ids.clone()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="out/quickstart")
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("transformers").setLevel(logging.ERROR)

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    base = LlamaForCausalLM(config)
    # The deliberate mistake: lora_alpha below r (scaling 0.5). The fix is lora_alpha=16 or 32.
    lora = LoraConfig(
        r=16,
        lora_alpha=8,
        target_modules=[
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ],
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(base, lora)

    training_args = TrainingArguments(
        output_dir=args.output_dir,
        max_steps=args.steps,
        per_device_train_batch_size=8,
        per_device_eval_batch_size=8,
        learning_rate=3e-3,
        logging_steps=5,
        eval_strategy="steps",
        eval_steps=20,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=PatternDataset(256, seed=0),
        eval_dataset=PatternDataset(32, seed=1),
        callbacks=[LoraDoctorCallback()],
    )
    trainer.train()

    report = Path(args.output_dir) / "lora_doctor.json"
    data = json.loads(report.read_text())
    print(f"\nThe diagnosis is in {report}: {len(data['findings'])} finding(s)")
    for f in data["findings"]:
        fix = f["recommendation"]["summary"] if f["recommendation"] else "-"
        print(f"  {f['severity']:7} {f['code']} {f['slug']}: {f['title']}\n          fix: {fix}")


if __name__ == "__main__":
    main()
