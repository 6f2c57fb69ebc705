"""Side effects of the live callback on what the user sees and keeps: the printed log lines are
those of the same run without the doctor (progress bar and ``disable_tqdm=True``, any callback
order) while TensorBoard still gets the doctor's metrics; ``trainer_state.json`` does not grow with
the doctor's readings; the diagnosis JSON keeps per-layer spectra for the latest reading only."""

from __future__ import annotations

import ast
import json
from pathlib import Path
from typing import Any

import pytest
from tiny import Rows, tiny_args, tiny_peft
from transformers import Trainer
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from lora_doctor import DoctorConfig, LoraDoctorCallback

_QUIET = {"lora-param-budget", "attention-only-targets", "rank-inconclusive"}
#: Keys whose values are wall-clock figures, different in every run.
_TIMING = ("runtime", "per_second")


def _printed(text: str) -> list[dict[str, Any]]:
    """The log lines the Trainer printed (dicts), with the wall-clock figures masked."""
    out = []
    for line in text.splitlines():
        if line.startswith("{"):
            entry = ast.literal_eval(line)
            out.append({k: None if any(t in k for t in _TIMING) else v for k, v in entry.items()})
    return out


def _tensorboard(log_dir: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags: set[str] = set()
    for events in {p.parent for p in log_dir.rglob("events.out.tfevents.*")}:
        acc = EventAccumulator(str(events))
        acc.Reload()
        tags.update(acc.Tags()["scalars"])
    return tags


def _run(
    out: Path, capsys: pytest.CaptureFixture[str], tqdm: bool, doctor: Any = None, how: str = ""
) -> tuple[str, str]:
    args = tiny_args(
        out,
        disable_tqdm=not tqdm,
        report_to=["tensorboard"],
        save_strategy="steps",
        save_steps=4,
    )
    callbacks = [doctor] if doctor is not None and how != "add-after-init" else None
    trainer = Trainer(model=tiny_peft(), args=args, train_dataset=Rows(), callbacks=callbacks)
    if doctor is not None and how == "add-after-init":  # after the printer and the reporter
        trainer.add_callback(doctor)
    if how == "printer-re-added":  # the user swaps the printer after the doctor saw the Trainer
        printer = PrinterCallback if not tqdm else ProgressCallback
        trainer.pop_callback(printer)
        trainer.add_callback(printer)
    capsys.readouterr()
    trainer.train()
    return capsys.readouterr()


@pytest.mark.slow
@pytest.mark.parametrize("tqdm", [True, False], ids=["progress-bar", "disable-tqdm"])
def test_printed_lines_as_without_the_doctor_and_tensorboard_gets_the_metrics(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], tqdm: bool
) -> None:
    plain, _ = _run(tmp_path / "plain", capsys, tqdm)
    assert len(_printed(plain)) == 5  # 4 steps and the training summary
    for how in ("callbacks", "add-after-init", "printer-re-added"):
        # no time budget: this tiny run's steps take milliseconds, and the spectrum metrics
        # checked below would not be read within 0.5% of them
        doctor = LoraDoctorCallback(ignore=_QUIET, config=DoctorConfig(time_budget=None))
        out = tmp_path / how
        printed, errors = _run(out, capsys, tqdm, doctor, how)
        assert _printed(printed) == _printed(plain), how
        assert "lora_doctor" not in printed + errors, how
        # the trackers still get them, and the doctor keeps them
        tags = _tensorboard(out / "runs")
        assert {"train/lora_doctor/findings", "train/lora_doctor/warnings"} <= tags, how
        assert any(t.startswith("train/lora_doctor/effective_rank/") for t in tags), how
        assert "lora_doctor/effective_rank/q_proj" in doctor.doctor.history
        # trainer_state.json does not carry them
        saved = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
        assert not [k for e in saved["log_history"] for k in e if k.startswith("lora_doctor/")]


@pytest.mark.slow
@pytest.mark.parametrize(
    "doctor",
    [
        # no time budget: the spectrum metrics of this tiny run are read only without one
        LoraDoctorCallback(
            ignore=_QUIET, print_metrics=True, config=DoctorConfig(time_budget=None)
        ),
        LoraDoctorCallback(
            config=DoctorConfig(ignore=_QUIET, print_metrics=True, time_budget=None)
        ),
    ],
    ids=["argument", "config"],
)
def test_print_metrics_opt_in(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], doctor: LoraDoctorCallback
) -> None:
    printed, _ = _run(tmp_path, capsys, tqdm=False, doctor=doctor, how="callbacks")
    lines = _printed(printed)
    assert all(line["lora_doctor/findings"] == 0 for line in lines)
    assert "lora_doctor/effective_rank/q_proj" in lines[-2]  # the reading at the last step


def test_printer_wrapper_hides_and_restores_keys() -> None:
    """The wrapped printer gets the Trainer's own dict without the doctor's keys; what it
    changes stays changed; the doctor's keys are back for the callbacks after it."""
    from lora_doctor.integrations.console import hide_from_printers

    seen: list[dict[str, Any]] = []

    class Printer(PrinterCallback):
        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
            seen.append(dict(logs))
            logs.pop("total_flos", None)

    handler = type("Handler", (), {"callbacks": [Printer(), object()]})()
    hide_from_printers(handler)
    hide_from_printers(handler)  # once only
    logs = {"loss": 1.0, "total_flos": 5.0, "lora_doctor/findings": 2, 7: "x"}
    handler.callbacks[0].on_log(None, None, None, logs=logs)
    assert seen == [{"loss": 1.0, "total_flos": 5.0, 7: "x"}]
    assert logs == {"loss": 1.0, 7: "x", "lora_doctor/findings": 2}
