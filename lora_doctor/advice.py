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

from lora_doctor.facts import SetupFacts

__all__ = ["GoBack", "go_back", "saved_checkpoints"]


def saved_checkpoints(setup: SetupFacts) -> list[int] | None:
    """The steps of the checkpoints the run has saved, oldest first; None when unknown.

    Known when the output folder was read (live at train begin and after each save, offline
    beside the trainer state) or when ``save_strategy="no"``; a custom loop that named no folder
    leaves it unknown.

    Example:
        >>> saved_checkpoints(SetupFacts(output_dir="out", checkpoint_steps=[20, 10]))
        [10, 20]
        >>> saved_checkpoints(SetupFacts()) is None
        True
    """
    if setup.checkpoint_steps:
        return sorted(setup.checkpoint_steps)
    if setup.output_dir is not None or setup.save_strategy == "no":
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


def go_back(setup: SetupFacts, step: int, what: str = "") -> GoBack:
    """The fix's step that returns to the state of ``step``: its checkpoint when one was saved,
    else the last one saved before it, else a restart from step 0.

    Args:
        setup: the run's set-up (its checkpoints, ``save_strategy``, output folder).
        step: the step whose weights are wanted (the best evaluation, the lowest loss).
        what: why that step, for the sentence (``"the best evaluation"``).

    Example:
        >>> go_back(SetupFacts(output_dir="out", checkpoint_steps=[10, 20]), 15).text
        'Go back to checkpoint-10 in out, the last one saved before step 15'
        >>> go_back(SetupFacts(save_strategy="no"), 15).text
        "No checkpoint was saved up to step 15 (save_strategy='no'): restart from step 0, and save checkpoints (save_strategy='steps') to be able to go back next time"
    """
    why = f" ({what})" if what else ""
    saved = saved_checkpoints(setup)
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
