"""GPU check of ``training-died``: the crashes whose real form needs CUDA, in one command.

    python benchmarks/gpu_crashes.py --out $OUT          # one GPU; part (c) needs two and deepspeed
    python benchmarks/gpu_crashes.py --dry --out /tmp/x  # CPU: part (a) only, the plumbing

Each part trains a tiny LoRA Llama (from its config, no download) with a real ``Trainer`` and
``LoraDoctorCallback()`` in its own process (a device-side assert leaves the CUDA context unusable),
and checks that the error surfaced unchanged and that ``lora_doctor.json`` names the cause:

  (a) device-side-assert: tokens added to the tokenizer without resizing the embedding, on CUDA: the
      error is CUDA's asynchronous "device-side assert triggered" (raised at a later call than the
      embedding); the finding must be ``token-id-past-embedding`` with "the tokenizer has 47
      tokens but the input embedding has 45 rows".
  (b) fp16-unscale: ``fp16=True`` with the adapter cast to float16: accelerate's own GradScaler
      raises "Attempting to unscale FP16 gradients."; the finding must be
      ``fp16-trainable-weights``, offering ``bf16=True, fp16=False`` on a bfloat16-capable GPU.
  (c) zero3-checkpointing: two GPUs under DeepSpeed ZeRO-3 (torchrun), reentrant checkpointing on a
      frozen base without input grads: DeepSpeed asserts "loss must be a scalar tensor"; the finding
      (on both ranks: ``lora_doctor.json`` and ``lora_doctor.rank1.json``) must be
      ``checkpointing-without-input-grads``. Skipped without two GPUs or deepspeed.

Prints one line per part and writes each part's files under ``--out``. Exit status 0 when every part
that ran passed, 1 otherwise, 2 when there is no CUDA device (without ``--dry``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # tests/tiny.py: the tokenizer built from `tokenizers`

PARTS = ("device-side-assert", "fp16-unscale", "zero3-checkpointing")


def _died(out: Path, name: str = "lora_doctor.json") -> dict[str, Any]:
    findings = json.loads((out / name).read_text())["findings"]
    return next((f for f in findings if f["slug"] == "training-died"), {})


def _train(part: str, out: Path, device: str) -> dict[str, Any]:
    """Runs one part in this process; returns what surfaced and what the report says."""
    from peft import LoraConfig, get_peft_model
    from tiny import tiny_tokenizer
    from transformers import DataCollatorForLanguageModeling, LlamaForCausalLM, Trainer
    from transformers import TrainingArguments as Args

    from benchmarks._common import Tokens, tiny_llama_config
    from lora_doctor import LoraDoctorCallback

    tok = tiny_tokenizer()
    torch.manual_seed(0)
    base = LlamaForCausalLM(tiny_llama_config(vocab_size=len(tok)))
    data: Any = Tokens(32, 16, len(tok), seed=0)
    collator = None
    extra: dict[str, Any] = {}
    if part == "device-side-assert":
        tok.add_tokens(["<tool>", "</tool>"])  # no resize_token_embeddings
        data = [dict(tok("<tool>call</tool>")) for _ in range(32)]
        collator = DataCollatorForLanguageModeling(tok, mlm=False)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    model = get_peft_model(base, lora)
    if part == "fp16-unscale":
        model = model.half()
        extra["fp16"] = True
    if part == "zero3-checkpointing":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        model.disable_input_require_grads()
        extra["bf16"] = True
        extra["deepspeed"] = {
            "zero_optimization": {"stage": 3},
            "bf16": {"enabled": "auto"},
            "train_micro_batch_size_per_gpu": "auto",
            "gradient_accumulation_steps": "auto",
            "train_batch_size": "auto",
        }
    args = Args(
        output_dir=str(out),
        max_steps=4,
        per_device_train_batch_size=4,
        logging_steps=1,
        learning_rate=2e-4,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        use_cpu=device == "cpu",
        **extra,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=data,
        data_collator=collator,
        processing_class=tok,
        callbacks=[LoraDoctorCallback()],
    )
    try:
        trainer.train()
        return {"error": None}
    except Exception as err:  # the error that surfaced: it must be the library's, unchanged
        return {"error": type(err).__name__, "message": str(err)[:300]}


#: What each part must show: the error's text and the finding's signature, fact and fix.
EXPECTED: dict[str, dict[str, Any]] = {
    "device-side-assert": {
        "error": ("device-side assert triggered", "index out of range in self"),
        "signature": "token-id-past-embedding",
        "fact": "the tokenizer has 47 tokens but the input embedding has 45 rows",
    },
    "fp16-unscale": {
        "error": ("Attempting to unscale FP16 gradients.",),
        "signature": "fp16-trainable-weights",
        "fact": "trainable tensors are float16",
        "changes": {"fp16": False, "bf16": True},
    },
    "zero3-checkpointing": {
        "error": ("loss must be a scalar tensor",),
        "signature": "checkpointing-without-input-grads",
        "fact": "gradient checkpointing is on with use_reentrant=True",
    },
}


def _verdict(part: str, surfaced: dict[str, Any], finding: dict[str, Any]) -> list[str]:
    """The checks of a part that failed (empty: it passed)."""
    want = EXPECTED[part]
    failed = []
    if not any(text in str(surfaced.get("message")) for text in want["error"]):
        failed.append(f"surfaced {surfaced.get('error')}: {surfaced.get('message')!r}")
    evidence = finding.get("evidence") or {}
    if evidence.get("signature") != want["signature"]:
        failed.append(f"signature {evidence.get('signature')!r}, title {finding.get('title')!r}")
    if want["fact"] not in str(finding.get("message")):
        failed.append(f"no {want['fact']!r} in the message")
    changes = (finding.get("recommendation") or {}).get("config_changes")
    if "changes" in want and changes != want["changes"]:
        failed.append(f"config_changes {changes}")
    return failed


def _child(part: str, out: Path, device: str) -> None:
    """A part in a child process: trains, then writes what it saw to ``out/result<rank>.json``."""
    out.mkdir(parents=True, exist_ok=True)
    surfaced = _train(part, out, device)
    rank = int(os.environ.get("RANK", "0"))
    name = "lora_doctor.json" if rank == 0 else f"lora_doctor.rank{rank}.json"
    result = {"surfaced": surfaced, "failed": _verdict(part, surfaced, _died(out, name))}
    (out / f"result{rank}.json").write_text(json.dumps(result, indent=1))
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _run(part: str, out: Path, device: str) -> tuple[str, list[str]]:
    """Runs a part in its own process(es); returns PASS/FAIL/SKIP and what failed."""
    ranks = 1
    cmd = [sys.executable, str(Path(__file__).resolve())]
    if part == "zero3-checkpointing":
        if torch.cuda.device_count() < 2 or importlib.util.find_spec("deepspeed") is None:
            return "SKIP", ["needs two GPUs and deepspeed"]
        ranks = 2
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", cmd[1]]
    cmd += ["--child", part, "--out", str(out / part), "--device", device]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    failed: list[str] = []
    for rank in range(ranks):
        path = out / part / f"result{rank}.json"
        if not path.is_file():
            return "FAIL", [
                f"rank {rank} left no result; exit {done.returncode}",
                done.stderr[-2000:],
            ]
        failed += [f"rank {rank}: {f}" for f in json.loads(path.read_text())["failed"]]
    return ("FAIL" if failed else "PASS"), failed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the results")
    parser.add_argument("--dry", action="store_true", help="CPU: part (a) only (the plumbing)")
    parser.add_argument("--child", choices=PARTS, help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    if opts.child:
        _child(opts.child, opts.out, opts.device)
        return 0
    if not opts.dry and not torch.cuda.is_available():
        print("gpu_crashes.py needs a CUDA device (torch sees none); --dry runs part (a) on CPU.")
        return 2
    parts = ("device-side-assert",) if opts.dry else PARTS
    device = "cpu" if opts.dry else "cuda"
    status = 0
    for part in parts:
        verdict, failed = _run(part, opts.out, device)
        print(f"{verdict:4}  {part}" + "".join(f"\n      {f}" for f in failed))
        status |= verdict == "FAIL"
    return status


if __name__ == "__main__":
    sys.exit(main())
