"""The doctor on a real multi-GPU run: DDP, FSDP2, resume, and a resume with another rank.

One command runs every phase, each under its own ``torchrun`` (one process per GPU), and prints what
the doctor reported::

    python benchmarks/gpu_fsdp.py --out $OUT                     # all GPUs, FSDP2 and DDP
    python benchmarks/gpu_fsdp.py --out /tmp/fsdp --device cpu --small   # 2 CPU processes, DDP only

Phases (a Llama built from a config with random weights, random tokens; nothing downloaded):

- ``ddp``: LoRA r 16 with lora_alpha 8 (a deliberate alpha-rank-ratio warning), 30 steps.
- ``fsdp2``: the same under FSDP2 (``fsdp_version`` 2, the transformers default), checkpoints at 20, 30.
- ``fsdp2-resume``: resumes ``fsdp2``'s checkpoint-20 with the same rank: the doctor's state comes
  back from the checkpoint (its findings are not logged a second time).
- ``fsdp2-rank-change``: resumes that checkpoint with r 32: transformers stops with "size mismatch";
  the doctor leaves ``rank-changed-on-resume`` in the JSON (the phase is expected to fail).

On CPU (``--device cpu``) the FSDP phases run under DDP (accelerate offers FSDP on GPUs only).
Each phase writes ``OUT/<phase>/rank<N>.json`` (each rank's view), ``OUT/<phase>/run/lora_doctor.json``
(rank 0) and its log; the table at the end sums them up, and ``OUT/gpu_fsdp.json`` holds it all.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PHASES = ("ddp", "fsdp2", "fsdp2-resume", "fsdp2-rank-change")
EXPECTED_FAILURE = {"fsdp2-rank-change"}


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", required=True, help="folder for results")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--small", action="store_true", help="a tiny model and few steps (CPU check)")
    p.add_argument("--nproc", type=int, default=0, help="processes (default: all GPUs, 2 on CPU)")
    p.add_argument("--phase-timeout", type=int, default=150, help="seconds per phase (default 150)")
    p.add_argument("--phase", choices=PHASES, help=argparse.SUPPRESS)
    return p.parse_args()


# --- one phase, on every rank ------------------------------------------------------------------------
def _model(ns: argparse.Namespace, r: int) -> Any:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from benchmarks._common import tiny_llama_config

    torch.manual_seed(0)
    if ns.small:
        cfg = tiny_llama_config()
    else:
        cfg = LlamaConfig(
            hidden_size=1024,
            intermediate_size=2816,
            num_hidden_layers=8,
            num_attention_heads=16,
            num_key_value_heads=4,
            vocab_size=32000,
        )
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    # lora_alpha 8 at r 16: scaling 0.5, a deliberate alpha-rank-ratio warning.
    return get_peft_model(
        LlamaForCausalLM(cfg), LoraConfig(r=r, lora_alpha=8, target_modules=targets)
    ), cfg.vocab_size


def run_phase(ns: argparse.Namespace) -> None:
    import torch
    from transformers import Trainer, TrainingArguments

    from benchmarks._common import Tokens
    from lora_doctor import LoraDoctorCallback

    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO, format=f"rank{rank} %(name)s: %(message)s")
    logging.getLogger("transformers").setLevel(logging.WARNING)
    out = Path(ns.out)
    phase = ns.phase
    gpu = ns.device == "cuda"
    fsdp = phase.startswith("fsdp2") and gpu
    r = 32 if phase == "fsdp2-rank-change" else 16
    steps = 6 if ns.small else 30
    save = 4 if ns.small else 20
    model, vocab = _model(ns, r)
    extra: dict[str, Any] = {}
    if fsdp:
        extra = {
            "fsdp": "full_shard",
            "fsdp_config": {
                "fsdp_version": 2,
                "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"],
                "reshard_after_forward": True,
            },
        }
    resume = None
    run_dir = out / phase / "run"
    if phase in ("fsdp2-resume", "fsdp2-rank-change"):
        source = out / "fsdp2" / "run"
        run_dir.mkdir(parents=True, exist_ok=True)
        resume = str(source / f"checkpoint-{save}")
    args = TrainingArguments(
        output_dir=str(run_dir),
        max_steps=steps,
        per_device_train_batch_size=2 if ns.small else 8,
        logging_steps=1 if ns.small else 5,
        learning_rate=2e-4,
        report_to=[],
        save_strategy="steps" if phase == "fsdp2" else "no",
        save_steps=save,
        bf16=gpu,
        use_cpu=not gpu,
        ddp_backend=None if gpu else "gloo",
        disable_tqdm=True,
        **extra,
    )
    doctor = LoraDoctorCallback()
    data = Tokens(512 if not ns.small else 64, 16 if ns.small else 256, vocab, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[doctor])
    start = time.perf_counter()
    error = None
    try:
        trainer.train(resume_from_checkpoint=resume)
    except Exception as exc:  # recorded: the rank-change phase is expected to fail
        error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    seconds = time.perf_counter() - start
    lora = next((p for n, p in trainer.model_wrapped.named_parameters() if "lora_A" in n), None)
    d = doctor.doctor
    logs = [e for e in trainer.state.log_history if "loss" in e]
    last = logs[-1] if logs else {}
    record = {
        "phase": phase,
        "rank": rank,
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),
        "fsdp2": fsdp,
        "error": error,
        "seconds": round(seconds, 2),
        "lora_param_type": type(lora).__name__ if lora is not None else None,
        "lora_local_shape": list(lora.to_local().shape)
        if lora is not None and hasattr(lora, "to_local")
        else (list(lora.shape) if lora is not None else None),
        "layers": len(d.facts.layers) if d else None,
        "first_layer": [
            d.facts.layers[0].name,
            d.facts.layers[0].a_shape,
            d.facts.layers[0].b_shape,
        ]
        if d and d.facts.layers
        else None,
        "lora_params": d.facts.lora_params if d else None,
        "base_params": d.facts.base_params if d else None,
        "findings": [f"{f.code} {f.slug} ({f.severity.value})" for f in d.findings] if d else [],
        "last_log": {k: v for k, v in last.items() if k.startswith("lora_doctor/")},
        "cuda": torch.cuda.get_device_name() if gpu and torch.cuda.is_available() else None,
    }
    (out / phase).mkdir(parents=True, exist_ok=True)
    (out / phase / f"rank{rank}.json").write_text(json.dumps(record, indent=1, default=str))


# --- the launcher --------------------------------------------------------------------------------------
def _launch(ns: argparse.Namespace) -> int:
    import torch

    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    nproc = ns.nproc or (torch.cuda.device_count() if ns.device == "cuda" else 2)
    if ns.device == "cuda" and nproc < 2:
        print(f"needs at least 2 GPUs, found {nproc}", file=sys.stderr)
        return 2
    results: list[dict[str, Any]] = []
    for phase in PHASES:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            __file__,
            "--out",
            str(out),
            "--device",
            ns.device,
            "--phase",
            phase,
            *(["--small"] if ns.small else []),
            "--phase-timeout",
            str(ns.phase_timeout),
        ]
        start = time.perf_counter()
        with open(out / f"{phase}.log", "w") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
            try:  # a phase that hangs (a collective one rank never reaches) is reported, not waited on
                code: int | str = proc.wait(timeout=ns.phase_timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                code = f"timeout after {ns.phase_timeout} s (a hang?)"
        text = (out / f"{phase}.log").read_text(errors="replace")
        ranks = sorted((out / phase).glob("rank*.json")) if (out / phase).is_dir() else []
        views = [json.loads(p.read_text()) for p in ranks]
        reports = sorted(str(p.relative_to(out)) for p in (out / phase).rglob("lora_doctor.json"))
        logged = [line for line in text.splitlines() if "lora_doctor: [LD" in line]
        results.append(
            {
                "phase": phase,
                "exit_code": code,
                "wall_seconds": round(time.perf_counter() - start, 1),
                "ranks": views,
                "reports": reports,
                "report_findings": [
                    f["code"] + " " + f["slug"]
                    for rp in reports
                    for f in json.loads((out / rp).read_text())["findings"]
                ],
                "finding_log_lines": logged,
            }
        )
    (out / "gpu_fsdp.json").write_text(json.dumps(results, indent=1, default=str))
    _table(results)
    counts = {
        res["phase"]: next((v["lora_params"] for v in res["ranks"] if v["rank"] == 0), None)
        for res in results
    }
    print(
        f"\nLoRA parameter count DDP {counts.get('ddp')} vs FSDP2 {counts.get('fsdp2')}: "
        f"{'equal' if counts.get('ddp') == counts.get('fsdp2') else 'DIFFERENT'}"
    )
    return 0


def _table(results: list[dict[str, Any]]) -> None:
    print("\nlora-doctor multi-process run")
    for res in results:
        views = res["ranks"]
        main = next((v for v in views if v["rank"] == 0), {})
        print(f"\n== {res['phase']}: exit {res['exit_code']}, {res['wall_seconds']} s wall")
        if not main:
            print("   no rank result (see the phase log)")
            continue
        print(
            f"   world {main['world_size']}  fsdp2 {main['fsdp2']}  gpu {main['cuda']}  "
            f"train {main['seconds']} s  error: {main['error']}"
        )
        print(
            f"   LoRA weight: {main['lora_param_type']} local {main['lora_local_shape']}; doctor "
            f"read {main['layers']} layers, first {main['first_layer']}; LoRA params "
            f"{main['lora_params']:,} of base {main['base_params']:,}"
            if main["lora_params"] is not None
            else "   doctor: no facts"
        )
        for v in views:
            print(f"   rank {v['rank']} findings: {', '.join(v['findings']) or '-'}")
        print(f"   last log: {main['last_log']}")
        print(f"   JSON files: {res['reports']} -> {res['report_findings']}")
        print(
            f"   finding lines in the log (should each appear once, from rank0): {len(res['finding_log_lines'])}"
        )
        for line in res["finding_log_lines"]:
            print(f"     {line[:150]}")


def main() -> int:
    ns = _parse()
    if ns.phase is not None:
        run_phase(ns)
        return 0
    return _launch(ns)


if __name__ == "__main__":
    sys.exit(main())
