"""How the run ended: died of an error (``training-died``), or stopped before ``max_steps``."""

from __future__ import annotations

from collections.abc import Iterable

from lora_doctor.checks.base import Check, Context, Phase
from lora_doctor.diagnosis.crashes import CODE, SLUG, classify
from lora_doctor.findings import Finding, Severity

__all__ = ["CHECKS", "TrainingDied", "TrainingStoppedEarly"]


class TrainingDied(Check):
    """Training ended in an exception: its cause and fix when a known signature explains it and the
    run's facts confirm it, else what died where, with the last readings.

    The callback's train guard (or :func:`lora_doctor.watch`) records the crash in
    ``RunFacts.crash``; :func:`lora_doctor.diagnosis.crashes.classify` does the rest (signatures
    ranked from public issue threads, docs/crashes.md). The diagnosis pass stands it down when
    ``out-of-memory`` or ``rank-changed-on-resume`` already explains the error.
    """

    code, slug, severity = CODE, SLUG, Severity.ERROR
    phases = frozenset({Phase.END})

    def run(self, ctx: Context) -> Iterable[Finding]:
        crash = ctx.facts.crash
        if crash is None:
            return
        yield classify(crash, ctx.facts, ctx.history)


class TrainingStoppedEarly(Check):
    """The run (or the checkpoint read) ended before its planned ``max_steps``.

    Says both numbers and does not guess why: early stopping, a ``stop_on`` finding, an error,
    a manual stop, or a run still going look the same in a trainer state. A checkpoint's state is
    naturally below ``max_steps``; it is reported as "this checkpoint is at step N of M". Live, a
    run that died already has its finding (``training-died``, ``out-of-memory``): the diagnosis
    pass stands this one down then.
    """

    code, slug, severity = "LD502", "training-stopped-early", Severity.INFO
    phases = frozenset({Phase.END})

    def run(self, ctx: Context) -> Iterable[Finding]:
        facts = ctx.facts
        planned = facts.max_steps
        reached = max(ctx.step, facts.saved_global_step or 0)
        if planned <= 0 or reached >= planned:
            return
        share = reached / planned
        evidence = {
            "step": reached,
            "max_steps": planned,
            "share": round(share, 4),
            "checkpoint": facts.saved_checkpoint,
        }
        if facts.saved_checkpoint is not None:
            yield self.finding(
                ctx,
                f"This checkpoint is at step {reached} of {planned}",
                f"The trainer state was read from {facts.saved_checkpoint}, saved at step {reached} "
                f"of the run's {planned} planned steps (max_steps, {share:.0%}): a checkpoint's "
                "state ends where it was saved. Diagnose the run folder, or its last checkpoint, "
                "to judge the whole run.",
                evidence,
                step=reached,
            )
            return
        reasons = ["early stopping", "a stop_on finding or another callback", "an error"]
        reasons.append("a manual stop")
        if facts.saved_global_step is not None:  # offline
            reasons += ["a run still going", "a checkpoint's state copied out of its folder"]
        why = ", ".join(reasons[:-1]) + ", or " + reasons[-1]
        yield self.finding(
            ctx,
            f"Training stopped at step {reached} of {planned}",
            f"The last step is {reached} of the {planned} planned (max_steps): {share:.0%} of the "
            f"run. The log does not say why ({why}); the curves and findings above cover only "
            "the steps that ran.",
            evidence,
            step=reached,
        )


CHECKS: tuple[type[Check], ...] = (TrainingDied, TrainingStoppedEarly)
