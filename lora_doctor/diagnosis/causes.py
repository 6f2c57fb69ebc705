"""Candidate causes of a symptom, and the fixes built from the run's own facts.

A cause is an object: its name, the evidence for it, and the fix that removes it. The diagnosis
pass (:mod:`lora_doctor.diagnosis.reasoning`) ranks the causes of a symptom and puts the first one's
fix on the finding.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from lora_doctor.config import DoctorConfig
from lora_doctor.facts import RunFacts
from lora_doctor.findings import Finding, Recommendation
from lora_doctor.memory_estimate import rank_memory_step

__all__ = ["Cause", "Findings", "plateau_causes", "rank_and_alpha", "rollback"]


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
    """One candidate explanation of a symptom, with the evidence for it and its fix."""

    name: str
    evidence: str
    recommendation: Recommendation


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


def rollback(
    r: int | None, alpha: float | None, facts: RunFacts, config: DoctorConfig
) -> Recommendation:
    """The rank rollback: stop, reload the base model, double r and alpha, restart from step 0.

    A step says whether the doubled rank fits in memory, from the run's memory estimate against
    ``config.oom_peak_share`` ("if memory allows" when the run has no reading). Source: DESIGN.md
    section 3, "Rollback": adapter shapes are fixed at initialisation, so a new rank is a new run.

    Example:
        >>> rollback(8, 16, RunFacts(), DoctorConfig()).config_changes
        {'r': 16, 'lora_alpha': 32}
    """
    changes: dict[str, object] = {}
    if r:
        changes["r"] = 2 * r
        if alpha is not None:
            changes["lora_alpha"] = int(2 * alpha) if float(alpha).is_integer() else 2 * alpha
    target = (
        f"r={2 * r}, lora_alpha={changes.get('lora_alpha', '2x')}"
        if r
        else "r and lora_alpha doubled"
    )
    return Recommendation(
        summary=f"Rank {r} looks too small: restart with {target}"
        if r
        else "Restart with r and lora_alpha doubled",
        steps=(
            "Stop training now",
            "Reload the base model fresh (not the PeftModel you trained)",
            f"Set {target} in LoraConfig",
            *([rank_memory_step(facts, 2 * r, config.oom_peak_share)] if r else []),
            "Restart from step 0; never resume a checkpoint with a new rank: adapter shapes are "
            "fixed at initialisation",
        ),
        config_changes=changes,
        restart_from_scratch=True,
    )


def plateau_causes(found: Findings, facts: RunFacts, config: DoctorConfig) -> list[Cause]:
    """The candidate causes of a plateau, most supported by the evidence first.

    Order: adapters that do not learn, a learning rate far below LoRA's usual range, an alpha that
    scales the update down, adapters on attention only, and then the rank (doubled only when no
    ``rank-underused`` finding says the rank is not the limit). Source: DESIGN.md section 3,
    "Underfit".

    Example:
        >>> plateau_causes(Findings([]), RunFacts(learning_rate=1e-5), DoctorConfig())[0].name
        'learning rate too low for LoRA'
    """
    causes: list[Cause] = []
    stuck = found.get("adapter-not-learning")
    frozen = facts.no_grad_layers or facts.b_still_zero_layers
    if stuck is not None or frozen:
        detail = stuck.title if stuck is not None else f"{len(frozen)} LoRA layers got no update"
        causes.append(
            Cause(
                "adapters not learning",
                detail,
                Recommendation(
                    summary="Make the LoRA parameters train before anything else",
                    steps=(
                        "Check model.print_trainable_parameters() shows the LoRA parameters",
                        "Build the optimizer after get_peft_model (let the Trainer build it)",
                        "Do not freeze the model after wrapping it with peft",
                    ),
                ),
            )
        )
    lr = facts.learning_rate
    if lr is not None and 0 < lr < config.plateau_low_lr:
        causes.append(
            Cause(
                "learning rate too low for LoRA",
                f"learning_rate={_fmt(lr)}, below {_fmt(config.plateau_low_lr)}; LoRA usually needs "
                "1e-4 to 5e-4, about 10x full fine-tuning",
                Recommendation(
                    summary=f"Raise learning_rate from {_fmt(lr)} to 2e-4",
                    steps=(
                        "Set learning_rate=2e-4 in TrainingArguments (LoRA's usual 1e-4 to 5e-4)",
                        "Restart from the last checkpoint or from scratch; the rank can stay",
                    ),
                    config_changes={"learning_rate": 2e-4},
                ),
            )
        )
    causes.extend(_alpha_cause(found, facts, config))
    attn = found.get("attention-only-targets")
    if attn is not None:
        causes.append(
            Cause(
                "adapters on attention only",
                attn.title,
                Recommendation(
                    summary="Add the MLP projections to target_modules",
                    steps=(
                        "Set target_modules='all-linear' in LoraConfig (or add gate_proj, up_proj, "
                        "down_proj)",
                        "Restart from scratch: new target modules mean new adapters",
                    ),
                    config_changes={"target_modules": "all-linear"},
                    restart_from_scratch=True,
                ),
            )
        )
    underused = found.get("rank-underused")
    if underused is None and facts.has_lora is not False:
        causes.append(_rank_cause(found, facts, config))
    if not causes:
        causes.append(
            Cause(
                "a task that needs more capacity or better data",
                (
                    "the rank is not the limit (rank-underused)"
                    if underused is not None
                    else "no adapter cause is known"
                ),
                Recommendation(
                    summary="Check the data and the learning rate before adding capacity",
                    steps=(
                        "Check a few examples: labels, prompt format, truncation",
                        "Try learning_rate=2e-4 if it is lower",
                    ),
                ),
            )
        )
    return causes


def _alpha_cause(found: Findings, facts: RunFacts, config: DoctorConfig) -> list[Cause]:
    """An alpha that scales the update down, from the alpha-rank-ratio finding or the scaling."""
    r, alpha, scale = rank_and_alpha(facts)
    ratio = found.get("alpha-rank-ratio")
    low_scale = scale is not None and scale < config.scaling_low * (1 - config.scaling_tolerance)
    flagged = ratio is not None and float(ratio.evidence.get("scaling", 0)) < config.scaling_low
    if not (flagged or low_scale):
        return []
    shown = float(ratio.evidence.get("scaling", 0)) if ratio is not None else scale
    target = 2 * r if r else None
    return [
        Cause(
            "alpha scales the update down",
            f"effective scaling {_fmt(shown or 0)} (lora_alpha={_fmt(alpha or 0)}, r={r}), "
            "below alpha = r",
            Recommendation(
                summary=f"Set lora_alpha={target} (2r) and restart"
                if target
                else "Set lora_alpha = 2r and restart",
                steps=(
                    f"Set lora_alpha={target} in LoraConfig" if target else "Set lora_alpha = 2r",
                    "Restart from scratch (the scaling is part of the trained update)",
                ),
                config_changes={"lora_alpha": target} if target else {},
                restart_from_scratch=True,
            ),
        )
    ]


def _rank_cause(found: Findings, facts: RunFacts, config: DoctorConfig) -> Cause:
    """The rank as the cause, with what the spectrum said about it."""
    r, alpha, _ = rank_and_alpha(facts)
    saturated = found.get("rank-saturated")
    inconclusive = found.get("rank-inconclusive")
    if saturated is not None:
        evidence = saturated.title
    elif inconclusive is not None:
        evidence = f"the spectrum could not tell whether r binds ({inconclusive.title})"
    else:
        evidence = f"no other cause shows in the facts; r={r}" if r else "no other cause shows"
    return Cause(
        f"rank r={r} too small" if r else "rank too small",
        evidence,
        rollback(r, alpha, facts, config),
    )
