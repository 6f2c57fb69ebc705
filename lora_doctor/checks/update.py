"""Learning rate and update size: a configured learning rate far above LoRA's range, and a learned
update that outweighs the frozen weight it should adjust.

- ``learning-rate-too-high`` (set-up) judges the configured peak learning rate against the range
  LoRA runs use with the run's optimizer (:mod:`lora_doctor.practice`); offline, where the
  optimizer is not known, AdamW (the Trainer's default) is assumed and said.
- ``update-too-large`` reads the spectrum probe's ``relative_update = ||scaling * B @ A||_F /
  ||W||_F`` per layer: an update as large as the weight itself no longer adjusts the base model,
  it replaces it.

The diagnosis pass uses both as evidence: the learning-rate rule decides when a learning rate is a
supported cause of a plateau, divergence, spike or NaN (:func:`lr_verdict`), and an update that
is too large supports a learning rate or lora_alpha that is too high.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from lora_doctor.checks.base import Check, Context, Phase, Read, Reads
from lora_doctor.config import DoctorConfig
from lora_doctor.facts import LayerSpectrum, RunFacts
from lora_doctor.findings import Finding, Recommendation, Severity
from lora_doctor.practice import LrRange, lr_range

__all__ = [
    "CHECKS",
    "LearningRateTooHigh",
    "LrVerdict",
    "UpdateTooLarge",
    "UpdateVerdict",
    "lr_range_applies",
    "lr_verdict",
    "rate_fix",
    "update_verdict",
]


def _fmt(x: float) -> str:
    return f"{x:.3g}"


# --- the learning rate --------------------------------------------------------------------------
@dataclass(frozen=True)
class LrVerdict:
    """A learning rate above LoRA's usual range for its optimizer.

    Attributes:
        lr: the learning rate judged.
        range: the usual range for the run's optimizer (AdamW's, marked assumed, when unknown).
        factor: ``lr / range.high``: how many times the top of the range it is (> 1).
        severity: INFO above the top, WARNING from ``lr_high_warning`` times the top, ERROR from
            ``lr_high_error`` times.
    """

    lr: float
    range: LrRange
    factor: float
    severity: Severity

    @property
    def far(self) -> bool:
        """Far above the range (a warning or an error): a cause the facts support."""
        return self.severity is not Severity.INFO

    def describe(self) -> str:
        """The rate against the range in words, e.g. ``"learning_rate=0.05 is 50x the top of
        LoRA's usual range (...) and 250x its usual 0.0002"``."""
        rng = self.range
        whose = "full fine-tuning's" if rng.full else "LoRA's"
        return (
            f"learning_rate={_fmt(self.lr)} is {_fmt(self.factor)}x the top of {whose} usual range "
            f"({rng.describe()}) and {_fmt(self.lr / rng.typical)}x its usual {rng.typical:g}"
        )


def lr_verdict(
    lr: float | None,
    optimizer: str | None,
    cfg: DoctorConfig,
    *,
    full: bool = False,
    hidden_size: int | None = None,
) -> LrVerdict | None:
    """The verdict on a learning rate for an optimizer; None when it is unknown, not positive, or
    not above the top of LoRA's usual range (a full fine-tune's with ``full``) for a model of
    ``hidden_size`` (:func:`lora_doctor.practice.lr_range`; a 7B model's range when unknown).

    Example:
        >>> lr_verdict(0.05, None, DoctorConfig()).severity.value
        'warning'
        >>> lr_verdict(2e-4, "adamw_torch", DoctorConfig()) is None
        True
    """
    if lr is None or not math.isfinite(lr) or lr <= 0:
        return None
    rng = lr_range(optimizer, full=full, hidden_size=hidden_size)
    factor = lr / rng.high
    if factor <= 1:
        return None
    if factor >= cfg.lr_high_error:
        severity = Severity.ERROR
    elif factor >= cfg.lr_high_warning:
        severity = Severity.WARNING
    else:
        severity = Severity.INFO
    return LrVerdict(lr, rng, factor, severity)


def rate_fix(
    target: float,
    lr: float | None,
    rng: LrRange,
    source: str = "the usual rate",
    method: str = "LoRA",
    learner: str = "adapter",
) -> Recommendation:
    """The fix of a learning rate far too high, worded once for ``learning-rate-too-high`` and
    every symptom it causes (``apply`` then lists each step once): set ``target``, from
    ``source``, inside ``rng``, and restart from the base model."""
    half = f" (not just half of {_fmt(lr)})" if lr is not None else ""
    return Recommendation(
        summary=f"Set learning_rate={target:g}, inside {method}'s usual range{half}",
        steps=(
            f"Set learning_rate={target:g} in TrainingArguments: {source} ({method}'s usual "
            f"range: {rng.describe()})",
            f"Restart from the base model: steps at that rate damaged the {learner}",
        ),
        config_changes={"learning_rate": target},
        restart_from_scratch=True,
    )


def lr_range_applies(facts: RunFacts) -> bool:
    """Whether LoRA's learning-rate range applies to the run: it is known to train LoRA adapters
    (a live model was read, or an adapter config with a rank) or the whole model, whose rates sit
    lower still. Not offline without a LoRA config: the run may tune prompts (P-tuning, prefix
    tuning), whose usual rates are 1e-2 and above.

    Example:
        >>> lr_range_applies(RunFacts()), lr_range_applies(RunFacts(has_lora=False))
        (False, True)
    """
    return facts.has_lora is not None or any(a.r for a in facts.adapters.values())


class LearningRateTooHigh(Check):
    """The configured (peak) learning rate is above the range LoRA runs use with its optimizer.

    LoRA with AdamW trains at about 1e-4 to 5e-4 (QLoRA: 2e-4; LoRA wants about 10x the full
    fine-tuning rate) and runs far above 1e-3 diverge, spike, turn NaN or stall high (DESIGN.md
    section 3; Biderman et al. 2024, "LoRA Learns Less and Forgets Less"); Lion, Adafactor and SGD
    have their own ranges (:mod:`lora_doctor.practice`), scaled for the model's hidden size
    (about 1 / sqrt(width), from the published LoRA and QLoRA rates of 768- to 8192-wide models; a
    7B model's range when the width is unknown, offline). An Adam or Lion step moves each weight
    by about the learning rate itself, whatever the gradient's size, so a rate of 0.05 moves every
    LoRA weight by 0.05 per step. Information above the top of the range, a warning from
    ``lr_high_warning`` (10) times the top, an error from ``lr_high_error`` (100) times. Measured
    on the fault benchmark's two-layer Llama and GPT-2 (hidden size 64, judged by a 768-wide
    model's range, top 2.3e-3; 100 steps, linear decay): they train best at 2e-3 to 2e-2, 0.05
    trains the Llama but leaves GPT-2 at a loss of 2.2 against 0.9, and from 0.1 both stall near
    3.3; a 7B model breaks at far lower rates. Offline without a LoRA config the run may tune
    prompts, whose rates are higher: information then, with no change.
    """

    code, slug, severity = "LD114", "learning-rate-too-high", Severity.WARNING
    phases = frozenset({Phase.SETUP})
    needs_lora = True

    def run(self, ctx: Context) -> Iterable[Finding]:
        setup = ctx.facts.setup
        v = lr_verdict(
            ctx.facts.learning_rate, setup.optimizer, ctx.config, hidden_size=setup.hidden_size
        )
        if v is None:
            return
        rng = v.range
        adam_like = rng.family in ("adam", "lion")
        step = (
            f" Each {'Lion' if rng.family == 'lion' else 'Adam'} step moves every LoRA weight by "
            f"about the learning rate itself ({_fmt(v.lr)}), whatever the gradient's size."
            if adam_like
            else ""
        )
        severity = v.severity
        if not lr_range_applies(ctx.facts):
            severity = Severity.INFO
            why = (
                " No LoRA adapter config was found, so this may be prompt tuning (P-tuning, prefix "
                "tuning), which trains at such rates; if the run trains LoRA adapters, set "
                f"learning_rate={rng.typical:g}."
            )
            recommendation = None
        elif v.far:
            why = (
                f"{step} Runs this far above the range diverge, spike, turn NaN or stall high, and "
                "halving the rate is not enough."
            )
            recommendation = rate_fix(rng.typical, v.lr, rng)
        else:
            why = (
                " Small models tolerate such rates; on a large model watch for spikes, a "
                f"diverging loss or NaN, and lower learning_rate toward {rng.typical:g} if they "
                "come."
            )
            recommendation = None
        if setup.hidden_size is None:
            why += (
                " The model's width is not known here (offline without adapter_model.safetensors, "
                "or a model without a config), so "
                "the range is a 7B model's (hidden size 4096); narrower models train at up to "
                "2.3x these rates."
            )
        yield self.finding(
            ctx,
            f"learning_rate={_fmt(v.lr)} is {_fmt(v.factor)}x the top of LoRA's usual range",
            f"{v.describe()}.{why}",
            evidence={
                "learning_rate": v.lr,
                "optimizer": setup.optimizer,
                "hidden_size": setup.hidden_size,
                "optimizer_family": rng.family,
                "optimizer_assumed": rng.assumed,
                "usual_low": rng.low,
                "usual_high": rng.high,
                "usual": rng.typical,
                "times_usual_high": v.factor,
                "warning_factor": ctx.config.lr_high_warning,
                "error_factor": ctx.config.lr_high_error,
            },
            recommendation=recommendation,
            severity=severity,
        )


# --- the size of the learned update -------------------------------------------------------------
@dataclass(frozen=True)
class UpdateVerdict:
    """The learned updates against their frozen weights at one spectrum reading.

    Attributes:
        median: median over the judged layers of ``||scaling * B @ A||_F / ||W||_F``.
        layers: the number of layers judged.
        largest: the layers at or above the threshold, largest first, as (name, relative update).
    """

    median: float
    layers: int
    largest: tuple[tuple[str, float], ...]


def update_verdict(layers: Sequence[LayerSpectrum], threshold: float) -> UpdateVerdict | None:
    """The verdict when the median relative update of ``layers`` reaches ``threshold``; None
    otherwise. Layers whose B did not start at zero (PiSSA, OLoRA, LoftQ ...) are left out: their
    product holds the initialisation, not only what was learned; so are layers whose update or
    base weight could not be read (non-finite or missing).

    Example:
        >>> lay = [LayerSpectrum(f"l{i}.q_proj", "q_proj", relative_update=v) for i, v in enumerate([3.0, 5.0, 0.1])]
        >>> update_verdict(lay, 2.0).largest
        (('l1.q_proj', 5.0), ('l0.q_proj', 3.0))
    """
    values = [
        (lay.name, float(lay.relative_update))
        for lay in layers
        if not lay.init_nonzero
        and lay.relative_update is not None
        and math.isfinite(lay.relative_update)
    ]
    if not values:
        return None
    median = statistics.median(v for _, v in values)
    if median < threshold:
        return None
    over = sorted((item for item in values if item[1] >= threshold), key=lambda x: -x[1])
    return UpdateVerdict(median, len(values), tuple(over))


class UpdateTooLarge(Check):
    """The learned update ``scaling * B @ A`` outweighs the frozen weight it should adjust.

    LoRA learns a small correction to a pretrained weight (Hu et al. 2021): the update's Frobenius
    norm stays well below the weight's. The spectrum probe measures both at each reading; when the
    median over the layers of ``||scaling * B @ A||_F / ||W||_F`` reaches ``update_too_large``, the
    adapter no longer adjusts the base model, it overwrites it, and what the model knew is lost
    even while the training loss looks fine. Measured on the fault benchmark's two-layer Llama
    and GPT-2 (100 steps, linear decay): 0.16 to 0.35 at learning rates 1e-3 to 2e-3, 0.65 to 1.4
    at 1e-2 to 2e-2 (still training well), 6 to 10 at 0.05, 27 to 47 at 0.1 (stalled) and about
    550 at 0.5; the default threshold, 2, lies between the rates that train well and those that
    degrade. Too high a learning rate or lora_alpha are the causes the diagnosis pass ranks.
    Layers whose B does not start at zero are left out (their product holds the initialisation).
    """

    code, slug, severity = "LD405", "update-too-large", Severity.WARNING
    phases = frozenset({Phase.LOG, Phase.END})
    reads = (Reads("spectrum", Read.LATEST, fact=True),)
    needs_lora = True

    def run(self, ctx: Context) -> Iterable[Finding]:
        if not ctx.facts.spectrum:
            return
        snap = ctx.facts.spectrum[-1]
        threshold = ctx.config.update_too_large
        v = update_verdict(snap.layers, threshold)
        if v is None:
            return
        shown = ", ".join(f"{name} {_fmt(value)}" for name, value in v.largest[:3])
        more = f" and {len(v.largest) - 3} more" if len(v.largest) > 3 else ""
        kinds = {
            kind: s["relative_update"]
            for kind, s in snap.kinds.items()
            if isinstance(s.get("relative_update"), int | float)
        }
        yield self.finding(
            ctx,
            f"The LoRA update is {_fmt(v.median)}x the size of the frozen weights (median of "
            f"{v.layers} layers)",
            f"At step {snap.step} the learned update scaling * B @ A has a Frobenius norm "
            f"{_fmt(v.median)} times the frozen weight's (median over {v.layers} LoRA layers; "
            f"threshold {threshold:g}); {len(v.largest)} layers are at or above it ({shown}{more}). "
            "LoRA learns a small correction to the pretrained weight; an update this large "
            "overwrites it, and what the base model knew is lost even where the training loss "
            "looks fine. A learning rate or lora_alpha far too high makes it.",
            evidence={
                "step": snap.step,
                "median_relative_update": v.median,
                "threshold": threshold,
                "layers": v.layers,
                "layers_over": [{"name": n, "relative_update": x} for n, x in v.largest[:10]],
                "by_kind": kinds,
            },
            recommendation=Recommendation(
                summary="Stop: the adapter overwrites the base model",
                steps=("Stop training: further steps at this update size only add damage",),
                restart_from_scratch=True,
            ),
        )


CHECKS: tuple[type[Check], ...] = (LearningRateTooHigh, UpdateTooLarge)
