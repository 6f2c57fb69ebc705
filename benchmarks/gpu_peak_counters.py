"""GPU check: the doctor leaves CUDA's peak-memory counters alone (expected 2 to 3 minutes on an H200).

    python benchmarks/gpu_peak_counters.py --out $OUT          # needs CUDA
    python benchmarks/gpu_peak_counters.py --dry --out /tmp/x  # CPU: the same flow, no counters

Many training scripts print ``torch.cuda.max_memory_allocated()`` after ``trainer.train()``. A
memory probe that reset the peak at each log made that read the last logging interval's peak
(1.76 GiB where the run's true peak was 9.14 GiB, on an H200). This script trains the same LoRA
model the same way three times in one process: without the callback, with it, and without it
again (the repeat shows what a second run in the same process does on its own). Before each run
it resets the peak itself; after each it reads ``torch.cuda.max_memory_allocated()``. It also reads
the doctor's own last ``lora_doctor/mem_peak_alloc_gib``, which must be the same figure (it reads the
allocator's peak and resets nothing).

Targets: the peak with the doctor equals the peak without it within 1% (both runs without it
count); the doctor's reported peak equals ``max_memory_allocated()`` within 1%; the losses are
identical (judged only when the two runs without the doctor agree with each other). Prints a table and writes ``gpu_peak_counters.json`` under ``--out``. Exit status 0 when
every target is met, 1 otherwise, 2 when there is no CUDA device (without ``--dry``).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainingArguments

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import Tokens, attention_lora_llama
from lora_doctor import LoraDoctorCallback
from lora_doctor.checks.memory import KEY_PEAK_ALLOC
from lora_doctor.memory_estimate import GIB

#: Largest relative difference allowed between two peaks that should be equal.
TOLERANCE = 0.01


def _run(out: Path, name: str, *, doctor: bool, dry: bool, steps: int) -> dict[str, Any]:
    """One training run from a reset peak; returns the peak after it and what the doctor saw."""
    cuda = not dry
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()  # the script's own reset, before the run
    model = attention_lora_llama(dry)
    batch, seq = (2, 16) if dry else (8, 1024)
    args = TrainingArguments(
        output_dir=str(out / name),
        max_steps=steps,
        per_device_train_batch_size=batch,
        learning_rate=2e-4,
        logging_steps=5,  # the old probe reset the peak at each of these
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        bf16=cuda,
        use_cpu=dry,
        dataloader_num_workers=0,
        seed=0,
    )
    callback = LoraDoctorCallback() if doctor else None
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=Tokens(batch * steps, seq, model.config.vocab_size, seed=1),
        callbacks=[callback] if callback else None,
    )
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / GIB if cuda else None
    reported = None
    if callback is not None and callback.doctor is not None:
        series = callback.doctor.history.series(KEY_PEAK_ALLOC).values
        reported = float(series[-1]) if len(series) else None
    result = {
        "doctor": doctor,
        "max_memory_allocated_gib": peak,
        "doctor_reported_peak_gib": reported,
        "losses": [e["loss"] for e in trainer.state.log_history if "loss" in e],
        "seconds": seconds,
        "report_written": (out / name / "lora_doctor.json").exists(),
    }
    del trainer, model, callback
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return result


def _close(a: float | None, b: float | None) -> bool:
    return a is not None and b is not None and abs(a - b) <= TOLERANCE * max(abs(a), abs(b))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the results")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per run")
    parser.add_argument(
        "--dry",
        action="store_true",
        help="no GPU: a tiny model on CPU (exercises the flow; there are no counters to compare)",
    )
    opts = parser.parse_args(argv)
    if not opts.dry and not torch.cuda.is_available():
        print(
            "gpu_peak_counters.py needs a CUDA device (torch sees none); --dry runs the flow on CPU.",
            file=sys.stderr,
        )
        return 2
    opts.out.mkdir(parents=True, exist_ok=True)
    runs = {
        name: _run(opts.out, name, doctor=doctor, dry=opts.dry, steps=opts.steps)
        for name, doctor in (("without", False), ("with", True), ("without_again", False))
    }
    plain = [runs[name]["max_memory_allocated_gib"] for name in ("without", "without_again")]
    with_doctor = runs["with"]["max_memory_allocated_gib"]
    checks = {"the doctor wrote its report": runs["with"]["report_written"]}
    # Losses are compared only where two runs without the doctor agree (some CUDA kernels are
    # not deterministic on their own).
    if runs["without"]["losses"] == runs["without_again"]["losses"]:
        checks["same losses with and without the doctor"] = (
            runs["with"]["losses"] == runs["without"]["losses"]
        )
    if not opts.dry:
        checks["peak with the doctor = peak without it, within 1%"] = all(
            _close(with_doctor, p) for p in plain
        )
        checks["doctor's reported peak = max_memory_allocated(), within 1%"] = _close(
            runs["with"]["doctor_reported_peak_gib"], with_doctor
        )
    device = "cpu (--dry)" if opts.dry else torch.cuda.get_device_name()
    results = {"device": device, "steps": opts.steps, "runs": runs, "checks": checks}
    if with_doctor is not None and plain[0]:
        results["ratio_with_over_without"] = with_doctor / plain[0]
    (opts.out / "gpu_peak_counters.json").write_text(json.dumps(results, indent=2))

    print(f"\ntorch.cuda.max_memory_allocated() after trainer.train() on {device}")
    print(f"  {'run':<16} {'max_memory_allocated GiB':>25} {'doctor reported GiB':>20} {'s':>6}")
    for name, run in runs.items():
        peak, rep = run["max_memory_allocated_gib"], run["doctor_reported_peak_gib"]
        print(
            f"  {name:<16} {peak if peak is not None else float('nan'):>25.3f} "
            f"{rep if rep is not None else float('nan'):>20.3f} {run['seconds']:>6.1f}"
        )
    if "ratio_with_over_without" in results:
        print(
            f"  ratio with / without: {results['ratio_with_over_without']:.4f} (target 1 +- 0.01)"
        )
    for label, ok in checks.items():
        print(f"  {'PASS' if ok else 'FAIL'}  {label}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
