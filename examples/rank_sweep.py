"""Rank sweep on CPU: train a tiny Llama (built from a config, no download) at a few LoRA ranks on
made-up data, and let lora-doctor choose r from the measurements.

    python examples/rank_sweep.py --out out/rank_sweep
    lora-doctor sweep examples/rank_sweep.py:build --ranks 4 8 16 32 --out out/rank_sweep

The task: continue arithmetic sequences of tokens (a, a+s, a+2s, ... mod 128), which a small
adapter can learn. Each rank starts from the same fresh base model (same seed) and trains from
scratch.
"""

from __future__ import annotations

import argparse
import logging
import tempfile

import torch
from peft import LoraConfig, get_peft_model
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PrinterCallback,
    Trainer,
    TrainingArguments,
)

from lora_doctor import rank_sweep

torch.set_num_threads(1)  # a tiny model: one CPU thread is the fastest
VOCAB, SYMBOLS, LENGTH = 128, 64, 16
SUCCESSOR = torch.randperm(SYMBOLS, generator=torch.Generator().manual_seed(0))


def make_data(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """``n`` sequences of ``LENGTH`` tokens that follow a fixed successor map: each token's next
    token is ``SUCCESSOR[token]``, a random permutation of ``SYMBOLS`` tokens. Learning the map
    takes adapter capacity, so the rank matters (up to about ``SYMBOLS``)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.empty(n, LENGTH, dtype=torch.long)
    ids[:, 0] = torch.randint(0, SYMBOLS, (n,), generator=g)
    for i in range(1, LENGTH):
        ids[:, i] = SUCCESSOR[ids[:, i - 1]]
    return [{"input_ids": row, "labels": row} for row in ids]


TRAIN, EVAL = make_data(512, seed=1), make_data(64, seed=2)


def build(r: int, lora_alpha: float, output_dir: str | None = None) -> Trainer:
    """A fresh tiny Llama with a LoRA adapter of rank ``r`` on every linear layer, and its Trainer."""
    torch.manual_seed(0)  # the same base model for every rank
    base = LlamaForCausalLM(
        LlamaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=VOCAB,
        )
    )
    model = get_peft_model(
        base, LoraConfig(r=r, lora_alpha=lora_alpha, target_modules="all-linear", lora_dropout=0.0)
    )
    args = TrainingArguments(
        output_dir=output_dir or tempfile.mkdtemp(prefix=f"rank_sweep_r{r}_"),
        max_steps=40,
        per_device_train_batch_size=32,
        per_device_eval_batch_size=64,
        learning_rate=1e-2,
        logging_steps=5,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=TRAIN, eval_dataset=EVAL)
    trainer.remove_callback(PrinterCallback)  # the sweep's progress bar and table say enough
    return trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[4, 8, 16, 32])
    parser.add_argument("--out", default="out/rank_sweep")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    result = rank_sweep(build, ranks=args.ranks, metric="eval_loss")
    print(result.summary())
    result.to_json(f"{args.out}/sweep.json")
    result.to_csv(f"{args.out}/sweep.csv")
    print("plot:", result.plot(f"{args.out}/sweep.png"))


if __name__ == "__main__":
    main()
