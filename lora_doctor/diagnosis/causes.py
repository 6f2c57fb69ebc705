"""The candidate causes of each symptom, judged against the run's facts, and the fixes built from
them.

A cause is an object (:class:`Cause`): the facts of the run that support it, those that rule it
out, its fix, and how to rule it out when no fact decides. :data:`CANDIDATES` lists, for each
symptom, its candidate causes in the order practice suggests checking them; :func:`diagnose`
judges them against the facts and ranks them: causes a fact supports (and none rules out) first,
then the open ones, then those ruled out. A finding names a "most likely cause" only when a fact
supports one; otherwise it lists the causes to rule out, in order (DESIGN.md section 1, the
diagnosis pass; section 3 for the practice each cause rests on).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from lora_doctor.checks.adapter import all_linear_fix, is_attention_module
from lora_doctor.checks.update import lr_range_applies, lr_verdict, rate_fix
from lora_doctor.config import DoctorConfig
from lora_doctor.facts import RunFacts
from lora_doctor.findings import Finding, Recommendation
from lora_doctor.history import History
from lora_doctor.memory_estimate import rank_memory_step
from lora_doctor.practice import LrRange, lr_range

__all__ = [
    "CANDIDATES",
    "Cause",
    "Diagnosed",
    "Findings",
    "Look",
    "diagnose",
    "rank_and_alpha",
    "rollback",
]

SUPPORTED, OPEN, RULED_OUT = "supported", "open", "ruled-out"


def _fmt(x: float) -> str:
    return f"{x:.3g}"


class Findings:
    """The findings the pass reasons over: those reported before and this look's, by slug.

    Example:
        >>> Findings([]).get("loss-plateau") is None
        True
    """

    def __init__(self, findings: Sequence[Finding]) -> None:
        self._latest: dict[str, Finding] = {}
        for f in findings:
            self._latest[f.slug] = f

    def get(self, slug: str) -> Finding | None:
        """The latest finding of ``slug``, if any."""
        return self._latest.get(slug)

    def any(self, slugs: Sequence[str]) -> bool:
        """True when a finding of one of ``slugs`` is there."""
        return any(s in self._latest for s in slugs)


@dataclass(frozen=True)
class Cause:
    """One candidate explanation of a symptom.

    Attributes:
        cause: a stable id (``"learning-rate-too-high"``).
        name: the cause in words.
        support: facts of the run that point to it, each with its numbers.
        against: facts of the run that rule it out.
        fix: what removes it.
        check: how to rule it out when no fact decides.
    """

    cause: str
    name: str
    support: tuple[str, ...] = ()
    against: tuple[str, ...] = ()
    fix: Recommendation | None = None
    check: str = ""

    @property
    def verdict(self) -> str:
        """``"supported"`` (a fact for it, none against), ``"ruled-out"`` or ``"open"``."""
        if self.against:
            return RULED_OUT
        return SUPPORTED if self.support else OPEN

    def to_dict(self) -> dict[str, object]:
        """The cause as the JSON's ``evidence.causes`` holds it."""
        return {
            "cause": self.cause,
            "name": self.name,
            "verdict": self.verdict,
            "support": list(self.support),
            "against": list(self.against),
        }


@dataclass(frozen=True)
class Look:
    """What a cause is judged from: the symptom, the findings, the facts, the config, the curves."""

    symptom: Finding
    found: Findings
    facts: RunFacts
    config: DoctorConfig
    history: History

    @property
    def lr(self) -> float | None:
        return self.facts.learning_rate

    @property
    def range(self) -> LrRange:
        """The usual learning rates for the run's optimizer and model width: LoRA's, or a full
        fine-tune's."""
        setup = self.facts.setup
        return lr_range(setup.optimizer, full=not self.lora, hidden_size=setup.hidden_size)

    @property
    def lora(self) -> bool:
        """False only when the model is known to have no LoRA layers."""
        return self.facts.has_lora is not False

    @property
    def method(self) -> str:
        """Whose practice the run is judged by: ``"LoRA"`` or ``"full fine-tuning"``."""
        return "LoRA" if self.lora else "full fine-tuning"

    @property
    def learner(self) -> str:
        """What the run trains: ``"adapter"``, or ``"model"`` in a full fine-tune."""
        return "adapter" if self.lora else "model"

    def first_step(self) -> int | None:
        """The step the symptom began at (its evidence's ``first_step``, else its own step)."""
        step = self.symptom.evidence.get("first_step", self.symptom.step)
        return int(step) if isinstance(step, int | float) and math.isfinite(step) else None

    def before_any_update(self) -> bool:
        """True when a non-finite value came before any weight update: at the first step, or
        while the logged learning rate was still 0 (warm-up from 0)."""
        step = self.first_step()
        if step is None:
            return False
        if step <= 1:
            return True
        steps, rates = self.history.points("learning_rate")
        before = [r for s, r in zip(steps, rates, strict=True) if s <= step]
        return bool(before) and all(r == 0 for r in before)


Candidate = Callable[[Look], Cause | None]


# --- learning rate ---------------------------------------------------------------------------------
def _lr_target(look: Look) -> tuple[float, str]:
    """The learning rate a fix sets, always inside LoRA's usual range for the optimizer, and where
    it comes from: half the rate logged at the run's best loss, capped at the top of the range,
    when the loss had fallen by ``lr_fix_min_fall`` of its first value there (the run showed it
    learns at that rate); else the usual value for the optimizer (QLoRA's 2e-4 with AdamW).
    Losses of exactly 0.0 (NaN hidden by the Trainer's filter) are not a best. Measured on the
    fault benchmark's ``lr-too-high`` runs (warm-up to 0.3): the fix sets 1e-3, whose runs end at
    a loss of 1.2 to 2.1 against 2.3 to 3.4 for the faulty ones (2e-4: 3.6 to 3.8)."""
    rng = look.range
    steps, losses = look.history.points("loss")
    finite = [(v, s) for s, v in zip(steps, losses, strict=True) if math.isfinite(v) and v > 0]
    if len(finite) >= 2:
        best, best_step = min(finite)
        fell = best <= finite[0][0] * (1 - look.config.lr_fix_min_fall)
        lr_steps, rates = look.history.points("learning_rate")
        at = [r for s, r in zip(lr_steps, rates, strict=True) if s <= best_step]
        if fell and at and math.isfinite(at[-1]):
            # rounded to one digit, then capped: a rounded value may pass a top such as 1.6e-3
            target = min(float(f"{at[-1] / 2:.1g}"), rng.high)
            if rng.low <= target <= rng.high:
                capped = ", capped at the top of the range" if at[-1] / 2 > rng.high else ""
                return target, (
                    f"half the {_fmt(at[-1])} at which this run reached its best loss, at step "
                    f"{int(best_step)}{capped}"
                )
    return rng.typical, "the usual rate"


def lr_too_high(look: Look) -> Cause:
    """A learning rate far above what LoRA uses with this optimizer (:mod:`lora_doctor.practice`,
    :func:`~lora_doctor.checks.update.lr_verdict`): supported from ``lr_high_warning`` times the
    top of the range, or above the top beside an update that outweighs the frozen weights; open
    when LoRA's range may not apply (offline without a LoRA config: prompt tuning trains at 1e-2)."""
    lr, rng = look.lr, look.range
    setup = look.facts.setup
    verdict = lr_verdict(
        lr, setup.optimizer, look.config, full=not look.lora, hidden_size=setup.hidden_size
    )
    big = look.found.get("update-too-large")
    support: list[str] = []
    against: list[str] = []
    applies = lr_range_applies(look.facts)
    if verdict is not None and applies and (verdict.far or big is not None):
        support.append(verdict.describe())
        if big is not None and big is not look.symptom:
            support.append(big.title)
    elif lr is not None and 0 < lr <= rng.high:
        against.append(
            f"learning_rate={_fmt(lr)} is within {look.method}'s usual range ({rng.describe()})"
        )
    spike = look.found.get("grad-norm-spike")
    if spike is not None and spike is not look.symptom and support:
        support.append(spike.title)
    if look.symptom.slug == "non-finite-values" and look.before_any_update():
        against.append("the first non-finite value came before any weight update")
    target, source = _lr_target(look)
    return Cause(
        "learning-rate-too-high",
        f"learning rate far above {look.method}'s range",
        tuple(support),
        tuple(against),
        rate_fix(target, lr, rng, source, look.method, look.learner),
        "compare learning_rate with LoRA's usual range for your optimizer",
    )


def lr_too_low(look: Look) -> Cause:
    """A learning rate far below LoRA's (a full fine-tuning rate), or below a full fine-tune's
    usual range in a run without LoRA. Open, not supported, where it is not known whether the run
    trains LoRA (offline without its adapter config, :func:`lr_range_applies`): a rate below
    LoRA's is a full fine-tune's usual one."""
    lr, rng = look.lr, look.range
    low = look.config.plateau_low_lr if look.lora else rng.low
    usual = (
        f"LoRA's usual range is {rng.describe()}, about 10x full fine-tuning's"
        if look.lora
        else f"full fine-tuning usually runs at {rng.describe()}"
    )
    support: tuple[str, ...] = ()
    against: tuple[str, ...] = ()
    if lr is not None and 0 < lr < low:
        if not look.lora or lr_range_applies(look.facts):  # else a full fine-tune's rate: open
            support = (f"learning_rate={_fmt(lr)}, below {_fmt(low)}; {usual}",)
    elif lr is not None and lr > 0:
        against = (f"learning_rate={_fmt(lr)} is not below {_fmt(low)}",)
    target = rng.typical
    return Cause(
        "learning-rate-too-low",
        f"learning rate too low for {look.method}",
        support,
        against,
        Recommendation(
            summary=f"Raise learning_rate from {_fmt(lr or 0)} to {target:g}",
            steps=(
                f"Set learning_rate={target:g} in TrainingArguments ({usual})",
                "Restart from step 0 with it: resuming a checkpoint would restore the old rate "
                "with its optimizer and scheduler states"
                + ("; the rank can stay" if look.lora else ""),
            ),
            config_changes={"learning_rate": target},
        ),
        f"compare learning_rate with {look.method}'s usual range ({rng.describe()})"
        + ("" if lr_range_applies(look.facts) else "; a full fine-tune trains lower"),
    )


# --- alpha, targets, rank ---------------------------------------------------------------------------
def rank_and_alpha(facts: RunFacts) -> tuple[int | None, float | None, float | None]:
    """The adapter's r, lora_alpha and effective scaling, from the live layers or the config.

    Example:
        >>> from lora_doctor.facts import AdapterFacts
        >>> rank_and_alpha(RunFacts(adapters={"default": AdapterFacts(r=8, lora_alpha=16)}))
        (8, 16.0, 2.0)
    """
    for lf in facts.layers:
        if lf.r:
            return lf.r, lf.lora_alpha, lf.scaling or None
    for a in facts.adapters.values():
        if a.r and a.lora_alpha is not None:
            scale = a.lora_alpha / (math.sqrt(a.r) if a.use_rslora else a.r)
            return a.r, float(a.lora_alpha), scale
    return None, None, None


def _alpha_fix(facts: RunFacts) -> Recommendation:
    """Set lora_alpha for an effective scaling of 2 (2r; 2 sqrt(r) with rsLoRA) and restart."""
    r, alpha, scale = rank_and_alpha(facts)
    target: float | None = None
    if alpha and scale:
        target = alpha * 2 / scale
    elif r:
        target = 2 * r
    shown = f"{target:g}" if target is not None else ""
    return Recommendation(
        summary=f"Set lora_alpha={shown} (scaling 2) and restart"
        if shown
        else "Set lora_alpha = 2r",
        steps=(
            f"Set lora_alpha={shown} in LoraConfig (scaling 2)" if shown else "Set lora_alpha = 2r",
            "Restart from scratch (the scaling is part of the trained update)",
        ),
        config_changes={"lora_alpha": int(target) if target.is_integer() else round(target, 4)}
        if target is not None
        else {},
        restart_from_scratch=True,
    )


def alpha_too_small(look: Look) -> Cause | None:
    """An alpha that scales the update down (alpha/r below 1)."""
    if not look.lora:
        return None
    cfg = look.config
    r, alpha, scale = rank_and_alpha(look.facts)
    ratio = look.found.get("alpha-rank-ratio")
    if ratio is not None and isinstance(ratio.evidence.get("scaling"), int | float):
        scale = float(ratio.evidence["scaling"])
    if scale is None:
        return Cause("alpha-too-small", "alpha scales the update down", check="check lora_alpha/r")
    low = scale < cfg.scaling_low * (1 - cfg.scaling_tolerance)
    words = f"effective scaling {_fmt(scale)} (lora_alpha={_fmt(alpha or 0)}, r={r})"
    return Cause(
        "alpha-too-small",
        "alpha scales the update down",
        (f"{words}, below alpha = r",) if low else (),
        () if low else (f"{words} is not below alpha = r",),
        _alpha_fix(look.facts),
        "check lora_alpha/r",
    )


def alpha_too_large(look: Look) -> Cause | None:
    """An alpha that scales the update up (alpha/r above 2): a larger effective step."""
    if not look.lora:
        return None
    cfg = look.config
    r, alpha, scale = rank_and_alpha(look.facts)
    before = look.symptom.slug == "non-finite-values" and look.before_any_update()
    high = scale is not None and scale > cfg.scaling_high * (1 + cfg.scaling_tolerance)
    words = f"effective scaling {_fmt(scale or 0)} (lora_alpha={_fmt(alpha or 0)}, r={r})"
    support = [f"{words}, above alpha = 2r"] if high and not before else []
    big = look.found.get("update-too-large")
    if big is not None and big is not look.symptom and support:
        support.append(big.title)
    against = [f"{words} is not above alpha = 2r"] if scale is not None and not high else []
    if before:
        against.append("before any update B is zero: the scaling multiplies nothing yet")
    return Cause(
        "alpha-too-large",
        "alpha scales the update up",
        tuple(support),
        tuple(against),
        _alpha_fix(look.facts),
        "check lora_alpha/r",
    )


def attention_only(look: Look) -> Cause | None:
    """Adapters on the attention projections only: the MLP, most of the parameters, is not
    adapted."""
    if not look.lora:
        return None
    found = look.found.get("attention-only-targets")
    targeted = [lf.name for lf in look.facts.layers] or [
        t
        for a in look.facts.adapters.values()
        if isinstance(a.target_modules, list)
        for t in a.target_modules
    ]
    beyond = [t for t in targeted if not is_attention_module(t)]
    return Cause(
        "attention-only-targets",
        "adapters on attention only",
        (found.title,) if found is not None else (),
        (f"the adapters also cover {beyond[0].rsplit('.', 1)[-1]} and other non-attention layers",)
        if beyond and found is None
        else (),
        all_linear_fix(look.facts),
        "check that target_modules covers the MLP projections",
    )


#: The rank a rollback restarts at, at least: the usual default (DESIGN.md section 3: r = 8 or 16,
#: 16 in Unsloth's ``get_peft_model``). A rank that binds below it says the task needs at least the
#: default, and one doubling from r = 2 or 4 binds again (the fix loop measured it: r 2 -> 4 on a
#: planted rank-8 task still saturated in 2 of 3 runs).
ROLLBACK_MIN_RANK = 16


def rollback(
    r: int | None, alpha: float | None, facts: RunFacts, config: DoctorConfig
) -> Recommendation:
    """The rank rollback: stop, reload the base model, double r (to at least
    :data:`ROLLBACK_MIN_RANK`) with lora_alpha in proportion, restart from step 0.

    A step says whether the new rank fits in memory, from the run's memory estimate against
    ``config.oom_peak_share`` ("if memory allows" when the run has no reading). Source: DESIGN.md
    section 3, "Rollback": adapter shapes are fixed at initialisation, so a new rank is a new run.

    Example:
        >>> rollback(8, 16, RunFacts(), DoctorConfig()).config_changes
        {'r': 16, 'lora_alpha': 32}
        >>> rollback(2, 4, RunFacts(), DoctorConfig()).config_changes
        {'r': 16, 'lora_alpha': 32}
    """
    if not r:
        return Recommendation(
            summary="Restart with r and lora_alpha doubled",
            steps=(
                "Stop training now",
                "Reload the base model fresh (not the PeftModel you trained)",
                "Set r and lora_alpha doubled in LoraConfig",
                "Restart from step 0; never resume a checkpoint with a new rank: adapter shapes "
                "are fixed at initialisation",
            ),
            restart_from_scratch=True,
        )
    new_r = max(2 * r, ROLLBACK_MIN_RANK)
    changes: dict[str, object] = {"r": new_r}
    if alpha is not None:  # an int, as peft's LoraConfig declares it; lora_alpha/r kept
        changes["lora_alpha"] = max(1, round(alpha * new_r / r))
    target = (
        f"r={new_r}, lora_alpha={changes['lora_alpha']}"
        if "lora_alpha" in changes
        else f"r={new_r} with lora_alpha {new_r // r}x as large"
    )
    return Recommendation(
        summary=f"Rank {r} looks too small: restart with {target}",
        steps=(
            "Stop training now",
            "Reload the base model fresh (not the PeftModel you trained)",
            f"Set {target} in LoraConfig",
            rank_memory_step(facts, new_r, config.oom_peak_share),
            "Restart from step 0; never resume a checkpoint with a new rank: adapter shapes are "
            "fixed at initialisation",
        ),
        config_changes=changes,
        restart_from_scratch=True,
    )


def rank_too_small(look: Look) -> Cause | None:
    """The rank binds: only a full spectrum with a stalled loss (``rank-saturated``) supports it."""
    if not look.lora:
        return None
    r, alpha, _ = rank_and_alpha(look.facts)
    saturated = look.found.get("rank-saturated")
    underused = look.found.get("rank-underused")
    inconclusive = look.found.get("rank-inconclusive")
    check = "the spectrum of the update (rank-saturated) tells; a rank sweep settles it"
    if inconclusive is not None and saturated is None:
        check = f"the spectrum could not tell whether r binds ({inconclusive.title}); {check}"
    return Cause(
        "rank-too-small",
        f"rank r={r} too small" if r else "rank too small",
        (saturated.title,) if saturated is not None else (),
        (underused.title,) if underused is not None else (),
        rollback(r, alpha, look.facts, look.config),
        check,
    )


# --- adapters that do not learn -----------------------------------------------------------------
def not_learning(look: Look) -> Cause | None:
    """The adapters do not train at all (a broken set-up, not a slow one)."""
    facts = look.facts
    support = [
        f.title
        for slug in ("adapter-not-learning", "weights-not-updating", "loss-at-chance")
        if (f := look.found.get(slug)) is not None and f is not look.symptom
    ]
    frozen = facts.no_grad_layers or facts.b_still_zero_layers
    if frozen and not support:
        support.append(f"{len(frozen)} LoRA layers got no update in the first steps")
    if not look.lora:
        return Cause(
            "adapters-not-learning",
            "weights not learning",
            tuple(support),
            (),
            Recommendation(
                summary="Make the model's weights train before anything else",
                steps=(
                    "Check that the parameters to train require grad: sum(p.numel() for p in "
                    "model.parameters() if p.requires_grad) > 0",
                    "Build the optimizer from model.parameters() after any freezing (or let the "
                    "Trainer build it)",
                ),
            ),
            "check that the model's parameters require grad and move",
        )
    return Cause(
        "adapters-not-learning",
        "adapters not learning",
        tuple(support),
        (),
        Recommendation(
            summary="Make the LoRA parameters train before anything else",
            steps=(
                "Check model.print_trainable_parameters() shows the LoRA parameters",
                "Build the optimizer after get_peft_model (let the Trainer build it)",
                "Do not freeze the model after wrapping it with peft",
            ),
        ),
        "check that the LoRA parameters require grad and move",
    )


def not_trainable(look: Look) -> Cause | None:
    """No LoRA parameter requires grad (an adapter loaded for inference). Open when the model was
    not read (offline): nothing tells either way."""
    facts = look.facts
    if not look.lora:
        return None
    known = facts.lora_params > 0
    frozen = known and facts.trainable_lora_params == 0
    return Cause(
        "lora-not-trainable",
        "no LoRA parameter is trainable",
        ("every LoRA parameter has requires_grad=False",) if frozen else (),
        (f"{facts.trainable_lora_params:,} LoRA parameters are trainable",)
        if known and not frozen
        else (),
        Recommendation(
            summary="Load the adapter trainable: PeftModel.from_pretrained(..., is_trainable=True)",
            steps=(
                "Load adapters with PeftModel.from_pretrained(base, path, is_trainable=True)",
                "Do not freeze the model after wrapping it with peft",
                "Restart from step 0",
            ),
            restart_from_scratch=True,
        ),
        "check model.print_trainable_parameters()",
    )


def not_in_optimizer(look: Look) -> Cause | None:
    """Trainable LoRA parameters that no optimizer param group holds (open offline)."""
    missing = look.facts.not_in_optimizer
    if not look.lora:
        return None
    return Cause(
        "adapter-not-in-optimizer",
        "LoRA parameters missing from the optimizer",
        (f"{len(missing)} trainable LoRA parameters are in no optimizer param group",)
        if missing
        else (),
        (),
        Recommendation(
            summary="Build the optimizer after get_peft_model, from the trainable parameters",
            steps=(
                "Create the optimizer after get_peft_model (or let the Trainer create it)",
                "Restart from step 0",
            ),
            restart_from_scratch=True,
        ),
        "check that the optimizer's param groups hold the LoRA parameters",
    )


def learning_rate_zero(look: Look) -> Cause:
    """A learning rate of 0 (a schedule or warm-up stuck at 0)."""
    _, rates = look.history.points("learning_rate")
    lr = look.lr
    zero = (lr is not None and lr == 0) or (bool(rates) and all(r == 0 for r in rates))
    positive = [r for r in rates if math.isfinite(r) and r > 0]
    return Cause(
        "learning-rate-zero",
        "learning rate of 0",
        ("the learning rate is 0 at every logged step",) if zero else (),
        (f"the logged learning rate reaches {_fmt(max(positive))}",) if positive else (),
        Recommendation(
            summary=f"Set a learning rate above 0: learning_rate={look.range.typical:g}",
            steps=(f"Set learning_rate={look.range.typical:g} and check the scheduler's warm-up",),
            config_changes={"learning_rate": look.range.typical},
        ),
        "check the logged learning_rate",
    )


def checkpointing_without_input_grads(look: Look) -> Cause | None:
    """Reentrant gradient checkpointing on a frozen base: no gradient reaches the adapters inside
    the checkpointed blocks unless the inputs require grad (transformers' and peft's docs:
    ``enable_input_require_grads`` or ``use_reentrant=False``)."""
    if not look.lora:
        return None  # a full fine-tune's trainable embeddings give the blocks inputs with grad
    setup = look.facts.setup
    on = setup.gradient_checkpointing
    if on is None:
        return Cause(
            "checkpointing-without-input-grads",
            "gradient checkpointing without input gradients",
            check="with gradient checkpointing, use use_reentrant=False",
        )
    reentrant = setup.use_reentrant is not False
    # a gradient of zeros reached the layer: checkpointing did not cut it off
    stuck = bool(set(look.facts.no_grad_layers) - set(look.facts.zero_grad_layers))
    return Cause(
        "checkpointing-without-input-grads",
        "gradient checkpointing without input gradients",
        ("gradient checkpointing is on (reentrant) and LoRA layers got no gradient",)
        if on and reentrant and stuck
        else (),
        ("gradient checkpointing is off",)
        if not on
        else (("use_reentrant=False",) if not reentrant else ()),
        Recommendation(
            summary="Let gradients reach the adapters: gradient_checkpointing_kwargs="
            "{'use_reentrant': False} or model.enable_input_require_grads()",
            steps=(
                "Set gradient_checkpointing=True with gradient_checkpointing_kwargs="
                "{'use_reentrant': False} in TrainingArguments (the Trainer then turns "
                "checkpointing on itself, non-reentrant), or call "
                "model.enable_input_require_grads() before training",
                "Restart from step 0",
            ),
            # both: the kwargs do nothing unless the Trainer itself turns checkpointing on
            config_changes={
                "gradient_checkpointing": True,
                "gradient_checkpointing_kwargs": {"use_reentrant": False},
            },
            restart_from_scratch=True,
        ),
        "with gradient checkpointing, use use_reentrant=False",
    )


# --- numerics and stability --------------------------------------------------------------------------
def no_clipping(look: Look) -> Cause:
    """Gradient clipping is off: one bad batch can throw the weights far."""
    norm = look.facts.setup.max_grad_norm
    return Cause(
        "no-gradient-clipping",
        "gradient clipping off",
        ("max_grad_norm=0: gradients are not clipped",) if norm == 0 else (),
        (f"max_grad_norm={_fmt(norm)} clips the gradients",) if norm else (),
        Recommendation(
            summary="Clip gradients: max_grad_norm=1.0",
            steps=("Set max_grad_norm=1.0 in TrainingArguments",),
            config_changes={"max_grad_norm": 1.0},
        ),
        "check max_grad_norm (1.0 clips)",
    )


def fp16_overflow(look: Look) -> Cause:
    """fp16 overflow: its range ends at 65,504 (IEEE 754 half precision)."""
    precision = look.facts.setup.precision
    return Cause(
        "fp16-overflow",
        "fp16 overflow",
        ("the run computes in fp16, whose range ends at 65,504",) if precision == "fp16" else (),
        (f"the run computes in {precision}, not fp16",) if precision in ("bf16", "fp32") else (),
        Recommendation(
            summary="Train in bf16 instead of fp16 where the GPU supports it (Ampere or newer)",
            steps=("Set bf16=True and fp16=False in TrainingArguments",),
            config_changes={"bf16": True, "fp16": False},
        ),
        "check whether the run uses fp16",
    )


def dora_zero_norm_rows(look: Look) -> Cause | None:
    """DoRA divides each weight row by its norm: a base weight with all-zero rows gives 0/0 in the
    very first forward pass (Liu et al. 2024, "DoRA"; peft's ``lora.dora``). The live probe counts
    those rows (``LayerFacts.zero_norm_rows``): DoRA layers with some support the cause and name the
    modules to leave out; DoRA layers all read without any rule it out."""
    if not look.lora:
        return None
    dora_layers = [lf for lf in look.facts.layers if lf.use_dora]
    dora = bool(dora_layers) or any(a.use_dora for a in look.facts.adapters.values())
    zero = [lf for lf in dora_layers if lf.zero_norm_rows]
    read = dora_layers and all(lf.zero_norm_rows is not None for lf in dora_layers)
    kinds = list(dict.fromkeys(lf.name.rsplit(".", 1)[-1] for lf in zero))
    support: list[str] = []
    against: list[str] = []
    if not dora:
        against.append("the adapters do not use DoRA")
    elif zero:
        first = zero[0]
        support.append(
            f"{len(zero)} DoRA layers have weight rows of norm 0 (e.g. {first.name}: "
            f"{first.zero_norm_rows} of {first.d_out} rows), where DoRA divides 0 by 0"
        )
    elif read:
        against.append(f"none of the {len(dora_layers)} DoRA layers has a weight row of norm 0")
    else:
        support.append("the adapters use DoRA (use_dora=True), which divides by each row's norm")
    if support and look.before_any_update():
        support.append("the first non-finite value came before any weight update")
    leave_out = f" ({', '.join(kinds)})" if kinds else ""
    return Cause(
        "dora-zero-norm-rows",
        "DoRA on weights with all-zero rows (0/0)",
        tuple(support),
        tuple(against),
        Recommendation(
            summary="Train without DoRA (use_dora=False), or leave the modules with all-zero "
            f"weight rows{leave_out} out of target_modules",
            steps=(
                "Set use_dora=False in LoraConfig, or remove from target_modules the modules "
                f"whose base weight has rows of zeros{leave_out}",
                "Restart from step 0",
            ),
            config_changes={"use_dora": False},
            restart_from_scratch=True,
        ),
        "check whether the adapters use DoRA",
    )


def numerics_of_the_pass(look: Look) -> Cause:
    """The forward/backward pass itself: the precision in use, attention kernels, inputs.
    Supported when the non-finite value came before any weight update: no learning rate can have
    made it then (DESIGN.md section 3); later, a cause to rule out (open): a NaN that comes from
    one operation with no rise or spike before it looks the same in the logs as a bad batch. Its
    fix follows the precision the run uses."""
    before = look.before_any_update()
    precision = look.facts.setup.precision
    if precision in ("fp16", "bf16"):
        flag = "fp16=False" if precision == "fp16" else "bf16=False"
        first = f"Run one batch in fp32 ({flag}) to see whether {precision}'s range makes the NaN"
    elif precision == "fp32":
        first = ""  # fp32 already: no precision to blame
    else:
        first = "Check the precision in use (the fp16/bf16 flags and the model's torch_dtype)"
    support = (
        f"the first non-finite value came at step {look.first_step()}, before any weight "
        "update: the forward or backward pass made it",
    )
    return Cause(
        "forward-numerics",
        "the forward or backward numerics (precision, attention kernel, inputs)",
        support if before else (),
        (),
        Recommendation(
            summary="Find the operation that makes the first NaN"
            + (
                " (no update has happened yet: the learning rate is not the cause)"
                if before
                else ""
            ),
            steps=(
                *((first,) if first else ()),
                "Run one batch with torch.autograd.set_detect_anomaly(True) to find the operation",
                "Try attn_implementation='eager' when loading the model",
                "Check the batch for empty sequences, labels that are all -100, or token ids past "
                "the vocabulary",
            ),
        ),
        "run one batch with torch.autograd.set_detect_anomaly(True), then attn_implementation="
        "'eager'",
    )


def bad_batch(look: Look) -> Cause:
    """An outlier batch: empty, extremely long, or mislabelled examples."""
    step = look.first_step()
    at = f" around step {step}" if step is not None else ""
    return Cause(
        "bad-batch",
        "an outlier batch",
        (),
        (),
        Recommendation(
            summary=f"Inspect the batch{at}",
            steps=(f"Inspect the batch{at}: empty or extremely long examples, broken labels",),
        ),
        f"inspect the batch{at} for empty or extremely long examples",
    )


def data_or_task(look: Look) -> Cause:
    """Data that cannot teach the task (labels, prompt format, truncation)."""
    return Cause(
        "data-or-task",
        "the data or the task",
        (),
        (),
        Recommendation(
            summary="Check the data before adding capacity",
            steps=("Check a few examples: labels, prompt format, truncation",),
        ),
        "check a few examples: labels, prompt format, truncation",
    )


#: The candidate causes of each symptom, in the order practice suggests checking them.
CANDIDATES: dict[str, tuple[Candidate, ...]] = {
    "loss-plateau": (
        not_learning,
        lr_too_low,
        lr_too_high,
        alpha_too_small,
        attention_only,
        rank_too_small,
        data_or_task,
    ),
    "loss-divergence": (lr_too_high, alpha_too_large, no_clipping, fp16_overflow, bad_batch),
    "grad-norm-spike": (lr_too_high, no_clipping, fp16_overflow, bad_batch),
    "non-finite-values": (
        lr_too_high,
        fp16_overflow,
        dora_zero_norm_rows,
        alpha_too_large,
        numerics_of_the_pass,
        bad_batch,
    ),
    "update-too-large": (lr_too_high, alpha_too_large),
    "adapter-not-learning": (
        not_trainable,
        not_in_optimizer,
        checkpointing_without_input_grads,
        learning_rate_zero,
    ),
    "weights-not-updating": (
        not_trainable,
        not_in_optimizer,
        learning_rate_zero,
        checkpointing_without_input_grads,
        lr_too_low,
    ),
    "loss-at-chance": (
        not_learning,
        learning_rate_zero,
        lr_too_high,
        alpha_too_large,
        lr_too_low,
        alpha_too_small,
        attention_only,
        data_or_task,
    ),
}


@dataclass(frozen=True)
class Diagnosed:
    """A symptom's causes, ranked: supported first, then open, then ruled out."""

    causes: tuple[Cause, ...]

    @property
    def top(self) -> Cause | None:
        """The most likely cause: the first one, when a fact supports it."""
        first = self.causes[0] if self.causes else None
        return first if first is not None and first.verdict == SUPPORTED else None

    @property
    def open(self) -> tuple[Cause, ...]:
        return tuple(c for c in self.causes if c.verdict == OPEN)


def diagnose(look: Look) -> Diagnosed | None:
    """The ranked causes of ``look.symptom``; None when the symptom has no candidates.

    Example:
        >>> from lora_doctor.findings import Severity
        >>> flat = Finding("LD201", "loss-plateau", Severity.WARNING, 9, "t", "m")
        >>> look = Look(flat, Findings([]), RunFacts(learning_rate=1e-5), DoctorConfig(), History())
        >>> diagnose(look).top.cause
        'learning-rate-too-low'
    """
    candidates = CANDIDATES.get(look.symptom.slug)
    if not candidates:
        return None
    causes = [c for c in (candidate(look) for candidate in candidates) if c is not None]
    order = {SUPPORTED: 0, OPEN: 1, RULED_OUT: 2}
    ranked = sorted(causes, key=lambda c: order[c.verdict])  # stable: practice's order within
    return Diagnosed(tuple(ranked))
