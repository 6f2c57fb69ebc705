"""The diagnosis pass the engine runs after the checks of each look.

It sees this look's findings together with every finding reported before and the run's facts, and,
in this order:

1. stands down a finding that another one explains (:data:`EXPLAINED_BY`): a flat loss after a NaN,
   a diverged or a zero loss, a loss at chance or weights that never update is no underfitting, so
   its rank and learning-rate advice would mislead; adapters that do not learn are part of a run
   whose weights do not update at all;
   ``rank-inconclusive`` says nothing once ``rank-saturated`` has spoken;
2. re-reads the evidence in the light of another finding: a full spectrum while the validation
   loss rises is what memorising looks like, so once ``overfit`` is reported a full spectrum gives
   ``rank-inconclusive``, never ``rank-saturated``;
3. ranks the candidate causes of each symptom against the facts
   (:mod:`lora_doctor.diagnosis.causes`): the finding names a most likely cause, with its fix, only
   when a fact supports it, and otherwise lists the causes to rule out, in order.

No step depends on the order of the checks in the registry.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from lora_doctor.checks import Context, rank
from lora_doctor.config import DoctorConfig
from lora_doctor.diagnosis.causes import CANDIDATES, Cause, Findings, Look, diagnose
from lora_doctor.facts import RunFacts
from lora_doctor.findings import Finding, Recommendation

__all__ = ["EXPLAINED_BY", "run"]

#: A finding of the key's slug is stood down when one of these is (or was) reported.
EXPLAINED_BY: dict[str, tuple[str, ...]] = {
    "loss-plateau": (
        "zero-loss",
        "loss-divergence",
        "non-finite-values",
        "loss-at-chance",
        "weights-not-updating",
    ),
    "loss-at-chance": ("zero-loss", "loss-divergence", "non-finite-values", "weights-not-updating"),
    "adapter-not-learning": ("weights-not-updating",),
    "rank-inconclusive": ("rank-saturated",),
    "training-died": ("out-of-memory", "rank-changed-on-resume"),
    "training-stopped-early": ("training-died", "out-of-memory", "rank-changed-on-resume"),
}


def run(
    new: Sequence[Finding],
    reported: Sequence[Finding],
    facts: RunFacts,
    config: DoctorConfig,
    context: Context,
) -> list[Finding]:
    """This look's findings as they should be reported: explained ones dropped, those another
    finding re-reads replaced, the others with their causes ranked.

    Args:
        new: the findings the checks produced at this look, in registry order.
        reported: every finding reported before this look.
        facts: the run's facts.
        config: the thresholds.
        context: the look (phase, step, history) for the rules that re-read evidence.

    Returns:
        The findings to report, in the order of ``new`` (a finding the pass adds comes last).

    Example:
        >>> from lora_doctor.findings import Severity
        >>> from lora_doctor.history import History
        >>> from lora_doctor.checks import Phase
        >>> nan = Finding("LD203", "non-finite-values", Severity.ERROR, 5, "t", "m")
        >>> flat = Finding("LD201", "loss-plateau", Severity.WARNING, 9, "t", "m")
        >>> look = Context(RunFacts(), History(), DoctorConfig(), Phase.LOG, 9)
        >>> [f.slug for f in run([flat], [nan], RunFacts(), DoctorConfig(), look)]
        []
    """
    everything = Findings([*reported, *new])
    overfit = everything.get("overfit") is not None
    out: list[Finding] = []
    for finding in new:
        if everything.any(EXPLAINED_BY.get(finding.slug, ())):
            continue
        if finding.slug == "rank-saturated" and overfit:
            continue  # memorising explains the full spectrum: see below
        if finding.slug in CANDIDATES:
            finding = _with_causes(finding, everything, context)
        out.append(finding)
    rank_said = Findings([*reported, *out]).any(("rank-inconclusive", "rank-saturated"))
    if overfit and not rank_said and facts.spectrum:
        found = rank.inconclusive_by_memorising(
            context, "the validation loss rises while the training loss falls (overfit)"
        )
        if found is not None:
            out.append(found)
    return out


def _with_causes(finding: Finding, found: Findings, context: Context) -> Finding:
    """The symptom with its ranked causes (``evidence.causes``): the most likely one and its fix
    when a fact supports it, else the causes to rule out in order. The finding's own
    recommendation (what to do about the symptom itself: stop, roll back) comes first."""
    diagnosed = diagnose(Look(finding, found, context.facts, context.config, context.history))
    if diagnosed is None or not diagnosed.causes:
        return finding
    top = diagnosed.top
    message = finding.message
    if top is not None:
        message += f" Most likely cause: {top.name} ({'; '.join(top.support)})."
        others = [c.name for c in diagnosed.causes[1:] if c.verdict != "ruled-out"]
        if others:
            message += " Also to rule out: " + "; ".join(others) + "."
        recommendation = _merge(finding.recommendation, top.fix)
    else:
        shown = diagnosed.open[:_SHOWN]
        if shown:
            message += " No fact of this run singles out one cause; rule these out in order: " + (
                "; ".join(f"({i}) {c.name}: {c.check}" for i, c in enumerate(shown, 1)) + "."
            )
        recommendation = _rule_out(finding.recommendation, shown)
    ruled = [c.name for c in diagnosed.causes if c.verdict == "ruled-out"]
    if ruled:
        message += " Ruled out by the run's facts: " + "; ".join(ruled) + "."
    return dataclasses.replace(
        finding,
        message=message,
        evidence={**finding.evidence, "causes": [c.to_dict() for c in diagnosed.causes]},
        recommendation=recommendation,
    )


#: Open causes a finding lists when no fact singles one out.
_SHOWN = 4


def _merge(first: Recommendation | None, fix: Recommendation | None) -> Recommendation | None:
    """The symptom's own steps, then the cause's fix (its summary leads); each step once."""
    if fix is None:
        return first
    if first is None:
        return fix
    steps = list(dict.fromkeys([*first.steps, *fix.steps]))
    return Recommendation(
        summary=fix.summary,
        steps=tuple(steps),
        config_changes={**first.config_changes, **fix.config_changes},
        restart_from_scratch=first.restart_from_scratch or fix.restart_from_scratch,
    )


def _rule_out(first: Recommendation | None, causes: Sequence[Cause]) -> Recommendation | None:
    """The symptom's own steps, then how to rule out each open cause, in order; no config change
    is made for a cause no fact supports."""
    checks = [c.check[0].upper() + c.check[1:] for c in causes if c.check]
    if not checks:
        return first
    summary = "Rule out the causes in order: " + ", ".join(c.name for c in causes)
    if first is None:
        return Recommendation(summary=summary, steps=tuple(checks))
    return Recommendation(
        summary=first.summary,
        steps=tuple(dict.fromkeys([*first.steps, *checks])),
        config_changes=dict(first.config_changes),
        restart_from_scratch=first.restart_from_scratch,
    )
