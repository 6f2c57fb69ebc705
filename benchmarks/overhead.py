"""What LoraDoctorCallback costs a real training run, measured inside one run.

A Llama-shaped model of about 1B parameters (hidden 2048, 16 layers, intermediate 5632, 32 heads,
vocabulary 32000; random weights in bf16), LoRA r 16 / lora_alpha 32 on every linear layer (112
LoRA layers), batches of 4 sequences of 1024 tokens, AdamW under bf16 autocast: the shape of a
real SFT step. ``LoraDoctorCallback()`` with its defaults, the time budget and the spectrum
included (``--time-budget`` sets another budget, or none).

The in-run design. Fresh Trainer runs of the same arm differ by up to 20% in step time (allocator
and clock state), which hides any cost below that; so each run is one Trainer, and the doctor's
per-step hooks (``on_pre_optimizer_step``, ``on_step_end``, ``on_log``) are gated on and off in
alternating blocks of ``--block`` steps:

- block 0 is a lead-in with the doctor on (its first-steps checks, the allocator's warm-up), then
  off and on blocks alternate; the device is synchronised only at block boundaries, so the work
  queued on it overlaps the host as it does in a real run;
- the doctor's ``on_step_end`` is let through at its planned spectrum-reading steps in off blocks
  too, so that the spectrum is read at the steps it would be without the gate (a block holding a
  reading is then left out of the steady pairs below);
- ``on_train_begin`` and ``on_train_end`` are never gated.

Two measures, for each run length, with and without the spectrum:

- the step clock: each off block and the on block after it make a pair; the ratio of their times,
  over the pairs that hold no spectrum reading, is the doctor's steady per-step cost (median,
  quartiles, mean with its 95% interval); a block holding a reading is compared with the median
  block of its kind, which gives the reading's cost on the step clock. Extrapolated to a whole
  run with the doctor always on: the steady cost on every step after the lead-in, plus the
  readings', plus the one-time hooks (start-up, lead-in, end; timed in the hooks: the step clock
  cannot separate them), as a share of the run's wall time;
- the in-hook timer, the direct measure: the host time inside each of the doctor's hooks, by step.
  Extrapolated alike: the one-time hooks, the reading steps' hooks, and the mean of the other
  on-steps over every step. The time a hook waits for the training's queued device work is the
  training's, not the doctor's: the benchmark synchronises the device just before each reading (and
  the spectrum's start-up) and leaves that wait out, and so does the doctor for its first-steps reads (``waited_seconds`` in
  its facts), which is left out too.

"Without the spectrum" is the same run with the spectrum's own time left out (its part of
``train_begin``; its start-up, which reads the base weights' norms and times one layer, at the first
reading the time budget affords, or in ``train_begin`` without a limit; and its readings, as the
benchmark timed them; a step holding the start-up counts as a reading step):
a separate run with ``spectrum=False`` would cost the same steps again, which the time limit does
not allow.

Also reported: the readings the time budget let through (taken of planned, and layers per reading),
the per-block peak allocated memory (off blocks against on blocks, past the lead-in), and whether
the in-hook share stays within the time budget (``DoctorConfig.time_budget``, 0.5%) with at most
16 MiB more peak memory.

Run on a GPU (about 8 minutes on an H200 for the default plan: 3 runs of 100 steps, one of 600,
one of 3,000; the longest run is shortened, and says so, when the measured step time would not
finish the plan within ``--max-minutes``):
    python -m benchmarks.overhead --out $OUT
On CPU (a small model, to check the logic):
    python -m benchmarks.overhead --device cpu --small
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PrinterCallback,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)
from transformers.utils import logging as hf_logging

from benchmarks.faults.runner import quiet_doctor
from lora_doctor import DoctorConfig, LoraDoctorCallback
from lora_doctor.probes import spectrum as spectrum_probe

MEMORY_TARGET_MIB = 16.0
MIB = 2**20
#: The doctor's hooks that run at every step, gated off in off blocks.
PER_STEP = ("on_pre_optimizer_step", "on_step_end", "on_log")
#: Every hook the doctor has that the Trainer calls during ``train``.
HOOKS = ("on_train_begin", *PER_STEP, "on_evaluate", "on_train_end")
#: Hook-time keys of the one-time work outside the steps.
BEGIN, END = 0, -1


# --- one run --------------------------------------------------------------------------------------
@dataclass
class Block:
    """A block of consecutive steps with the doctor's per-step hooks on or off."""

    index: int
    on: bool
    first: int
    last: int
    seconds: float = 0.0
    peak_bytes: int = 0
    #: closed at the end of training: holds the end-of-run work, never paired
    final: bool = False

    @property
    def steps(self) -> int:
        return self.last - self.first + 1


@dataclass
class RunRecord:
    """What one gated Trainer run measured."""

    steps: int
    rep: int
    block: int
    wall_s: float = 0.0
    blocks: list[Block] = field(default_factory=list)
    #: host seconds inside the doctor's hooks, by step (BEGIN, END: train begin and end)
    hook_s: dict[int, float] = field(default_factory=dict)
    #: host seconds inside each of the doctor's hooks over the run (as gated), by hook name
    hook_by_name_s: dict[str, float] = field(default_factory=dict)
    #: seconds the benchmark waited for queued device work just before a reading or the
    #: spectrum's start-up, by step
    waited_s: dict[int, float] = field(default_factory=dict)
    #: the spectrum probe's own time: its part of train_begin (its start-up left out), its
    #: start-up by step (BEGIN without a limit; none when no reading was affordable), and each
    #: reading by step (END: the final one)
    spectrum_begin_s: float = 0.0
    start_up_s: dict[int, float] = field(default_factory=dict)
    reading_s: dict[int, float] = field(default_factory=dict)
    layers_per_reading: list[int] = field(default_factory=list)
    layers_total: int = 0
    planned: int = 0
    #: seconds the doctor's own hooks waited for queued device work outside the readings (its
    #: first-steps checks: ``OverheadFacts.waited_seconds``), all in the one-time hooks
    doctor_waited_s: float = 0.0


class InRun(TrainerCallback):
    """The block clock and the gate: placed after the doctor, it closes a block when the next one
    begins (the doctor's hooks of a step, its log included, fall in that step's block), with the
    device synchronised only there."""

    def __init__(self, record: RunRecord, sync: Callable[[], None], cuda: bool) -> None:
        self.record = record
        self.sync = sync
        self.cuda = cuda
        self.on = True
        self.step = BEGIN
        self.begin = 0.0
        self.started = 0.0
        self.current: Block | None = None

    def _close(self, now: float, final: bool = False) -> None:
        block = self.current
        if block is None:
            return
        block.seconds = now - self.started
        block.final = final
        if self.cuda:
            block.peak_bytes = torch.cuda.max_memory_allocated()
        self.record.blocks.append(block)

    def mark_begin(self) -> None:
        """Training begins: the wall clock starts (before the doctor's start-up, which counts)."""
        if not self.begin:
            self.sync()
            self.begin = time.perf_counter()

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.mark_begin()  # without a doctor (the warm-up); else the doctor's wrapper did

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.step = int(state.global_step) + 1
        size = self.record.block
        if (self.step - 1) % size:
            return
        self.sync()
        self._close(time.perf_counter())
        index = (self.step - 1) // size
        self.on = index % 2 == 0  # block 0, the lead-in, is on
        last = min(self.step + size - 1, int(state.max_steps))
        self.current = Block(index, self.on, self.step, last)
        if self.cuda:
            # the benchmark's own reading of the peak per block; the doctor never resets it
            torch.cuda.reset_peak_memory_stats()
        self.started = time.perf_counter()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.sync()
        now = time.perf_counter()
        self._close(now, final=True)
        self.record.wall_s = now - self.begin


def gate_and_time(doctor: LoraDoctorCallback, clock: InRun, planned: set[int]) -> None:
    """Wraps the doctor's hooks (on the instance): per-step hooks run only in on blocks, its
    ``on_step_end`` also at planned reading steps; every hook's host time is added to its step."""
    record = clock.record
    for name in HOOKS:
        hook = getattr(doctor, name)

        def wrapped(
            args: Any, state: Any, control: Any, _hook: Any = hook, _name: str = name, **kw: Any
        ) -> Any:
            if _name == "on_train_begin":
                clock.mark_begin()
            if _name == "on_train_end":
                clock.step = END
            step = clock.step
            passed = _name == "on_step_end" and int(state.global_step) in planned
            if _name in PER_STEP and not clock.on and not passed:
                return None
            t0 = time.perf_counter()
            try:
                return _hook(args, state, control, **kw)
            finally:
                dt = time.perf_counter() - t0
                record.hook_s[step] = record.hook_s.get(step, 0.0) + dt
                record.hook_by_name_s[_name] = record.hook_by_name_s.get(_name, 0.0) + dt

        setattr(doctor, name, wrapped)


def time_spectrum(record: RunRecord, clock: InRun, sync: Callable[[], None]) -> Callable[[], None]:
    """Times the spectrum probe's part of train_begin, its start-up and its readings (class-level
    wrappers; returns the undo).

    Before a reading or the start-up the device is synchronised and that wait recorded apart: it
    is the training's queued work, which the doctor's own account leaves out too.
    """
    probe = spectrum_probe.SpectrumProbe
    begin, start_up, snapshot = probe.train_begin, probe._start_up, probe.snapshot

    def synced(into: dict[int, float], call: Callable[[], Any]) -> Any:
        """Runs ``call`` between two syncs, its time added to ``into`` at this step (END: the
        end of training), the wait for the training's queued work to ``waited_s``."""
        key = clock.step
        t0 = time.perf_counter()
        sync()
        t1 = time.perf_counter()
        record.waited_s[key] = record.waited_s.get(key, 0.0) + t1 - t0
        out = call()
        sync()
        into[key] = into.get(key, 0.0) + time.perf_counter() - t1
        return out

    @functools.wraps(begin)
    def timed_begin(self: Any, event: Any) -> None:
        def nested() -> float:  # a start-up within train_begin (no limit), timed apart
            return record.start_up_s.get(BEGIN, 0.0) + record.waited_s.get(BEGIN, 0.0)

        t0, before = time.perf_counter(), nested()
        begin(self, event)
        record.spectrum_begin_s += time.perf_counter() - t0 - (nested() - before)

    @functools.wraps(start_up)
    def timed_start_up(self: Any, event: Any) -> None:
        synced(record.start_up_s, lambda: start_up(self, event))

    @functools.wraps(snapshot)
    def timed_snapshot(self: Any, event: Any, *args: Any, **kwargs: Any) -> Any:
        snap = synced(record.reading_s, lambda: snapshot(self, event, *args, **kwargs))
        record.layers_per_reading.append(snap.layers_read)
        record.layers_total = snap.layers_total
        return snap

    probe.train_begin = timed_begin  # type: ignore[method-assign]
    probe._start_up = timed_start_up  # type: ignore[method-assign]
    probe.snapshot = timed_snapshot  # type: ignore[method-assign]

    def undo() -> None:
        probe.train_begin = begin  # type: ignore[method-assign]
        probe._start_up = start_up  # type: ignore[method-assign]
        probe.snapshot = snapshot  # type: ignore[method-assign]

    return undo


def build_model(small: bool, device: torch.device) -> Any:
    """The ~1B Llama (or a small one) with LoRA r 16 on every linear layer."""
    if small:
        config = LlamaConfig(
            hidden_size=128,
            intermediate_size=352,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            vocab_size=1000,
        )
    else:
        config = LlamaConfig(
            hidden_size=2048,
            intermediate_size=5632,
            num_hidden_layers=16,
            num_attention_heads=32,
            num_key_value_heads=32,
            vocab_size=32000,
            max_position_embeddings=2048,
        )
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    with device:
        model = LlamaForCausalLM(config).to(dtype)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear")
    return get_peft_model(model, lora)


def make_data(n: int, seq: int, vocab: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(0, vocab, (n, seq), generator=g)
    return [
        {"input_ids": r, "labels": r.clone(), "attention_mask": torch.ones_like(r)} for r in rows
    ]


def train_args(workdir: Path, steps: int, batch: int, device: torch.device, seed: int) -> Any:
    return TrainingArguments(
        output_dir=str(workdir),
        max_steps=steps,
        per_device_train_batch_size=batch,
        learning_rate=2e-4,
        logging_steps=10,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        bf16=device.type == "cuda",
        use_cpu=device.type == "cpu",
        dataloader_num_workers=0,
        seed=seed,
    )


def run_once(
    steps: int,
    rep: int,
    block: int,
    model: Any,
    data: list[dict[str, torch.Tensor]],
    batch: int,
    device: torch.device,
    workdir: Path,
    config: DoctorConfig,
) -> RunRecord:
    """One Trainer of ``steps`` steps with the doctor gated in blocks; returns what it measured."""
    cuda = device.type == "cuda"
    sync: Callable[[], None] = torch.cuda.synchronize if cuda else lambda: None
    record = RunRecord(steps, rep, block)
    doctor = LoraDoctorCallback(workdir / f"steps{steps}-{rep}.json", config=config)
    clock = InRun(record, sync, cuda)
    every = spectrum_probe.reading_interval(config, steps)
    gate_and_time(doctor, clock, set(range(every, steps + 1, every)) if every else set())
    args = train_args(workdir / f"steps{steps}-{rep}", steps, batch, device, rep)
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[doctor])
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(clock)  # last: after the doctor, which moves itself forward
    undo = time_spectrum(record, clock, sync)
    try:
        trainer.train()
    finally:
        undo()
    overhead = doctor.doctor.facts.overhead if doctor.doctor is not None else None
    if overhead is not None:
        record.planned = overhead.spectrum_planned
        record.doctor_waited_s = overhead.waited_seconds
    del trainer
    if cuda:
        torch.cuda.empty_cache()
    return record


def warm_up_step_seconds(
    model: Any, data: list[dict[str, torch.Tensor]], batch: int, device: torch.device, out: Path
) -> float:
    """Trains 30 steps without the doctor (kernels loaded, allocator grown) and returns the
    median step time of the last 20, from blocks of 10."""
    cuda = device.type == "cuda"
    record = RunRecord(30, -1, 10)
    clock = InRun(record, torch.cuda.synchronize if cuda else lambda: None, cuda)
    trainer = Trainer(
        model=model, args=train_args(out / "warm-up", 30, batch, device, 0), train_dataset=data
    )
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(clock)
    trainer.train()
    return statistics.median(b.seconds / b.steps for b in record.blocks[1:])


# --- the numbers ----------------------------------------------------------------------------------
def _quartiles(values: Sequence[float]) -> tuple[float, float]:
    if len(values) < 2:
        return (values[0], values[0]) if values else (math.nan, math.nan)
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


def _ci95(values: Sequence[float]) -> float:
    return 1.96 * statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else math.nan


@dataclass
class Summary:
    """One run length, with or without the spectrum."""

    steps: int
    runs: int
    spectrum: bool
    step_ms: float
    pairs: int
    ratio_median: float
    ratio_q1: float
    ratio_q3: float
    ratio_mean: float
    ratio_ci95: float
    hook_step_us: float
    share_in_hook: float
    share_step_clock: float
    share_step_clock_ci95: float
    readings: str
    extra_peak_mib: float | None
    budget: float | None


@dataclass
class _Parts:
    """One run's pieces, before pooling over repetitions."""

    ratios: list[float]
    off_block_s: list[float]
    reading_excess_s: float
    one_time_s: float
    one_time_spectrum_s: float
    reading_hook_s: float
    steady_hook_s: list[float]
    steps_after_lead_in: int
    periodic_readings: int


def _parts(r: RunRecord) -> _Parts:
    """Splits one run into its steady pairs, its reading blocks and its one-time work."""
    blocks = {b.index: b for b in r.blocks}
    lead_last = blocks[0].last if 0 in blocks else 0
    # the steps past the lead-in that hold a reading or the spectrum's start-up
    periodic = {s for s in (*r.reading_s, *r.start_up_s) if s > lead_last}

    def holds_reading(b: Block) -> bool:
        return any(b.first <= s <= b.last for s in periodic)

    def usable(b: Block | None) -> bool:
        return b is not None and b.index > 0 and not b.final and b.steps == r.block

    steady: dict[bool, list[float]] = {True: [], False: []}
    ratios: list[float] = []
    for b in r.blocks:
        if not usable(b) or holds_reading(b):
            continue
        steady[b.on].append(b.seconds)
        off = blocks.get(b.index - 1)
        if b.on and off is not None and usable(off) and not holds_reading(off):
            ratios.append(b.seconds / off.seconds)
    excess = sum(
        b.seconds - statistics.median(steady[b.on])
        for b in r.blocks
        if usable(b) and holds_reading(b) and steady[b.on]
    )
    hooks, waited = r.hook_s, r.waited_s
    outside = [BEGIN, END, *range(1, lead_last + 1)]  # the steps no pair measures
    on_steps = {s for b in r.blocks if b.on and b.index > 0 for s in range(b.first, b.last + 1)}
    return _Parts(
        ratios=ratios,
        off_block_s=steady[False],
        reading_excess_s=excess,
        one_time_s=sum(hooks.get(s, 0.0) - waited.get(s, 0.0) for s in outside) - r.doctor_waited_s,
        one_time_spectrum_s=r.spectrum_begin_s
        + sum(r.reading_s.get(s, 0.0) + r.start_up_s.get(s, 0.0) for s in outside),
        reading_hook_s=sum(hooks.get(s, 0.0) - waited.get(s, 0.0) for s in periodic),
        steady_hook_s=[hooks.get(s, 0.0) for s in sorted(on_steps - periodic)],
        steps_after_lead_in=r.steps - lead_last,
        periodic_readings=len(periodic),
    )


def _span(values: Sequence[int]) -> str:
    if not values:
        return "0"
    return str(values[0]) if values[0] == values[-1] else f"{values[0]}-{values[-1]}"


def summarize(records: Sequence[RunRecord], budget: float | None) -> list[Summary]:
    """Per run length: the pooled pairs and the extrapolated shares of the wall time, with and
    without the spectrum (see the module's docstring)."""
    out: list[Summary] = []
    for steps in sorted({r.steps for r in records}):
        runs = [r for r in records if r.steps == steps]
        parts = [_parts(r) for r in runs]
        ratios = [x for p in parts for x in p.ratios]
        off = [x for p in parts for x in p.off_block_s]
        step_s = statistics.median(off) / runs[0].block if off else math.nan
        mean = statistics.fmean(ratios) if ratios else math.nan
        ci = _ci95(ratios)
        q1, q3 = _quartiles(ratios)
        steady = [x for p in parts for x in p.steady_hook_s]
        per_step = statistics.fmean(steady) if steady else 0.0
        wall = statistics.fmean(r.wall_s for r in runs)
        # block by block, past the lead-in (which holds the optimizer's first allocations)
        inner = [b for r in runs for b in r.blocks if b.index > 0 and not b.final and b.peak_bytes]
        peaks_off = [b.peak_bytes for b in inner if not b.on]
        peaks_on = [b.peak_bytes for b in inner if b.on]
        extra = (max(peaks_on) - max(peaks_off)) / MIB if peaks_off and peaks_on else None
        taken = statistics.fmean(len(r.layers_per_reading) for r in runs)
        planned = statistics.fmean(r.planned for r in runs)
        layers = sorted({n for r in runs for n in r.layers_per_reading})
        total = max((r.layers_total for r in runs), default=0)
        readings = f"{taken:g} of {planned:g}, {_span(layers)} of {total} layers"
        for with_spectrum in (True, False):
            in_hook, on_clock = [], []
            for p in parts:
                steady_clock = (mean - 1) * step_s * p.steps_after_lead_in
                if with_spectrum:
                    rest = p.steps_after_lead_in - p.periodic_readings
                    in_hook.append(p.one_time_s + p.reading_hook_s + per_step * rest)
                    on_clock.append(steady_clock + p.reading_excess_s + p.one_time_s)
                else:
                    one_time = p.one_time_s - p.one_time_spectrum_s
                    in_hook.append(one_time + per_step * p.steps_after_lead_in)
                    on_clock.append(steady_clock + one_time)
            out.append(
                Summary(
                    steps=steps,
                    runs=len(runs),
                    spectrum=with_spectrum,
                    step_ms=1e3 * step_s,
                    pairs=len(ratios),
                    ratio_median=statistics.median(ratios) - 1 if ratios else math.nan,
                    ratio_q1=q1 - 1,
                    ratio_q3=q3 - 1,
                    ratio_mean=mean - 1,
                    ratio_ci95=ci,
                    hook_step_us=1e6 * per_step,
                    share_in_hook=statistics.fmean(in_hook) / wall,
                    share_step_clock=statistics.fmean(on_clock) / wall,
                    share_step_clock_ci95=ci * step_s * (steps - runs[0].block) / wall,
                    readings=readings if with_spectrum else "-",
                    extra_peak_mib=extra,
                    budget=budget,
                )
            )
    return out


def _pct(x: float, sign: bool = True) -> str:
    return "n/a" if not math.isfinite(x) else f"{100 * x:+.2f}%" if sign else f"{100 * x:.3f}%"


def format_table(rows: Iterable[Summary]) -> str:
    """The table: one line per run length, with and without the spectrum."""
    head = (
        f"{'steps':>5} {'runs':>4} {'spectrum':<8} {'step':>8} {'pairs':>5}  "
        f"{'on/off per step: median [q1, q3]':<34} {'mean +- 95%':<17} {'hooks/step':>10}  "
        f"{'share: in hooks':>15} {'step clock':>18}  {'+peak':>8}  {'readings':<30} budget"
    )
    lines = [head]
    for r in rows:
        spread = f"{_pct(r.ratio_median)} [{_pct(r.ratio_q1)}, {_pct(r.ratio_q3)}]"
        mean = f"{_pct(r.ratio_mean)} +- {100 * r.ratio_ci95:.2f}%"
        clock = f"{_pct(r.share_step_clock, False)} +- {100 * r.share_step_clock_ci95:.2f}%"
        peak = f"{r.extra_peak_mib:+.1f}M" if r.extra_peak_mib is not None else "n/a"
        memory_ok = r.extra_peak_mib is None or r.extra_peak_mib <= MEMORY_TARGET_MIB
        if r.budget is None:
            verdict = f"no limit; <= {MEMORY_TARGET_MIB:g} MiB: {'met' if memory_ok else 'NOT met'}"
        else:
            met = r.share_in_hook <= r.budget and memory_ok
            verdict = (
                f"<= {100 * r.budget:g}% and {MEMORY_TARGET_MIB:g} MiB: "
                f"{'met' if met else 'NOT met'}"
            )
        lines.append(
            f"{r.steps:>5} {r.runs:>4} {'with' if r.spectrum else 'without':<8} "
            f"{r.step_ms:>6.1f}ms {r.pairs:>5}  {spread:<34} {mean:<17} {r.hook_step_us:>8.0f}us  "
            f"{_pct(r.share_in_hook, False):>15} {clock:>18}  {peak:>8}  {r.readings:<30} "
            f"{verdict}"
        )
    return "\n".join(lines)


def format_hooks(records: Sequence[RunRecord]) -> str:
    """Per run length, the milliseconds inside each of the doctor's hooks per run, as gated."""
    lines = []
    for steps in sorted({r.steps for r in records}):
        runs = [r for r in records if r.steps == steps]
        ms = {
            name: 1e3 * statistics.fmean(r.hook_by_name_s.get(name, 0.0) for r in runs)
            for name in HOOKS
        }
        lines.append(
            f"{steps} steps: ms inside each hook per run, as gated (the spectrum's start-up at its "
            "first affordable reading, the final reading in train_end): "
            + ", ".join(f"{k[3:]} {v:.1f}" for k, v in ms.items())
        )
    return "\n".join(lines)


# --- the command ----------------------------------------------------------------------------------
def parse_plan(text: str) -> list[tuple[int, int]]:
    """``"100x3,600,3000"`` -> ``[(100, 3), (600, 1), (3000, 1)]``: run lengths and repetitions.

    Example:
        >>> parse_plan("100x3,600")
        [(100, 3), (600, 1)]
    """
    plan = []
    for item in text.split(","):
        steps, _, reps = item.strip().partition("x")
        plan.append((int(steps), int(reps or 1)))
    return plan


def fit_plan(
    plan: list[tuple[int, int]], step_s: float, seconds: float, block: int
) -> tuple[list[tuple[int, int]], str]:
    """The plan, with its longest run shortened (to a whole number of block pairs) when its steps
    at ``step_s`` each (plus 10% and 5 s per run for the Trainer's set-up) would take longer than
    ``seconds``; and a line saying what was done.

    Example:
        >>> fit_plan([(100, 3), (3000, 1)], 0.1, 300.0, 10)[0]
        [(100, 3), (2240, 1)]
    """

    def cost(p: list[tuple[int, int]]) -> float:
        return sum(reps * (1.1 * steps * step_s + 5.0) for steps, reps in p)

    if cost(plan) <= seconds:
        return plan, f"planned: {cost(plan) / 60:.1f} minutes at {step_s:.4f} s a step"
    longest = max(range(len(plan)), key=lambda i: plan[i][0])
    steps, reps = plan[longest]
    others = cost([p for i, p in enumerate(plan) if i != longest])
    room = (seconds - others) / reps - 5.0
    fitted = max(4 * block, int(room / (1.1 * step_s)) // (2 * block) * 2 * block)
    plan = [(fitted, reps) if i == longest else p for i, p in enumerate(plan)]
    return plan, (
        f"the {steps}-step run is shortened to {fitted} steps to finish within "
        f"{seconds / 60:.1f} minutes ({step_s:.4f} s a step)"
    )


def _budget_arg(text: str) -> float | None:
    if text.lower() == "none":
        return None
    try:
        return DoctorConfig(time_budget=float(text)).time_budget
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--small", action="store_true", help="a small model (for CPU)")
    parser.add_argument(
        "--lengths",
        default=None,
        help="run lengths in steps, each with its repetitions (default 100x3,600,3000; 40 with "
        "--small)",
    )
    parser.add_argument(
        "--block", type=int, default=None, help="steps per on or off block (10; 4 with --small)"
    )
    parser.add_argument(
        "--max-minutes",
        type=float,
        default=8.0,
        help="the longest run is shortened when the plan would take longer (default 8)",
    )
    parser.add_argument(
        "--time-budget",
        type=_budget_arg,
        default=DoctorConfig().time_budget,
        help="the doctor's DoctorConfig.time_budget, or 'none' for no limit (default 0.005)",
    )
    parser.add_argument(
        "--batch", type=int, default=None, help="sequences per step (4; 2 with --small)"
    )
    parser.add_argument(
        "--seq", type=int, default=None, help="tokens per sequence (1024; 64 with --small)"
    )
    parser.add_argument(
        "--out", type=Path, default=Path("out/overhead"), help="folder for the results"
    )
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no GPU; use --device cpu --small")
    try:
        plan = parse_plan(args.lengths or ("40" if args.small else "100x3,600,3000"))
    except ValueError:
        parser.error(f"--lengths must read like 100x3,600,3000, got {args.lengths!r}")
    block = args.block or (4 if args.small else 10)
    batch = args.batch or (2 if args.small else 4)
    seq = args.seq or (64 if args.small else 1024)
    if min(block, batch, seq, *(s for p in plan for s in p)) < 1:
        parser.error("--lengths, --block, --batch and --seq must be >= 1")
    if any(steps < 3 * block for steps, _ in plan):
        parser.error("every run length must be at least 3 blocks (a lead-in and one pair)")
    hf_logging.set_verbosity_error()
    if device.type == "cpu":
        torch.set_num_threads(1)  # a shared CPU: several threads spin against each other
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    model = build_model(args.small, device)
    data = make_data(max(s for s, _ in plan) * batch, seq, model.config.vocab_size)
    records: list[RunRecord] = []
    config = DoctorConfig(time_budget=args.time_budget)
    with quiet_doctor() as collected:
        step_s = warm_up_step_seconds(model, data, batch, device, args.out)
        left = 60 * args.max_minutes - (time.perf_counter() - start)
        plan, said = fit_plan(plan, step_s, left, block)
        print(said, flush=True)
        for steps, reps in plan:
            for rep in range(reps):
                t0 = time.perf_counter()
                records.append(
                    run_once(steps, rep, block, model, data, batch, device, args.out, config)
                )
                print(
                    f"  ran {steps} steps (repetition {rep + 1} of {reps}) in "
                    f"{time.perf_counter() - t0:.0f} s",
                    flush=True,
                )
    rows = summarize(records, config.time_budget)
    cuda = device.type == "cuda"
    name = torch.cuda.get_device_name() if cuda else "CPU"
    lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    base = sum(p.numel() for p in model.parameters()) - lora
    head = (
        f"{name}; torch {torch.__version__}; base {base / 1e6:,.0f}M params, LoRA "
        f"{lora / 1e6:.1f}M (r 16, all linear); batch {batch} x {seq} tokens; blocks of {block} "
        f"steps; runs: {', '.join(f'{r} x {s}' for s, r in plan)} steps; "
        f"{time.perf_counter() - start:.0f} s in all"
    )
    table = format_table(rows)
    by_hook = format_hooks(records)
    print(head)
    print(table)
    print(by_hook)
    if collected.lines:
        print(f"doctor internal errors ({len(collected.lines)}):", *collected.lines, sep="\n  ")
    (args.out / "overhead.json").write_text(
        json.dumps(
            {
                "machine": head,
                "plan": said,
                "rows": [asdict(r) for r in rows],
                "runs": [asdict(r) for r in records],
            },
            indent=1,
        ),
        encoding="utf-8",
    )
    (args.out / "overhead.txt").write_text(
        f"{head}\n{said}\n{table}\n{by_hook}\n", encoding="utf-8"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
