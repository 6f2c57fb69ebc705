"""Advice that fits the run: pieces of a fix built from the run's own facts, not from a recipe.

A fix that says "go back to the checkpoint of step 40" on a run that saved none, or "stop
training" on a run that has already ended, sends the user looking for something that is not
there. The checks and the causes build those parts of their fixes here, from
:class:`~lora_doctor.facts.SetupFacts` (the checkpoints on disk, refreshed live each time the
Trainer saves one; ``save_strategy``) and the run's progress. Plain data in, sentences out: no
torch, no state.
"""

from __future__ import annotations

from dataclasses import dataclass

from lora_doctor.facts import RunFacts

__all__ = ["GoBack", "go_back", "saved_checkpoints"]


def saved_checkpoints(facts: RunFacts) -> list[int] | None:
    """The steps of the checkpoints the run has saved, oldest first; None when unknown.

    Known when checkpoints were found, when ``save_strategy="no"``, or when a live run's output
    folder holds none (it is read at train begin and after each save). Offline, a folder without
    checkpoints proves nothing (a ``trainer_state.json`` is often copied out of its run), and a
    custom loop that named no folder leaves it unknown.

    Example:
        >>> from lora_doctor.facts import SetupFacts
        >>> saved_checkpoints(RunFacts(setup=SetupFacts(checkpoint_steps=[20, 10])))
        [10, 20]
        >>> saved_checkpoints(RunFacts(saved_global_step=50, setup=SetupFacts(output_dir="o")))
    """
    setup = facts.setup
    if setup.checkpoint_steps:
        return sorted(setup.checkpoint_steps)
    live = facts.saved_global_step is None
    if setup.save_strategy == "no" or (live and setup.output_dir is not None):
        return []
    return None


@dataclass(frozen=True)
class GoBack:
    """Where to go back to for the state of a step.

    Attributes:
        step: the checkpoint to load (the one of the step wanted, else the last saved before it);
            None when none was saved (or none is known).
        known: whether the run's checkpoints are known.
        text: the step of a fix that says it, with the checkpoint's folder name.
    """

    step: int | None
    known: bool
    text: str


def go_back(facts: RunFacts, step: int, what: str = "") -> GoBack:
    """The fix's step that returns to the state of ``step``: its checkpoint when one was saved,
    else the last one saved before it, else a restart from step 0.

    Args:
        facts: the run's facts (its set-up's checkpoints, ``save_strategy`` and output folder;
            live or offline).
        step: the step whose weights are wanted (the best evaluation, the lowest loss).
        what: why that step, for the sentence (``"the best evaluation"``).

    Example:
        >>> from lora_doctor.facts import SetupFacts
        >>> go_back(RunFacts(setup=SetupFacts(output_dir="out", checkpoint_steps=[10, 20])), 15).text
        'Go back to checkpoint-10 in out, the last one saved before step 15'
        >>> go_back(RunFacts(setup=SetupFacts(save_strategy="no")), 15).text
        "No checkpoint was saved up to step 15 (save_strategy='no'): restart from step 0, and save checkpoints (save_strategy='steps') to be able to go back next time"
    """
    why = f" ({what})" if what else ""
    setup = facts.setup
    saved = saved_checkpoints(facts)
    if saved is None:
        return GoBack(
            None,
            False,
            f"Go back to the last checkpoint saved at or before step {step}{why}, if one was; "
            "otherwise restart from step 0",
        )
    where = f" in {setup.output_dir}" if setup.output_dir else ""
    before = [s for s in saved if s <= step]
    if before and before[-1] == step:
        return GoBack(step, True, f"Go back to checkpoint-{step}{where}{why}")
    if before:
        return GoBack(
            before[-1],
            True,
            f"Go back to checkpoint-{before[-1]}{where}, the last one saved before step "
            f"{step}{why}",
        )
    if setup.save_strategy in (None, "no"):
        strategy = f" (save_strategy={setup.save_strategy!r})" if setup.save_strategy else ""
        keep = "save checkpoints (save_strategy='steps')"
    else:
        every = f", save_steps={setup.save_steps}" if setup.save_steps else ""
        strategy = f" (save_strategy={setup.save_strategy!r}{every})"
        keep = "save checkpoints more often"
    return GoBack(
        None,
        True,
        f"No checkpoint was saved up to step {step}{strategy}: restart from step 0, and {keep} "
        "to be able to go back next time",
    )
