"""Memory checks: out-of-memory risk while training, and a useful report when training dies of it.

The memory probe (``lora_doctor.probes.memory``) reads the CUDA allocator at each logging interval
and adds its figures to the logs under the ``lora_doctor/mem_*`` keys below; these checks read them
back from the history, so that they need no device and work the same on scripted readings.
"""

from __future__ import annotations

import bisect
import math
import re
from collections.abc import Iterable
from typing import Any

import numpy as np

from lora_doctor.checks.base import Check, Context, Phase, Points, Reads, finite
from lora_doctor.facts import AdapterFacts, MemoryFacts
from lora_doctor.findings import Finding, Recommendation, Severity
from lora_doctor.memory_estimate import GIB, estimate_memory
from lora_doctor.stats import theil_sen

__all__ = [
    "CHECKS",
    "KEY_ALLOC",
    "KEY_ALLOC_RETRIES",
    "KEY_CAPACITY",
    "KEY_FREE",
    "KEY_HEADROOM",
    "KEY_OOMS",
    "KEY_PEAK_ALLOC",
    "KEY_PEAK_RESERVED",
    "OomRisk",
    "OutOfMemory",
    "memory_figures",
]

#: The growth rule's cheap gate: a least-squares projection below this share of the memory
#: available at max_steps cannot be confirmed by the robust fit, so the fit is skipped.
_GROWTH_GATE = 0.8

#: Peak memory allocated by PyTorch, in GiB: the allocator's peak, which the doctor never resets
#: (``torch.cuda.max_memory_allocated()``). Logs saved by lora-doctor 0.1 hold the peak since the
#: previous reading instead (it reset the peak at each reading).
KEY_PEAK_ALLOC = "lora_doctor/mem_peak_alloc_gib"
#: Memory allocated by PyTorch at the reading, after the optimizer step: what the run holds
#: between steps (weights, optimizer states, and whatever is kept across steps), in GiB.
KEY_ALLOC = "lora_doctor/mem_alloc_gib"
#: Peak memory reserved by PyTorch's caching allocator (never reset by the doctor), in GiB.
KEY_PEAK_RESERVED = "lora_doctor/mem_peak_reserved_gib"
#: The device's total memory, in GiB.
KEY_CAPACITY = "lora_doctor/mem_capacity_gib"
#: Device memory free at the reading (cudaMemGetInfo), in GiB.
KEY_FREE = "lora_doctor/mem_free_gib"
#: Capacity minus the peak allocated minus what is held outside PyTorch, in GiB.
KEY_HEADROOM = "lora_doctor/mem_headroom_gib"
#: Allocations the caching allocator retried after freeing its cache (cumulative count).
KEY_ALLOC_RETRIES = "lora_doctor/mem_alloc_retries"
#: Out-of-memory errors the allocator raised (cumulative count).
KEY_OOMS = "lora_doctor/mem_ooms"


def _gib(x: float) -> str:
    return f"{x:.2f}"


def _adapter(ctx: Context) -> AdapterFacts | None:
    return next(iter(ctx.facts.adapters.values()), None)


def _fixes(ctx: Context, where: str = "training") -> tuple[tuple[str, ...], dict[str, Any]]:
    """The memory fixes in the order to try them, with the exact arguments, and the first one's
    config changes: a smaller batch to re-test first, r down, fewer target modules, then gradient
    checkpointing or a paged optimizer."""
    mem = ctx.facts.memory or MemoryFacts()
    changes: dict[str, Any] = {}
    bs, ga = mem.per_device_train_batch_size, mem.gradient_accumulation_steps or 1
    if where == "evaluation":
        first = (
            "Re-test with a smaller evaluation batch first: halve per_device_eval_batch_size "
            "(evaluation keeps the logits of the whole batch)"
        )
    elif bs is not None and bs > 1:
        changes = {"per_device_train_batch_size": bs // 2, "gradient_accumulation_steps": ga * 2}
        first = (
            f"Re-test with a smaller batch first: per_device_train_batch_size={bs // 2} with "
            f"gradient_accumulation_steps={ga * 2} keeps the effective batch of {bs * ga}"
        )
    elif bs == 1:
        first = (
            "The batch is already 1 per device: re-test with shorter sequences first "
            "(a lower max_length when tokenizing)"
        )
    else:
        first = (
            "Re-test with a smaller batch first: halve per_device_train_batch_size and double "
            "gradient_accumulation_steps (same effective batch)"
        )
    last = (
        "Then gradient_checkpointing=True in TrainingArguments (activations recomputed in the "
        'backward pass, about 20% slower) or a paged optimizer: optim="paged_adamw_8bit" '
        "(bitsandbytes; optimizer states move to CPU memory when the GPU runs short)"
    )
    if ctx.facts.has_lora is False:
        full = (
            "A full fine-tune keeps a gradient and two optimizer states for every weight: an "
            'optimizer with 8-bit states (optim="adamw_bnb_8bit") shrinks them fourfold, and a '
            "LoRA adapter (peft.get_peft_model) leaves all but a fraction of them out"
        )
        return (first, full, last), changes
    modules = _targets_fix(ctx)
    return (first, _rank_fix(ctx, mem), *([modules] if modules else []), last), changes


def _then(ctx: Context, lora: str, full: str) -> str:
    """The next memory fixes in a summary: LoRA's (rank, targets), or a full fine-tune's."""
    return full if ctx.facts.has_lora is False else lora


def _rank_fix(ctx: Context, mem: MemoryFacts) -> str:
    """The memory fix's lower rank, with lora_alpha scaled alike."""
    adapter = _adapter(ctx)
    r = adapter.r if adapter is not None and adapter.r else mem.r
    if not (r and r > 1):
        return "Lower the rank (r 8 -> 4, with lora_alpha halved too)"
    rank = f"Lower the rank: r={r // 2} (from {r})"
    if adapter is not None and adapter.lora_alpha:
        alpha = adapter.lora_alpha * (r // 2) / r
        rank += f" with lora_alpha={alpha:g} (same lora_alpha/r)"
    return rank + "; a new rank changes the adapter's shapes, so start from step 0"


def _targets_fix(ctx: Context) -> str | None:
    """The memory fix's fewer target modules, in the model's own names: drop k_proj where the
    adapter targets it (DESIGN.md section 3); a model without it (GPT-2's fused c_attn) gets the
    list of what it targets instead; None when it targets a single module kind."""
    adapter = _adapter(ctx)
    targets = adapter.target_modules if adapter is not None else None
    if isinstance(targets, list) and "k_proj" in targets and len(targets) > 1:
        kept = [t for t in targets if t != "k_proj"]
        return f"Target fewer modules: drop k_proj (target_modules={kept})"
    targeted = (
        targets
        if isinstance(targets, list)
        else list(dict.fromkeys(lf.name.rsplit(".", 1)[-1] for lf in ctx.facts.layers))
        or (list(ctx.facts.setup.module_kinds) if targets == "all-linear" else [])
    )
    if "k_proj" in targeted and len(targeted) > 1:
        return "Target fewer modules: drop k_proj from target_modules"
    if len(targeted) > 1:
        return (
            f"Target fewer modules (now {', '.join(targeted)}): each one left out saves its LoRA "
            "matrices, their gradients and optimizer states"
        )
    if not targeted:
        return "Target fewer modules: list fewer in target_modules"
    return None  # a single target module: nothing to leave out


def _estimate_note(mem: MemoryFacts | None) -> str:
    est = estimate_memory(mem) if mem is not None else None
    return f" Where the memory goes: {est.describe()}." if est is not None else ""


def memory_figures(
    peak_gib: float, capacity_gib: float, headroom_gib: float, threshold: float
) -> dict[str, float]:
    """The figures of one memory reading: the peak PyTorch allocated, what is held outside PyTorch
    (CUDA context, other processes) and the share of the capacity both take.

    Example:
        >>> memory_figures(70.0, 80.0, 4.0, 0.9)["share"]
        0.95
    """
    used = capacity_gib - headroom_gib
    return {
        "peak_alloc_gib": peak_gib,
        "outside_gib": max(0.0, used - peak_gib),
        "capacity_gib": capacity_gib,
        "share": used / capacity_gib,
        "threshold": threshold,
    }


def _by_step(points: Points) -> dict[float, float]:
    """The finite values of ``points``, by step."""
    return {s: v for s, v in zip(points.steps, points.values, strict=True) if math.isfinite(v)}


class OomRisk(Check):
    """Peak memory close to the device's capacity, allocator retries rising, or memory held
    between steps that grows so that the peak would reach the capacity before ``max_steps``.

    Practice: LoRA adds full-precision trainable matrices, their gradients and optimizer states on
    top of a (often quantized) base, and the activations of the longest batch or an evaluation come
    on top of the peak seen so far; PyTorch's caching allocator retries an allocation after freeing
    its cache (``num_alloc_retries``) only when cudaMalloc fails, the last step before
    ``torch.OutOfMemoryError`` (PyTorch docs, "CUDA memory management"). Fixes follow the usual
    order (Hugging Face "GPU memory" guide; QLoRA, Dettmers et al. 2023, for paged optimizers):
    smaller batch with more accumulation, lower r, fewer target modules, gradient checkpointing.
    Every reading is judged (peak share and retries at each one; the growth at the latest).
    """

    code, slug, severity = "LD301", "oom-risk", Severity.WARNING
    phases = frozenset({Phase.SETUP, Phase.LOG})
    reads = (
        Reads(KEY_PEAK_ALLOC, before="oom_growth_window"),
        Reads(KEY_CAPACITY),
        Reads(KEY_HEADROOM),
        Reads(KEY_ALLOC_RETRIES, before="oom_retry_window"),
        Reads(KEY_ALLOC, before="oom_growth_window"),
    )

    def run(self, ctx: Context) -> Iterable[Finding]:
        if ctx.phase is Phase.SETUP:
            yield from self._static(ctx)
            return
        peak = ctx.points(KEY_PEAK_ALLOC)
        if not len(peak):  # no readings (no GPU, or offline): cheap exit
            return
        capacity, headroom = _by_step(ctx.points(KEY_CAPACITY)), _by_step(ctx.points(KEY_HEADROOM))
        figures = None
        for step, value in zip(peak.new_steps, peak.new_values, strict=True):
            cap, head = capacity.get(step), headroom.get(step)
            if not math.isfinite(value) or cap is None or head is None or cap <= 0:
                continue
            figures = memory_figures(value, cap, head, ctx.config.oom_peak_share)
            found = self._peak(ctx, figures, int(step)) or self._retries(ctx, figures, step)
            if found is not None:
                yield found
                return
        if figures is not None:
            found = self._growth(ctx, figures, peak)
            if found is not None:
                yield found

    def _recommendation(self, ctx: Context, summary: str, lead: tuple[str, ...] = ()) -> Any:
        steps, changes = _fixes(ctx)
        return Recommendation(summary=summary, steps=lead + steps, config_changes=changes)

    def _static(self, ctx: Context) -> Iterable[Finding]:
        mem = ctx.facts.memory
        est = estimate_memory(mem) if mem is not None else None
        if mem is None or est is None or not mem.capacity:
            return
        share = est.total / mem.capacity
        if share < ctx.config.oom_peak_share:
            return
        yield self.finding(
            ctx,
            f"Before training, weights and optimizer states already take {share:.0%} of the "
            "device's memory",
            f"Estimate {est.describe()}, against a capacity of {_gib(mem.capacity / GIB)} GiB "
            f"(threshold {ctx.config.oom_peak_share:.0%}), before any activation: the first batch "
            "is likely to run out of memory.",
            evidence={"rule": "static", "share": share, "estimate": est.to_dict()},
            recommendation=self._recommendation(
                ctx,
                "Make room before the first batch: a 4-bit or 8-bit base, "
                + _then(ctx, "lower r, fewer targets", "8-bit optimizer states or LoRA"),
            ),
        )

    def _peak(self, ctx: Context, fig: dict[str, float], step: int) -> Finding | None:
        if fig["share"] < ctx.config.oom_peak_share:
            return None
        return self.finding(
            ctx,
            f"Peak memory reached {fig['share']:.0%} of the device's capacity",
            f"Peak memory so far: {_gib(fig['peak_alloc_gib'])} GiB allocated "
            f"by PyTorch plus {_gib(fig['outside_gib'])} GiB held outside it (CUDA context, other "
            f"processes), {fig['share']:.1%} of {_gib(fig['capacity_gib'])} GiB, above the "
            f"{fig['threshold']:.0%} threshold (DoctorConfig.oom_peak_share). A longer batch or "
            "an evaluation adds to this peak and can kill the run with CUDA out-of-memory."
            + _estimate_note(ctx.facts.memory),
            evidence={"rule": "peak", **fig},
            recommendation=self._recommendation(
                ctx,
                "Lower the peak: smaller batch with more accumulation, then "
                + _then(ctx, "r, targets", "8-bit optimizer states"),
            ),
            step=step,
        )

    def _retries(self, ctx: Context, fig: dict[str, float], step: float) -> Finding | None:
        points = ctx.points(KEY_ALLOC_RETRIES)
        upto = bisect.bisect_right(points.steps, step)  # the readings up to this one
        _, values = finite(points.steps[:upto], points.values[:upto])
        window = ctx.config.oom_retry_window
        recent = values[-(window + 1) :]
        rises = np.diff(recent)
        rose = int(np.count_nonzero(rises > 0))
        if rose < ctx.config.oom_retry_intervals:
            return None
        first, last = float(recent[0]), float(recent[-1])
        return self.finding(
            ctx,
            f"The CUDA allocator keeps retrying allocations ({rose} of the last {len(rises)} "
            "logging intervals)",
            f"num_alloc_retries rose from {first:.0f} to {last:.0f} over the last {len(rises)} "
            f"logging intervals (threshold: {ctx.config.oom_retry_intervals} intervals, "
            "DoctorConfig.oom_retry_intervals). The allocator retries only after cudaMalloc "
            "failed and it had to free its cache: each retry slows the step, and a failed retry "
            f"is an out-of-memory error. Peak memory is at {fig['share']:.0%} of capacity.",
            evidence={
                "rule": "retries",
                "alloc_retries": recent.tolist(),
                **fig,
            },
            recommendation=self._recommendation(
                ctx,
                "Make room before the allocator gives up: smaller batch, then "
                + _then(ctx, "r, targets", "8-bit optimizer states"),
            ),
            step=int(step),
        )

    def _growth(self, ctx: Context, fig: dict[str, float], peaks: Points) -> Finding | None:
        """Memory held between steps grows steadily, and at that rate the peak reaches the memory
        available before ``max_steps``.

        The signal is the memory allocated at each reading, taken after the optimizer step: a
        leak (a loss or model outputs kept across steps) makes it grow with the step count, while
        activations come and go within a step. The allocator's peak, which the doctor never
        resets, only steps up (a longer batch, an evaluation) and cannot show a trend; the peak
        is projected forward by the held memory's slope. Logs saved before the held memory was
        recorded carry the peak since each previous reading, which serves as the signal then.
        """
        max_steps = ctx.facts.max_steps
        if max_steps <= 0:
            return None
        held_key = KEY_ALLOC if ctx.history.count(KEY_ALLOC) else KEY_PEAK_ALLOC
        held = ctx.points(KEY_ALLOC) if held_key == KEY_ALLOC else peaks
        # The first reading of the run holds the warm-up; the fit looks at the most recent
        # readings only, which bounds its cost (Theil-Sen is quadratic) on long runs and follows
        # today's trend.
        skip = 1 if held.offset == 0 else 0
        steps, values = finite(held.steps[skip:], held.values[skip:])
        window = ctx.config.oom_growth_window
        steps, values = steps[-window:], values[-window:]
        if len(values) < ctx.config.oom_growth_min_readings or np.ptp(steps) <= 0:
            return None
        limit = fig["capacity_gib"] - fig["outside_gib"]
        peak, now = fig["peak_alloc_gib"], float(steps[-1])
        if now >= max_steps:
            return None
        # A least-squares line costs microseconds; the Theil-Sen fit costs milliseconds at every
        # log. Only a trend that heads for capacity by least squares (with slack for outliers)
        # gets the robust fit that decides.
        x = steps - steps.mean()
        ols_slope = float((x * (values - values.mean())).sum() / (x * x).sum())
        if ols_slope <= 0 or peak + ols_slope * (max_steps - now) < _GROWTH_GATE * limit:
            return None
        fit = theil_sen(values, steps, ctx.config.oom_growth_confidence)
        slope, low, high = fit.slope, fit.low_slope, fit.high_slope
        half = len(values) // 2
        recent = theil_sen(values[half:], steps[half:]).slope if np.ptp(steps[half:]) else 0
        if not low > 0 or not recent > 0:  # a one-off jump (a longer batch) is not growth
            return None
        at_end = peak + slope * (max_steps - now)
        if at_end < limit:
            return None
        full_at = int(now + max(0.0, np.ceil((limit - peak) / slope)))
        what = (
            "Memory held between steps (allocated after each optimizer step)"
            if held_key == KEY_ALLOC
            else "The peak since each previous reading"
        )
        return self.finding(
            ctx,
            f"Memory held between steps grows by {slope * 100:.2f} GiB per 100 steps; the peak "
            f"would reach the device's capacity near step {full_at}",
            f"{what} grows steadily: {slope * 100:.3f} GiB per 100 steps (Theil-Sen over "
            f"{len(values)} readings, {ctx.config.oom_growth_confidence:.0%} interval "
            f"{low * 100:.3f} to {high * 100:.3f}), from {_gib(values[0])} GiB at step "
            f"{steps[0]:.0f} to {_gib(values[-1])} GiB at step {steps[-1]:.0f}. With the peak at "
            f"{_gib(peak)} GiB now, at that rate the peak reaches the {_gib(limit)} GiB available "
            f"near step {full_at}, before max_steps={max_steps}. Memory that grows with the step "
            "count is usually held across steps: a loss or model outputs kept in a list without "
            ".item() or .detach().",
            evidence={
                "rule": "growth",
                "signal": held_key,
                "slope_gib_per_step": slope,
                "slope_interval": [low, high],
                "projected_gib_at_max_steps": at_end,
                "full_at_step": full_at,
                "max_steps": max_steps,
                **fig,
            },
            recommendation=self._recommendation(
                ctx,
                "Find what is kept across steps; then lower the peak",
                lead=(
                    "Keep losses and metrics as Python floats (loss.item()) and do not keep model "
                    "outputs between steps",
                ),
            ),
        )


_TRIED = re.compile(r"Tried to allocate ([\d.]+ ?[KMGT]i?B)")


class OutOfMemory(Check):
    """Training died of CUDA out-of-memory: the figures at the time, the step, and the fixes in
    order.

    The callback (or :func:`lora_doctor.watch`) records the error and a last allocator reading in
    ``RunFacts.memory.oom`` and re-raises the error unchanged; this check turns it into the report.
    Fix order from practice (Hugging Face "GPU memory" guide; QLoRA for paged optimizers): a
    smaller batch re-tests fastest, then a lower r and fewer target modules shrink LoRA's
    trainable matrices, their gradients and optimizer states, then gradient checkpointing trades
    compute for activations.
    """

    code, slug, severity = "LD302", "out-of-memory", Severity.ERROR
    phases = frozenset({Phase.END})

    def run(self, ctx: Context) -> Iterable[Finding]:
        mem = ctx.facts.memory
        oom = mem.oom if mem is not None else None
        if not oom:
            return
        step = oom.get("step")
        where = str(oom.get("where") or "training")
        error = str(oom.get("error") or "")
        reading = oom.get("reading") or {}
        tried = _TRIED.search(error)
        figures = ""
        if reading:
            cap = reading.get("capacity_gib")
            figures = (
                f" At the time: {_gib(reading.get('allocated_gib', 0.0))} GiB allocated by PyTorch, "
                f"{_gib(reading.get('reserved_gib', 0.0))} GiB reserved, "
                f"{_gib(reading.get('free_gib', 0.0))} GiB free"
                + (f" of {_gib(cap)} GiB" if cap else "")
                + f"; peak allocated {_gib(reading.get('peak_alloc_gib', 0.0))} GiB so far."
            )
        steps, changes = _fixes(ctx, where)
        at = f" at step {step}" if step is not None else ""
        yield self.finding(
            ctx,
            f"Training died of CUDA out-of-memory{at} ({where})",
            f"{oom.get('exception', 'OutOfMemoryError')}{at} during {where}: "
            f"{error[:300]!r}.{figures} LoRA adds full-precision trainable matrices, their "
            "gradients and optimizer states on top of the base model; the activations of a batch "
            "usually take most of the rest." + _estimate_note(mem),
            evidence={
                "step": step,
                "where": where,
                "error": error[:1000],
                "tried_to_allocate": tried.group(1) if tried else None,
                "reading": reading,
                "per_device_train_batch_size": mem.per_device_train_batch_size if mem else None,
                "gradient_accumulation_steps": mem.gradient_accumulation_steps if mem else None,
            },
            recommendation=Recommendation(
                summary="Re-test with a smaller batch first; then "
                + _then(ctx, "lower r, target fewer modules", "8-bit optimizer states")
                + ", or turn on gradient checkpointing",
                steps=steps,
                config_changes=changes,
            ),
            step=step,
        )


CHECKS: tuple[type[Check], ...] = (OomRisk, OutOfMemory)
