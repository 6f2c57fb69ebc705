"""The doctor's metrics reach TensorBoard, whatever order callbacks are added in; not log_history
(trainer_state.json), nor the printed log lines."""

from __future__ import annotations

from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tiny import Rows, tiny_args, tiny_peft
from transformers import Trainer
from transformers.integrations import TensorBoardCallback
from transformers.trainer_callback import DefaultFlowCallback, TrainerCallback

from lora_doctor import LoraDoctorCallback

_KEYS = ("lora_doctor/findings", "lora_doctor/warnings", "lora_doctor/errors")


def _scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list[tuple[int, float]]] = {}
    for events in sorted({p.parent for p in log_dir.rglob("events.out.tfevents.*")}):
        acc = EventAccumulator(str(events))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return out


@pytest.mark.slow
@pytest.mark.parametrize(
    "how",
    ["report-to", "add-callback-after-init", "reporter-added-after-doctor"],
    ids=["report-to", "add-callback-after-init", "reporter-added-after-doctor"],
)
def test_metrics_reach_tensorboard_not_log_history(tmp_path: Path, how: str) -> None:
    log_dir = tmp_path / "runs"
    # The tiny model's budget, its q/v-only targets and its memorisable data (rank-inconclusive,
    # mid-run) are findings of their own; left out here.
    doctor = LoraDoctorCallback(
        ignore={"lora-param-budget", "attention-only-targets", "rank-inconclusive"}
    )
    # lora_alpha 32 at r 4: one warning (alpha-rank-ratio) from the start of training.
    model, data = tiny_peft(4, 32), Rows()
    if how == "report-to":  # transformers puts its reporters before the user's callbacks
        args = tiny_args(tmp_path, report_to=["tensorboard"])
        trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[doctor])
    elif how == "add-callback-after-init":
        args = tiny_args(tmp_path, report_to=["tensorboard"])
        trainer = Trainer(model=model, args=args, train_dataset=data)
        trainer.add_callback(doctor)
    else:
        trainer = Trainer(
            model=model, args=tiny_args(tmp_path), train_dataset=data, callbacks=[doctor]
        )
        trainer.add_callback(TensorBoardCallback)
    if how == "add-callback-after-init":  # the hard case: the reporter sees the logs first
        kinds = [type(cb) for cb in trainer.callback_handler.callbacks]
        assert kinds.index(TensorBoardCallback) < kinds.index(LoraDoctorCallback)

    trainer.train()

    callbacks = trainer.callback_handler.callbacks
    assert isinstance(callbacks[0], DefaultFlowCallback) and callbacks[1] is doctor
    scalars = _scalars(log_dir)
    for key in _KEYS:
        assert f"train/{key}" in scalars, sorted(scalars)
    assert [v for _, v in scalars["train/lora_doctor/warnings"]] == [1.0] * 5
    found = len(doctor.doctor.findings)  # the warning, and infos such as memory-checks-off on CPU
    assert scalars["train/lora_doctor/findings"] == [(s, found) for s in (1, 2, 3, 4, 4)]
    assert len([e for e in trainer.state.log_history if "loss" in e]) == 4
    assert not [k for e in trainer.state.log_history for k in e if k.startswith("lora_doctor/")]


@pytest.mark.slow
def test_an_error_finding_is_counted(tmp_path: Path) -> None:
    """A finding made mid-run shows in the counts from the next log on (here: at setup)."""
    from lora_doctor import DoctorConfig

    config = DoctorConfig(  # r 4 > 2: an error; the tiny model's own warnings left out
        vllm_max_lora_rank=2, ignore={"lora-param-budget", "attention-only-targets"}
    )
    doctor = LoraDoctorCallback(config=config)
    seen: list[dict] = []

    class Tracker(TrainerCallback):  # a reporter: reads the logs dict after the doctor
        def on_log(self, args, state, control, logs=None, **kwargs) -> None:
            seen.append(dict(logs))

    trainer = Trainer(
        model=tiny_peft(4, 8),
        args=tiny_args(tmp_path),
        train_dataset=Rows(),
        callbacks=[Tracker(), doctor],
    )
    trainer.train()
    assert seen[0]["lora_doctor/errors"] == 1 and seen[0]["lora_doctor/warnings"] == 0
