"""Resume: the doctor's state travels with each checkpoint; a changed rank becomes its finding."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path

import pytest
from tiny import Rows, tiny_args, tiny_peft
from transformers import Trainer

from lora_doctor import LoraDoctorCallback


def _warnings(findings: Iterable[dict]) -> list[str]:
    return [f["slug"] for f in findings if f["severity"] != "info"]


def _train(out: Path, r: int, resume: str | None = None, **overrides: object) -> LoraDoctorCallback:
    # The tiny model's budget and its q/v-only targets are findings of their own; left out here.
    doctor = LoraDoctorCallback(ignore={"lora-param-budget", "attention-only-targets"})
    args = tiny_args(out, save_strategy="steps", save_steps=2, **overrides)
    # lora_alpha 8r (scaling 8): an alpha-rank-ratio finding from the first step on.
    trainer = Trainer(
        model=tiny_peft(r, 8 * r), args=args, train_dataset=Rows(), callbacks=[doctor]
    )
    trainer.train(resume_from_checkpoint=resume)
    # With restore_callback_states_from_checkpoint, transformers replaces the callback by a new one.
    return next(
        cb for cb in trainer.callback_handler.callbacks if isinstance(cb, LoraDoctorCallback)
    )


@pytest.mark.slow
@pytest.mark.parametrize("restore", [False, True], ids=["default", "restore-callback-states"])
def test_resumed_run_keeps_its_diagnosis(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, restore: bool
) -> None:
    first = _train(tmp_path, r=4)
    state = json.loads((tmp_path / "checkpoint-2" / "trainer_state.json").read_text())
    saved = state["stateful_callbacks"]["LoraDoctorCallback"]["attributes"]["doctor_state"]
    assert _warnings(saved["findings"]) == ["alpha-rank-ratio"]
    assert first.doctor is not None and first.doctor.step == 4

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="lora_doctor"):
        resumed = _train(
            tmp_path,
            r=4,
            resume=str(tmp_path / "checkpoint-2"),
            max_steps=6,
            restore_callback_states_from_checkpoint=restore,
        )
    assert resumed.config.ignore == {"lora-param-budget", "attention-only-targets"}
    assert resumed.doctor is not None
    assert _warnings(f.to_dict() for f in resumed.doctor.findings) == ["alpha-rank-ratio"]
    # History before the checkpoint came back from log_history; steps 3..6 were added on resume.
    assert resumed.doctor.history.series("loss").steps.tolist() == [1, 2, 3, 4, 5, 6]
    assert not [r for r in caplog.records if "alpha-rank-ratio" in r.getMessage()]
    report = json.loads((tmp_path / "lora_doctor.json").read_text())
    assert report["run"]["resumed_from"] == str(tmp_path / "checkpoint-2")
    assert _warnings(report["findings"]) == ["alpha-rank-ratio"]


@pytest.mark.slow
@pytest.mark.parametrize("resume", ["path", "last"], ids=["explicit-path", "resume-true"])
def test_rank_changed_on_resume_leaves_finding_and_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, resume: str
) -> None:
    _train(tmp_path, r=4, max_steps=2)
    (tmp_path / "lora_doctor.json").unlink()
    caplog.clear()
    target = str(tmp_path / "checkpoint-2") if resume == "path" else True
    with caplog.at_level(logging.WARNING, logger="lora_doctor"), pytest.raises(RuntimeError) as err:
        _train(tmp_path, r=8, resume=target, max_steps=4)  # type: ignore[arg-type]
    assert "size mismatch" in str(err.value)  # the original error still surfaces
    report = json.loads((tmp_path / "lora_doctor.json").read_text())
    found = [f for f in report["findings"] if f["slug"] == "rank-changed-on-resume"]
    assert len(found) == 1
    assert found[0]["evidence"]["checkpoint_r"] == 4 and found[0]["evidence"]["model_r"] == 8
    assert found[0]["recommendation"]["restart_from_scratch"] is True
    assert sum("rank-changed-on-resume" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.slow
def test_rank_read_from_the_error_when_the_checkpoint_config_cannot_be_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _train(tmp_path, r=4, max_steps=2)
    monkeypatch.setattr("lora_doctor.integrations.hf.checkpoint_adapters", lambda path: {})
    with pytest.raises(RuntimeError, match="size mismatch"):
        _train(tmp_path, r=8, resume=str(tmp_path / "checkpoint-2"), max_steps=4)
    report = json.loads((tmp_path / "lora_doctor.json").read_text())
    found = [f for f in report["findings"] if f["slug"] == "rank-changed-on-resume"]
    assert [f["evidence"]["checkpoint_r"] for f in found] == [4]


@pytest.mark.slow
def test_training_dying_of_oom_leaves_the_finding_and_the_error(tmp_path: Path) -> None:
    """The shared guard: an error escaping trainer.train reaches the probes (here the memory
    probe's out-of-memory record) and the JSON is written; the error propagates unchanged."""
    model = tiny_peft(4, 8)
    forward = model.forward
    calls = {"n": 0}

    def failing_forward(*args: object, **kwargs: object) -> object:
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return forward(*args, **kwargs)

    model.forward = failing_forward  # type: ignore[method-assign]
    doctor = LoraDoctorCallback()
    trainer = Trainer(
        model=model, args=tiny_args(tmp_path), train_dataset=Rows(), callbacks=[doctor]
    )
    with pytest.raises(RuntimeError, match="CUDA out of memory"):
        trainer.train()
    report = json.loads((tmp_path / "lora_doctor.json").read_text())
    oom = [f for f in report["findings"] if f["slug"] == "out-of-memory"]
    assert len(oom) == 1 and oom[0]["step"] == 3
