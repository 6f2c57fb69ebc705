"""A tiny LoRA run with the doctor under torchrun (DDP or FSDP2), for the multi-process tests.

Run: ``torchrun --nproc_per_node 2 tests/dist_worker.py --out DIR [--fsdp]``. Each rank writes
``DIR/rank<N>.json`` with what it saw (its doctor's findings, the metrics it logged); rank 0's
callback writes ``DIR/run/lora_doctor.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from lora_doctor import LoraDoctorCallback


class _Rows(torch.utils.data.Dataset):
    def __init__(self, n: int, seq: int, vocab: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, vocab, (n, seq), generator=g)

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--fsdp", action="store_true", help="FSDP2 instead of DDP")
    parser.add_argument("--steps", type=int, default=4)
    ns = parser.parse_args()
    out = Path(ns.out)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO, format=f"rank{rank} %(name)s %(message)s")
    logging.getLogger("transformers").setLevel(logging.ERROR)

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
    )
    model = get_peft_model(
        LlamaForCausalLM(cfg),
        # lora_alpha 32 at r 4 (scaling 8) makes a finding every rank would report.
        LoraConfig(r=4, lora_alpha=32, target_modules=["q_proj", "v_proj"]),
    )
    extra: dict = {}
    if ns.fsdp:
        extra = {
            "fsdp": "full_shard",
            "fsdp_config": {
                "fsdp_version": 2,
                "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"],
                "reshard_after_forward": True,
            },
        }
    args = TrainingArguments(
        output_dir=str(out / "run"),
        max_steps=ns.steps,
        per_device_train_batch_size=2,
        logging_steps=1,
        learning_rate=1e-3,
        report_to=[],
        save_strategy="no",
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=True,
        ddp_backend="gloo" if not torch.cuda.is_available() else None,
        **extra,
    )
    doctor = LoraDoctorCallback()
    trainer = Trainer(model=model, args=args, train_dataset=_Rows(32, 16, 128), callbacks=[doctor])
    trainer.train()
    seen = doctor.doctor
    record = {
        "rank": rank,
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),
        "findings": [f.slug for f in seen.findings] if seen else [],
        "layers": [{"name": lf.name, "a": lf.a_shape, "b": lf.b_shape} for lf in seen.facts.layers]
        if seen
        else [],
        "lora_params": seen.facts.lora_params if seen else None,
        "param_type": type(
            next(p for n, p in trainer.model.named_parameters() if "lora_A" in n)
        ).__name__,
        "log_history": trainer.state.log_history,
    }
    (out / f"rank{rank}.json").write_text(json.dumps(record, default=str))


if __name__ == "__main__":
    main()
