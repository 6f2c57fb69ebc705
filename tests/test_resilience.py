"""Reports that must not get lost or overwritten (live side): a log value the doctor cannot read,
a hook that fails, a report_path that cannot be written, one callback for two Trainers, and a
checkpoint saved by another version of the doctor."""

from __future__ import annotations

import functools
import json
import logging
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from tiny import Rows, tiny_args, tiny_peft
from transformers import Trainer

import lora_doctor
from lora_doctor import LoraDoctorCallback, watch
from lora_doctor.checks import Phase
from lora_doctor.engine import Doctor
from lora_doctor.integrations.hf import _unwritable

_QUIET = {"lora-param-budget", "attention-only-targets", "rank-inconclusive"}


class _Bad:
    """A logged object whose ``.item()`` fails with an error no reader expects."""

    def item(self) -> float:
        raise KeyError("not a scalar")


class _HostileTrainer(Trainer):
    """Adds ``extra`` to the Trainer's own log at step 2 (as a subclass or a user's metrics do)."""

    extra: dict[Any, Any] | None = None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.state.global_step == 2 and self.extra:
            logs.update(self.extra)
        super().log(logs, start_time)


def _internal_errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "internal error" in r.getMessage()]


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra",
    [{"big": 10**400}, {"loss_scale": -(10**400)}, {3: 1.0, (1, 2): "x"}, {"obj": _Bad()}],
    ids=["int-too-large", "negative-int-too-large", "keys-not-strings", "item-raises"],
)
def test_a_value_the_doctor_cannot_read_leaves_it_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, extra: dict[Any, Any]
) -> None:
    doctor = LoraDoctorCallback(ignore=_QUIET)
    trainer = _HostileTrainer(
        model=tiny_peft(4, 32),  # scaling 8: alpha-rank-ratio from the start
        args=tiny_args(tmp_path),
        train_dataset=Rows(),
        callbacks=[doctor],
    )
    trainer.extra = extra
    with caplog.at_level(logging.WARNING, logger="lora_doctor"):
        trainer.train()
    assert _internal_errors(caplog) == []
    assert doctor.doctor is not None
    assert doctor.doctor.history.series("loss").steps.tolist() == [1, 2, 3, 4]  # still observing
    report = json.loads((tmp_path / "lora_doctor.json").read_text())
    assert "alpha-rank-ratio" in {f["slug"] for f in report["findings"]}


@pytest.mark.slow
@pytest.mark.parametrize("failing", ["on_log", "on_train_end"], ids=["on-log", "on-train-end"])
def test_findings_so_far_are_written_after_a_hook_failed(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    failing: str,
) -> None:
    """A hook that raises is switched off (said once); the others go on and the report with the
    findings so far is written at the end of training."""
    if failing == "on_log":
        monkeypatch.setattr(Doctor, "observe", _raise)
    else:
        original = Doctor.run_phase

        def run_phase(self: Doctor, phase: Phase, step: int | None = None) -> Any:
            if phase is Phase.END:
                raise RuntimeError("simulated bug at the end")
            return original(self, phase, step)

        monkeypatch.setattr(Doctor, "run_phase", run_phase)
    doctor = LoraDoctorCallback(ignore=_QUIET)
    trainer = Trainer(
        model=tiny_peft(4, 32), args=tiny_args(tmp_path), train_dataset=Rows(), callbacks=[doctor]
    )
    with caplog.at_level(logging.WARNING, logger="lora_doctor"):
        trainer.train()
    (error,) = _internal_errors(caplog)
    assert f"internal error in {failing}; {failing} is switched off" in error
    report = json.loads((tmp_path / "lora_doctor.json").read_text())
    assert "alpha-rank-ratio" in {f["slug"] for f in report["findings"]}  # found at setup


def _raise(*args: Any, **kwargs: Any) -> None:
    raise RuntimeError("simulated bug in the doctor")


def _report_paths(tmp_path: Path) -> dict[str, Path]:
    (tmp_path / "a-file").write_text("x")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    return {
        "a-folder": tmp_path,
        "under-a-file": tmp_path / "a-file" / "sub" / "lora_doctor.json",
        "no-permission": locked / "lora_doctor.json",
    }


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("a-folder", "it is a folder"),
        ("under-a-file", "a-file is a file, not a folder"),
        ("no-permission", "no permission to write in"),
        ("new-folders", None),
        ("existing-file", None),
    ],
    ids=["a-folder", "under-a-file", "no-permission", "new-folders", "existing-file"],
)
def test_unwritable_report_paths(tmp_path: Path, name: str, problem: str | None) -> None:
    if name == "no-permission" and os.geteuid() == 0:
        pytest.skip("root may write anywhere")
    paths = _report_paths(tmp_path)
    paths["new-folders"] = tmp_path / "new" / "deeper" / "lora_doctor.json"
    paths["existing-file"] = tmp_path / "a-file"
    found = _unwritable(paths[name])
    assert (found is None) if problem is None else (problem in (found or ""))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["a-folder", "under-a-file"], ids=["a-folder", "under-a-file"])
def test_unwritable_report_path_is_said_at_the_start_and_training_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, name: str
) -> None:
    path = _report_paths(tmp_path)[name]
    doctor = LoraDoctorCallback(report_path=path, ignore=_QUIET)
    trainer = Trainer(
        model=tiny_peft(),
        args=tiny_args(tmp_path / "out"),
        train_dataset=Rows(),
        callbacks=[doctor],
    )
    seen: list[tuple[int, str]] = []

    class Steps(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append((trainer.state.global_step, record.getMessage()))

    handler = Steps(logging.WARNING)
    logging.getLogger("lora_doctor").addHandler(handler)
    try:
        trainer.train()
    finally:
        logging.getLogger("lora_doctor").removeHandler(handler)
    assert trainer.state.global_step == 4
    start = [step for step, message in seen if "cannot be written to" in message]
    assert start == [0]  # before the first step, once
    end = [r for r in caplog.records if "could not write the diagnosis" in r.getMessage()]
    assert len(end) == 1 and end[0].exc_info is None  # one line, no traceback
    assert not [m for _, m in seen if "internal error" in m]


def _two_trainers(tmp_path: Path, callback: LoraDoctorCallback) -> tuple[Trainer, Trainer]:
    # first: scaling 8 (alpha-rank-ratio); second: scaling 2 (no such finding)
    first = Trainer(
        model=tiny_peft(4, 32),
        args=tiny_args(tmp_path / "first", max_steps=2),
        train_dataset=Rows(),
        eval_dataset=Rows(),
        callbacks=[callback],
    )
    second = Trainer(
        model=tiny_peft(4, 8),
        args=tiny_args(tmp_path / "second", max_steps=2),
        train_dataset=Rows(),
        eval_dataset=Rows(),
        callbacks=[callback],
    )
    return first, second


def _slugs(path: Path) -> set[str]:
    return {f["slug"] for f in json.loads(path.read_text())["findings"]}


@pytest.mark.slow
def test_one_callback_two_trainers_keeps_each_report_its_own(tmp_path: Path) -> None:
    """The first Trainer dies of out-of-memory in an evaluation after the second trained: its
    own diagnosis gets the finding, in its own output_dir; the second's is left alone."""
    callback = LoraDoctorCallback(ignore=_QUIET)
    first, second = _two_trainers(tmp_path, callback)
    first.train()
    second.train()
    assert "alpha-rank-ratio" in _slugs(tmp_path / "first" / "lora_doctor.json")
    inner = first.model.base_model.model
    original = inner.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    inner.forward = functools.wraps(original)(forward)
    with pytest.raises(torch.OutOfMemoryError), watch(first):
        first.evaluate()
    assert {"alpha-rank-ratio", "out-of-memory"} <= _slugs(tmp_path / "first" / "lora_doctor.json")
    assert not {"alpha-rank-ratio", "out-of-memory"} & _slugs(
        tmp_path / "second" / "lora_doctor.json"
    )


@pytest.mark.slow
def test_one_callback_two_trainers_keeps_each_history_its_own(tmp_path: Path) -> None:
    """The first Trainer evaluates after the second trained: its doctor hears of it, not the
    second's."""
    callback = LoraDoctorCallback(ignore=_QUIET)
    first, second = _two_trainers(tmp_path, callback)
    first.train()
    second.train()
    second_doctor = callback.doctor
    first.evaluate()
    assert second_doctor is not None and "eval_loss" not in second_doctor.history
    assert "eval_loss" in callback._bound(first).history  # type: ignore[union-attr]


@pytest.mark.slow
def test_resume_tolerates_settings_saved_by_another_version(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """restore_callback_states_from_checkpoint rebuilds the callback from the checkpoint's saved
    arguments; fields, values and finding names this version does not know are left out with a
    note, and the rest of the settings come back."""
    args = tiny_args(tmp_path, save_strategy="steps", save_steps=2)
    callback = LoraDoctorCallback(ignore=_QUIET, stop_on={"non-finite-values"})
    Trainer(model=tiny_peft(), args=args, train_dataset=Rows(), callbacks=[callback]).train()
    state_file = tmp_path / "checkpoint-2" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    config = state["stateful_callbacks"]["LoraDoctorCallback"]["args"]["config"]
    saved_by = config.get("__saved_by__")
    config.update(
        {
            "__saved_by__": "lora-doctor 9.9.9",
            "a_threshold_from_the_future": 0.5,
            "ignore": [*config["ignore"], "a-future-slug"],
            "check_after_steps": "later",
        }
    )
    state_file.write_text(json.dumps(state))

    resumed_args = tiny_args(
        tmp_path,
        save_strategy="steps",
        save_steps=2,
        max_steps=6,
        restore_callback_states_from_checkpoint=True,
    )
    trainer = Trainer(
        model=tiny_peft(), args=resumed_args, train_dataset=Rows(), callbacks=[callback]
    )
    with caplog.at_level(logging.WARNING, logger="lora_doctor"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    (note,) = [
        r.getMessage() for r in caplog.records if "saved by lora-doctor 9.9.9" in r.getMessage()
    ]
    for name in ("a_threshold_from_the_future", "ignore 'a-future-slug'", "check_after_steps"):
        assert name in note
    (restored,) = [
        c for c in trainer.callback_handler.callbacks if isinstance(c, LoraDoctorCallback)
    ]
    assert restored is not callback  # transformers rebuilt it from the checkpoint
    assert restored.config.ignore == _QUIET and restored.config.stop_on == {"non-finite-values"}
    assert restored.config.check_after_steps == 2
    assert trainer.state.global_step == 6 and (tmp_path / "lora_doctor.json").is_file()
    assert saved_by == f"lora-doctor {lora_doctor.__version__}"


def test_a_users_config_dict_is_still_checked() -> None:
    with pytest.raises(ValueError, match=r"unknown DoctorConfig fields \['a_threshold'\]"):
        LoraDoctorCallback(config={"a_threshold": 0.5})
    with pytest.raises(ValueError, match="check_after_steps must be an integer >= 1"):
        LoraDoctorCallback(config={"check_after_steps": "later"})
