"""training-stopped-early: a run (or a checkpoint) below its max_steps says so, with both numbers and
no guess; a run that completes, or that died and says so, does not get it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from tiny import Rows, tiny_args, tiny_peft
from transformers import Trainer, TrainerCallback

from lora_doctor import LoraDoctorCallback, diagnose
from lora_doctor.checks import Phase
from lora_doctor.diagnosis.crashes import Crash
from lora_doctor.engine import Doctor
from lora_doctor.facts import MemoryFacts, RunFacts

SLUG = "training-stopped-early"


def _log(last: int) -> list[dict[str, Any]]:
    return [{"step": s, "loss": 2.0 - s / 1000, "learning_rate": 1e-4} for s in range(1, last + 1)]


def _state(last: int, max_steps: int | None, global_step: int | None) -> dict[str, Any]:
    state: dict[str, Any] = {"log_history": _log(last)}
    if max_steps is not None:
        state["max_steps"] = max_steps
    if global_step is not None:
        state["global_step"] = global_step
    return state


#: (folder, trainer state) -> the finding's title, or None when it must stay quiet.
OFFLINE = {
    "run-stopped-early": ("run", _state(49, 100, 49), "Training stopped at step 49 of 100"),
    "checkpoint-of-a-longer-run": (
        "out/checkpoint-40",
        _state(40, 100, 40),
        "This checkpoint is at step 40 of 100",
    ),
    "global-step-past-last-log": ("run", _state(45, 100, 50), "Training stopped at step 50 of 100"),
    "complete-run": ("run", _state(100, 100, 100), None),
    "last-checkpoint-of-a-complete-run": ("out/checkpoint-100", _state(100, 100, 100), None),
    "no-max-steps": ("run", _state(30, None, 30), None),
}


@pytest.mark.parametrize("case", list(OFFLINE), ids=list(OFFLINE))
def test_offline(tmp_path: Path, case: str) -> None:
    folder, state, title = OFFLINE[case]
    (tmp_path / folder).mkdir(parents=True)
    (tmp_path / folder / "trainer_state.json").write_text(json.dumps(state))
    found = diagnose(tmp_path / folder).by_slug(SLUG)
    if title is None:
        assert found == []
        return
    (finding,) = found
    assert (finding.code, finding.severity.value, finding.title) == ("LD502", "info", title)
    assert finding.recommendation is None
    if "checkpoint" in folder:
        assert "checkpoint-40, saved at step 40 of the run's 100 planned steps" in finding.message
    else:
        assert "does not say why" in finding.message and "a run still going" in finding.message


def _doctor(**facts: Any) -> Doctor:
    doctor = Doctor(facts=RunFacts(max_steps=10, **facts), emit=False)
    doctor.observe(3, {"loss": 2.0})
    return doctor


#: Live endings: a death already has its finding, so the early stop stays quiet.
ENDINGS: dict[str, tuple[dict[str, Any], list[str]]] = {
    "stopped-by-a-callback": ({}, [SLUG]),
    "died": ({"crash": Crash.from_exception(KeyError("text"), 3)}, ["training-died"]),
    "out-of-memory": (
        {"memory": MemoryFacts(oom={"step": 4, "where": "the training step", "error": "x"})},
        ["out-of-memory"],
    ),
}


@pytest.mark.parametrize("case", list(ENDINGS), ids=list(ENDINGS))
def test_live_endings(case: str) -> None:
    facts, slugs = ENDINGS[case]
    doctor = _doctor(**facts)
    doctor.run_phase(Phase.END, 3)
    assert [f.slug for f in doctor.findings] == slugs


class StopAt(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if state.global_step == self.step:
            control.should_training_stop = True
        return control


@pytest.mark.slow
@pytest.mark.parametrize(
    ("stop", "title"),
    [(None, None), (2, "Training stopped at step 2 of 4")],
    ids=["completes", "early-stopping"],
)
def test_live_trainer(tmp_path: Path, stop: int | None, title: str | None) -> None:
    callbacks: list[TrainerCallback] = [LoraDoctorCallback()]
    if stop is not None:
        callbacks.append(StopAt(stop))
    Trainer(
        model=tiny_peft(), args=tiny_args(tmp_path), train_dataset=Rows(), callbacks=callbacks
    ).train()
    findings = json.loads((tmp_path / "lora_doctor.json").read_text())["findings"]
    titles = [f["title"] for f in findings if f["slug"] == SLUG]
    assert titles == ([title] if title else [])
    if title:
        (finding,) = [f for f in findings if f["slug"] == SLUG]
        assert "a run still going" not in finding["message"]  # live: it is not still going
