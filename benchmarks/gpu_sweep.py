"""GPU check of lora-doctor's rank sweep, in one command (an H100 80GB takes about 3 minutes).

    python benchmarks/gpu_sweep.py --out $OUT                       # needs CUDA
    python benchmarks/gpu_sweep.py --device cpu --small --out /tmp/x  # CPU: tiny model, same code

A Llama-shaped model of realistic size (hidden 2048, 16 layers, GQA 32/4 heads, vocab 32000: about
0.84B parameters) is built from its config with random bf16 weights (no download), and
``lora_doctor.rank_sweep`` trains a LoRA adapter on every linear layer at r = 8, 16, 32, 64, 128
from scratch on made-up data (sequences that follow a fixed successor map over 1024 symbols), each
for a short run, then evaluates it. lora_alpha = 2r.

One more rank, r = 24, is built with a batch 128 times larger so that it truly runs out of GPU
memory: the sweep must record it as failed ("out of memory") and go on, and the ranks after it must
train normally (memory freed). On CPU (``--small``: r = 4, 16, 32 and 24) that rank's
trainer raises ``torch.OutOfMemoryError`` itself.

Before the sweep, one short warm-up run (discarded) pays the one-off costs (CUDA context, kernels)
that would otherwise land on the first rank's training time.

Prints the sweep's table, the choice and its reason, and a check line; writes ``sweep.json``,
``sweep.csv`` and ``sweep.png`` under ``--out``. Exit status 0 when the checks pass, 1 otherwise,
2 when CUDA is asked for and missing.
"""

from __future__ import annotations

import argparse
import gc
import logging
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PrinterCallback,
    Trainer,
    TrainingArguments,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import tiny_llama_config
from lora_doctor import rank_sweep

RANKS = (8, 16, 32, 64, 128)
OOM_RANK = 24


class _SimulatedOutOfMemory(Trainer):
    """CPU stand-in for a batch that does not fit (``--small``)."""

    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        raise torch.OutOfMemoryError("CUDA out of memory (simulated on CPU)")


def _config(small: bool) -> LlamaConfig:
    if small:
        return tiny_llama_config(vocab_size=256)
    return LlamaConfig(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=4,
        vocab_size=32000,
        max_position_embeddings=2048,
    )


def _data(
    n: int, length: int, symbols: int, vocab: int, seed: int
) -> list[dict[str, torch.Tensor]]:
    """Sequences that follow a fixed successor map (a random permutation of ``symbols`` tokens,
    offset into the vocabulary): learning the map takes adapter capacity."""
    perm = torch.randperm(symbols, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(seed)
    ids = torch.empty(n, length, dtype=torch.long)
    ids[:, 0] = torch.randint(0, symbols, (n,), generator=g)
    for i in range(1, length):
        ids[:, i] = perm[ids[:, i - 1]]
    ids = ids + min(100, vocab - symbols)
    return [{"input_ids": row, "labels": row} for row in ids]


def make_build(args: argparse.Namespace, out: Path) -> Any:
    small = args.small
    cfg = _config(small)
    length, symbols = (16, 64) if small else (256, 1024)
    batch = 16 if small else 8
    train = _data(batch * args.steps, length, symbols, cfg.vocab_size, seed=1)
    evaluation = _data(64, length, symbols, cfg.vocab_size, seed=2)
    cuda = args.device == "cuda"

    def build(r: int, lora_alpha: float, steps: int | None = None) -> Trainer:
        torch.manual_seed(0)  # the same base model for every rank
        with torch.device(args.device):
            base = LlamaForCausalLM(cfg)
        if cuda:
            base = base.to(torch.bfloat16)
        model = get_peft_model(
            base,
            LoraConfig(r=r, lora_alpha=lora_alpha, target_modules="all-linear", lora_dropout=0.0),
        )
        oom = r == OOM_RANK
        targs = TrainingArguments(
            output_dir=tempfile.mkdtemp(prefix=f"gpu_sweep_r{r}_", dir=out),
            max_steps=steps or args.steps,
            per_device_train_batch_size=batch * (128 if oom and cuda else 1),
            per_device_eval_batch_size=batch,
            learning_rate=args.lr,
            lr_scheduler_type="constant",
            warmup_steps=0,
            logging_steps=5,
            save_strategy="no",
            report_to="none",
            bf16=cuda,
            use_cpu=not cuda,
            disable_tqdm=True,
            dataloader_num_workers=0,
        )
        cls = _SimulatedOutOfMemory if oom and not cuda else Trainer
        trainer = cls(model=model, args=targs, train_dataset=train, eval_dataset=evaluation)
        trainer.remove_callback(PrinterCallback)
        return trainer

    return build


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--small", action="store_true", help="a tiny model (CPU check)")
    parser.add_argument("--steps", type=int, default=None, help="steps per rank (80; 30 --small)")
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_sweep: no CUDA device (use --device cpu --small for the CPU check)")
        return 2
    if args.device == "cpu":
        torch.set_num_threads(1)
    args.steps = args.steps or (30 if args.small else 80)
    ranks = (4, 16, 32) if args.small else RANKS
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    build = make_build(args, out)

    start = time.perf_counter()
    warm = build(ranks[0], 2 * ranks[0], steps=5)
    warm.train()
    trainable, total = warm.model.get_nb_trainable_parameters()
    base_params = total - trainable
    del warm
    gc.collect()
    if args.device == "cuda":
        torch.cuda.empty_cache()
    warm_s = time.perf_counter() - start

    start = time.perf_counter()
    result = rank_sweep(build, ranks=(*ranks, OOM_RANK), metric="eval_loss", progress=True)
    sweep_s = time.perf_counter() - start

    result.to_json(out / "sweep.json")
    result.to_csv(out / "sweep.csv")
    result.plot(out / "sweep.png")

    rows = {row.r: row for row in result.rows}
    oom_row = rows[OOM_RANK]
    after = [rows[r] for r in ranks if r > OOM_RANK]
    checks = {
        "oom rank recorded as failed": oom_row.status == "failed"
        and (oom_row.reason or "").startswith("out of memory"),
        "ranks after it trained": bool(after) and all(row.status == "ok" for row in after),
        "every other rank trained to a finite metric": all(
            row.metric is not None and math.isfinite(row.metric)
            for r, row in rows.items()
            if r != OOM_RANK
        ),
        "a rank chosen": result.chosen_rank is not None,
        "peak memory read": args.device == "cpu"
        or all(row.peak_memory_bytes for r, row in rows.items() if r != OOM_RANK),
    }
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    cfg = _config(args.small)
    print()
    print(
        f"gpu_sweep on {device}: Llama hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers, "
        f"vocab {cfg.vocab_size} ({base_params / 1e9:.2f}B parameters); {args.steps} steps per "
        f"rank; warm-up {warm_s:.1f} s; "
        f"sweep {sweep_s:.1f} s"
    )
    print(result.summary())
    for name, ok in checks.items():
        print(f"check {'PASS' if ok else 'FAIL'}: {name}")
    print(f"written: {out / 'sweep.json'}, {out / 'sweep.csv'}, {out / 'sweep.png'}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
