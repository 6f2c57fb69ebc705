"""Two-process CPU (gloo) crashes, run by tests/test_crash_ranks.py under torchrun.

``torchrun --nproc_per_node 2 tests/dist_crash_worker.py --out DIR`` runs two tiny LoRA trainings
under DDP (gloo) on every rank:

1. ``ddp-reentrant``: reentrant gradient checkpointing with ``ddp_find_unused_parameters=True``: both
   ranks die in the first backward ("Expected to mark a variable ready only once"). Rank 0 writes
   ``DIR/ddp-reentrant/lora_doctor.json``, rank 1 ``DIR/ddp-reentrant/lora_doctor.rank1.json``.
2. ``rank1-dies``: tokens were added to the tokenizer without resizing the embedding, and only rank
   1's data uses them: rank 1 dies of "index out of range in self" in its first forward while rank 0
   waits for it in the gradient all-reduce. Rank 1 leaves ``DIR/rank1-dies/lora_doctor.rank1.json``
   and closes its process group, as a dying process does on exit; rank 0 then hears of it (gloo: the
   peer closed the connection) and writes ``DIR/rank1-dies/lora_doctor.json``.

Each rank writes ``DIR/rank<N>.json`` with the errors that reached it (type, message, where raised),
so the test can check that they propagated unchanged. Every process group is destroyed before exit.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
import torch.distributed as dist
from peft import LoraConfig, get_peft_model
from tiny import Rows, tiny_args, tiny_llama, tiny_peft, tiny_tokenizer
from transformers import DataCollatorForLanguageModeling, LlamaForCausalLM, Trainer

from lora_doctor import LoraDoctorCallback

#: Seconds a collective waits for a missing rank before gloo gives up (the fallback if closing the
#: dead rank's process group does not end rank 0's wait at once).
TIMEOUT = 60


class Texts(torch.utils.data.Dataset):
    def __init__(self, tok: Any, texts: list[str]) -> None:
        self.rows = [tok(t)["input_ids"] for t in texts]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"input_ids": self.rows[i]}


def caught(fn: Any) -> dict[str, Any]:
    """Runs ``fn`` and returns the error that escaped it (type, message, innermost function)."""
    try:
        fn()
    except Exception as err:
        return {
            "type": type(err).__name__,
            "message": str(err),
            "raised_in": traceback.extract_tb(err.__traceback__)[-1].name,
        }
    return {"type": None}


def ddp_reentrant(out: Path) -> dict[str, Any]:
    model = tiny_peft()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.enable_input_require_grads()
    args = tiny_args(
        out / "ddp-reentrant",
        ddp_backend="gloo",
        ddp_timeout=TIMEOUT,
        ddp_find_unused_parameters=True,
    )
    trainer = Trainer(
        model=model, args=args, train_dataset=Rows(32), callbacks=[LoraDoctorCallback()]
    )
    return caught(trainer.train)


def rank1_dies(out: Path, rank: int) -> dict[str, Any]:
    tok = tiny_tokenizer()
    config = tiny_llama().config
    config.vocab_size = len(tok)
    torch.manual_seed(0)
    base = LlamaForCausalLM(config)
    tok.add_tokens(["<tool>", "</tool>"])  # no resize_token_embeddings: ids 45 and 46 do not exist
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    texts = ["<tool>call</tool>" if rank == 1 else "plain text" for _ in range(16)]
    args = tiny_args(out / "rank1-dies", ddp_backend="gloo", ddp_timeout=TIMEOUT)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=Texts(tok, texts),
        data_collator=DataCollatorForLanguageModeling(tok, mlm=False),
        processing_class=tok,
        callbacks=[LoraDoctorCallback()],
    )
    dist.barrier()  # both ranks start train() together
    error = caught(trainer.train)
    if rank == 1:
        dist.destroy_process_group()  # as the dying process would on exit: rank 0 hears of it
    return error


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    out = Path(parser.parse_args().out)
    rank = int(os.environ["RANK"])
    logging.basicConfig(level=logging.WARNING, format=f"rank{rank} %(name)s %(message)s")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    record = {"ddp-reentrant": ddp_reentrant(out), "rank1-dies": rank1_dies(out, rank)}
    if dist.is_initialized():
        dist.destroy_process_group()
    (out / f"rank{rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main()
