"""GPU check of lora-doctor's memory watch, in one command (expected 1 to 2 minutes on an H100).

    python benchmarks/gpu_memory.py --out $OUT          # needs CUDA
    python benchmarks/gpu_memory.py --dry --out /tmp/x  # CPU: the same logic on scripted readings

Four parts, on a Llama built from its config (random bf16 weights, no download) with a peft LoRA
adapter, trained by a real ``transformers.Trainer`` with ``LoraDoctorCallback()``:

  (c) comfortable: a normal run; no memory finding may appear. Its peak is measured.
  (b) near 93%: the same run with a ballast tensor allocated first so that the peak lands at about
      93% of the device's capacity; ``oom-risk`` must fire.
  (a) out of memory: a batch that truly does not fit; ``torch.OutOfMemoryError`` must surface
      unchanged and ``lora_doctor.json`` must hold an ``out-of-memory`` finding (printed).
  (d) cost: the memory probe's reading (median over many) against the step time of (c); the
      target is under 0.1% of a step. A reading is also timed while the GPU has a long queue of
      work: a reading that synchronized would wait for the queue.

Prints a compact table at the end and writes ``gpu_memory.json`` and each part's
``lora_doctor.json`` under ``--out``. Exit status 0 when every part passes, 1 otherwise, 2 when
there is no CUDA device (without ``--dry``).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import Tokens, attention_lora_llama
from lora_doctor import LoraDoctorCallback
from lora_doctor.checks.memory import KEY_PEAK_ALLOC
from lora_doctor.config import DoctorConfig
from lora_doctor.memory_estimate import GIB, estimate_memory, fits_rank
from lora_doctor.probes.memory import CudaMemoryReader, MemoryReading

RANK = 16


class _StepClock(TrainerCallback):
    """Wall time per optimizer step between two synchronized points (the benchmark may sync;
    the doctor never does)."""

    def __init__(self, start: int, cuda: bool) -> None:
        self.start, self.cuda = start, cuda
        self.t0: float | None = None
        self.t1 = 0.0
        self.steps = 0

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step < self.start:
            return
        if self.cuda:
            torch.cuda.synchronize()
        now = time.perf_counter()
        if self.t0 is None:
            self.t0 = now
        else:
            self.t1, self.steps = now, state.global_step - self.start

    @property
    def seconds(self) -> float:
        return (self.t1 - self.t0) / self.steps if self.t0 is not None and self.steps else 0.0


class _Scripted:
    """--dry: an imaginary 80 GiB device whose training peak sits at ``share`` of it."""

    device_type = "cpu"

    def __init__(self, share: float) -> None:
        self.share = share

    def available(self) -> bool:
        return True

    def read(self, device: Any = None) -> MemoryReading:
        cap = 80 * GIB
        peak = int(self.share * cap)
        return MemoryReading("cuda:0", peak, peak, peak // 2, peak, cap, cap - peak - GIB // 2)


def _train(
    out: Path,
    name: str,
    *,
    dry: bool,
    batch: int,
    seq: int,
    steps: int,
    reader: Any = None,
    oom_at_forward: int | None = None,
) -> dict[str, Any]:
    """One Trainer run with the doctor; returns what it found (and the error, if it died).

    The doctor never resets the allocator's peak: the script does, before each part, so that a
    part's peak is its own (as a user's script would between two runs in one process)."""
    if not dry:
        torch.cuda.reset_peak_memory_stats()
    model = attention_lora_llama(dry, RANK)
    vocab = model.config.vocab_size
    if oom_at_forward is not None:  # --dry only: CPU memory cannot run out here
        inner = model.base_model.model
        original, calls = inner.forward, [0]

        @functools.wraps(original)
        def forward(*args: Any, **kwargs: Any) -> Any:
            calls[0] += 1
            if calls[0] == oom_at_forward:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (dry)")
            return original(*args, **kwargs)

        inner.forward = forward
    args = TrainingArguments(
        output_dir=str(out / name),
        max_steps=steps,
        per_device_train_batch_size=batch,
        learning_rate=2e-4,
        logging_steps=5,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        bf16=not dry,
        use_cpu=dry,
        dataloader_num_workers=0,
    )
    doctor = LoraDoctorCallback(memory_reader=reader)
    clock = _StepClock(start=3, cuda=not dry)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=Tokens(max(batch * steps, 8), seq, vocab, seed=1),
        callbacks=[doctor, clock],
    )
    error: BaseException | None = None
    try:
        trainer.train()
    except torch.OutOfMemoryError as exc:
        error = exc
    report_path = out / name / "lora_doctor.json"
    report = json.loads(report_path.read_text()) if report_path.exists() else {}
    facts = doctor.doctor.facts if doctor.doctor is not None else None
    peaks: list[float] = (
        doctor.doctor.history.series(KEY_PEAK_ALLOC).values.tolist() if doctor.doctor else []
    )
    at_oom = (facts.memory.oom or {}).get("reading") if facts and facts.memory else None
    if not peaks and at_oom:  # died before its first log: the peak at the time of the error
        peaks = [float(at_oom["peak_alloc_gib"])]
    estimate = estimate_memory(facts.memory) if facts and facts.memory else None
    result = {
        "findings": [
            {k: f[k] for k in ("code", "slug", "severity", "step", "title")}
            | {"evidence": f["evidence"]}
            for f in report.get("findings", [])
        ],
        "error": f"{type(error).__name__}: {str(error)[:200]}" if error else None,
        "peak_alloc_gib": max(peaks) if peaks else None,
        "capacity_gib": (facts.memory.capacity or 0) / GIB if facts and facts.memory else None,
        "step_seconds": clock.seconds,
        "estimate": estimate.to_dict() if estimate else None,
        "estimate_line": estimate.describe() if estimate else None,
        "fits_2r": fits_rank(facts, 2 * RANK, DoctorConfig().oom_peak_share) if facts else None,
        "report": str(report_path),
    }
    del trainer, model, doctor, error
    gc.collect()
    if not dry:
        torch.cuda.empty_cache()
    return result


def _read_cost(reader: Any, n: int, cuda: bool) -> dict[str, float]:
    """Median and p99 of one reading (read + metrics), and a reading timed behind a GPU queue."""
    times = []
    for _ in range(n):
        t = time.perf_counter_ns()
        reader.read(None).metrics()
        times.append(time.perf_counter_ns() - t)
    times.sort()
    out = {
        "read_median_us": statistics.median(times) / 1e3,
        "read_p99_us": times[int(0.99 * (len(times) - 1))] / 1e3,
    }
    if cuda:  # a reading while the GPU works through ~50 ms of queued matmuls
        a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
        busy, queue = [], []
        for _ in range(10):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(50):
                a @ a
            t = time.perf_counter_ns()
            reader.read(None)
            busy.append((time.perf_counter_ns() - t) / 1e3)
            torch.cuda.synchronize()
            queue.append((time.perf_counter() - t0) * 1e3)
        del a
        torch.cuda.empty_cache()
        out["read_behind_queue_us"] = statistics.median(busy)
        out["queue_ms"] = statistics.median(queue)
    return out


def _slugs(result: dict[str, Any]) -> set[str]:
    return {f["slug"] for f in result["findings"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the results")
    parser.add_argument(
        "--dry",
        action="store_true",
        help="no GPU: a tiny model on CPU with scripted readings (exercises the logic only)",
    )
    parser.add_argument("--target", type=float, default=0.93, help="peak share for part (b)")
    parser.add_argument("--reads", type=int, default=2000, help="readings timed in part (d)")
    opts = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not opts.dry:
        print(
            "gpu_memory.py needs a CUDA device (torch sees none). Run with --dry to exercise the "
            "logic on CPU with scripted readings.",
            file=sys.stderr,
        )
        return 2
    dry = opts.dry
    opts.out.mkdir(parents=True, exist_ok=True)
    batch, seq, steps = (2, 16, 12) if dry else (8, 1024, 40)
    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if cuda and not dry else "cpu"
    }
    t_all = time.perf_counter()

    # (c) comfortable
    results["c_comfortable"] = _train(
        opts.out,
        "c_comfortable",
        dry=dry,
        batch=batch,
        seq=seq,
        steps=steps,
        reader=_Scripted(0.5) if dry else None,
    )

    # (b) near the target share: a ballast tensor takes what the comfortable peak leaves over
    ballast = None
    if dry:
        reader_b: Any = _Scripted(opts.target)
    else:
        reader_b = None
        cap = torch.cuda.mem_get_info()[1]
        reading = CudaMemoryReader().read(None)
        peak = results["c_comfortable"]["peak_alloc_gib"] * GIB
        size = int(opts.target * cap - reading.outside - peak - reading.allocated)
        ballast = torch.empty(max(size, 0), dtype=torch.uint8, device="cuda")
        results["ballast_gib"] = ballast.numel() / GIB
    results["b_near_capacity"] = _train(
        opts.out, "b_near_capacity", dry=dry, batch=batch, seq=seq, steps=steps, reader=reader_b
    )
    del ballast
    if cuda:
        torch.cuda.empty_cache()

    # (d) cost of a reading against the step time of (c)
    reader_d = _Scripted(0.5) if dry else CudaMemoryReader()
    cost = _read_cost(reader_d, opts.reads if not dry else 200, cuda and not dry)
    step_s = results["c_comfortable"]["step_seconds"] or float("nan")
    cost["step_ms"] = step_s * 1e3
    cost["share_of_step"] = cost["read_median_us"] / 1e6 / step_s
    results["d_cost"] = cost

    # (a) a batch that does not fit (last: an OOM leaves the allocator fragmented)
    results["a_out_of_memory"] = _train(
        opts.out,
        "a_out_of_memory",
        dry=dry,
        batch=batch if dry else 64,
        seq=seq if dry else 2048,
        steps=steps,
        reader=_Scripted(0.5) if dry else None,
        oom_at_forward=2 if dry else None,
    )
    results["seconds"] = time.perf_counter() - t_all

    a, b, c = results["a_out_of_memory"], results["b_near_capacity"], results["c_comfortable"]
    risk = [f for f in b["findings"] if f["slug"] == "oom-risk"]
    checks = {
        "a: OOM surfaced and out-of-memory in JSON": bool(a["error"])
        and "out-of-memory" in _slugs(a),
        "b: oom-risk near capacity": bool(risk) and not b["error"],
        "c: comfortable run quiet": not ({"oom-risk", "out-of-memory"} & _slugs(c)),
        "d: reading < 0.1% of a step": cost["share_of_step"] < 1e-3,
    }
    results["checks"] = checks
    (opts.out / "gpu_memory.json").write_text(json.dumps(results, indent=2, default=str))

    oom = next((f for f in a["findings"] if f["slug"] == "out-of-memory"), None)
    print(f"\nlora-doctor memory watch on {results['device']} ({results['seconds']:.0f} s)")
    if oom:
        print(f"  (a) {oom['code']} {oom['slug']} at step {oom['step']}: {oom['title']}")
        at_oom = oom["evidence"].get("reading") or {}
        if at_oom:
            print(
                f"      at the time: allocated {at_oom['allocated_gib']:.2f} GiB, reserved "
                f"{at_oom['reserved_gib']:.2f}, free {at_oom['free_gib']:.2f} of "
                f"{at_oom['capacity_gib']:.2f} GiB; tried to allocate "
                f"{oom['evidence'].get('tried_to_allocate')}"
            )
    if risk:
        ev = risk[0]["evidence"]
        print(f"  (b) {risk[0]['code']} oom-risk ({ev.get('rule')}): {risk[0]['title']}")
    if c["estimate_line"]:
        print(f"  (c) estimate {c['estimate_line']}; 2r fits: {c['fits_2r']}")
    print(f"  {'part':<44} {'peak GiB':>9} {'cap GiB':>8} {'result':>7}")
    rows = [(a, checks["a: OOM surfaced and out-of-memory in JSON"], "a: batch too large")]
    rows += [(b, checks["b: oom-risk near capacity"], f"b: ballast to {opts.target:.0%}")]
    rows += [(c, checks["c: comfortable run quiet"], "c: comfortable")]
    for part, ok, label in rows:
        peak = part["peak_alloc_gib"]
        cap_gib = part["capacity_gib"]
        print(
            f"  {label:<44} {peak if peak is not None else float('nan'):>9.2f} "
            f"{cap_gib if cap_gib is not None else float('nan'):>8.2f} {'PASS' if ok else 'FAIL':>7}"
        )
    behind = (
        f", behind a {cost['queue_ms']:.0f} ms GPU queue {cost['read_behind_queue_us']:.0f} us"
        if "queue_ms" in cost
        else ""
    )
    print(
        f"  d: reading {cost['read_median_us']:.1f} us median (p99 {cost['read_p99_us']:.1f}){behind};"
        f" step {cost['step_ms']:.1f} ms -> {cost['share_of_step']:.5%} of a step "
        f"{'PASS' if checks['d: reading < 0.1% of a step'] else 'FAIL'}"
    )
    if dry:
        print("  (--dry: scripted readings on CPU; the figures are not measurements)")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
