"""The diagnosis pass the engine runs after the checks of each look.

It sees this look's findings together with every finding reported before and the run's facts, and,
in this order:

1. stands down a finding that another one explains (:data:`EXPLAINED_BY`): a flat loss after a NaN,
   a diverged or a zero loss is no underfitting, so its rank and learning-rate advice would mislead;
   ``rank-inconclusive`` says nothing once ``rank-saturated`` has spoken;
2. re-reads the evidence in the light of another finding: a full spectrum while the validation
   loss rises is what memorising looks like, so once ``overfit`` is reported a full spectrum gives
   ``rank-inconclusive``, never ``rank-saturated``;
3. ranks the candidate causes of each symptom and puts the first one's fix on the finding.

No step depends on the order of the checks in the registry.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from lora_doctor.checks import Context, rank
from lora_doctor.config import DoctorConfig
from lora_doctor.diagnosis.causes import Findings, plateau_causes
from lora_doctor.facts import RunFacts
from lora_doctor.findings import Finding

__all__ = ["EXPLAINED_BY", "run"]

#: A finding of the key's slug is stood down when one of these is (or was) reported.
EXPLAINED_BY: dict[str, tuple[str, ...]] = {
    "loss-plateau": ("zero-loss", "loss-divergence", "non-finite-values"),
    "rank-inconclusive": ("rank-saturated",),
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
        if finding.slug == "loss-plateau":
            finding = _with_causes(finding, everything, facts, config)
        out.append(finding)
    rank_said = Findings([*reported, *out]).any(("rank-inconclusive", "rank-saturated"))
    if overfit and not rank_said and facts.spectrum:
        found = rank.inconclusive_by_memorising(
            context, "the validation loss rises while the training loss falls (overfit)"
        )
        if found is not None:
            out.append(found)
    return out


def _with_causes(
    finding: Finding, found: Findings, facts: RunFacts, config: DoctorConfig
) -> Finding:
    """The plateau with its ranked causes: the first one's fix, the others named."""
    causes = plateau_causes(found, facts, config)
    top, others = causes[0], [c.name for c in causes[1:]]
    message = f"{finding.message} Most likely cause: {top.name} ({top.evidence})."
    if others:
        message += " Other causes that would explain the curve: " + "; ".join(others) + "."
    return dataclasses.replace(
        finding,
        message=message,
        evidence={**finding.evidence, "causes": [c.name for c in causes]},
        recommendation=top.recommendation,
    )
