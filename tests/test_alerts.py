"""Alerts: each warning or error finding once as a W&B alert, against the real wandb package in
offline mode (no network)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

wandb = pytest.importorskip("wandb", reason="wandb (dev extra) is not installed")

from lora_doctor import Doctor, DoctorConfig  # noqa: E402
from lora_doctor.findings import Finding, Recommendation, Severity  # noqa: E402


def _finding(slug: str, severity: Severity, title: str = "Something is off") -> Finding:
    return Finding(
        code="LD999",
        slug=slug,
        severity=severity,
        step=7,
        title=title,
        message="what was seen",
        recommendation=Recommendation("Do the fix", steps=("step one",), config_changes={"r": 8}),
    )


@pytest.fixture
def offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    yield
    if wandb.run is not None:
        wandb.finish()


def _spy(run: Any, monkeypatch: pytest.MonkeyPatch, fail: bool = False) -> list[dict[str, Any]]:
    """Records each alert call, then makes it on the real run (which checks its arguments)."""
    calls: list[dict[str, Any]] = []
    real = run.alert

    def alert(**kwargs: Any) -> None:
        calls.append(kwargs)
        if fail:
            raise ConnectionError("W&B is unreachable")
        real(**kwargs)

    monkeypatch.setattr(run, "alert", alert)
    return calls


@pytest.mark.parametrize(
    ("severity", "level"),
    [(Severity.WARNING, "WARN"), (Severity.ERROR, "ERROR"), (Severity.INFO, None)],
    ids=["warning", "error", "info-not-sent"],
)
def test_each_finding_alerts_once_at_its_level(
    offline: None, monkeypatch: pytest.MonkeyPatch, severity: Severity, level: str | None
) -> None:
    calls = _spy(wandb.init(project="lora-doctor-test"), monkeypatch)
    doctor = Doctor(DoctorConfig(alerts=True))
    finding = _finding("loss-plateau", severity, title="A title far longer than W&B takes " * 3)
    doctor.add_finding(finding)
    doctor.add_finding(finding)  # the same finding again: not reported, not sent
    doctor.observe(8, {"loss": 1.0})
    if level is None:
        assert calls == []
        return
    assert len(calls) == 1
    assert calls[0]["level"] == getattr(wandb.AlertLevel, level)
    assert len(calls[0]["title"]) < 64
    assert calls[0]["title"].startswith("A title far longer")
    assert "LD999 loss-plateau at step 7: what was seen" in calls[0]["text"]
    assert "Fix: Do the fix" in calls[0]["text"]


def test_findings_before_the_run_wait_for_it(
    offline: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Trainer's W&B callback starts the run after the doctor's set-up checks: those
    findings are sent at the next look once the run is there, in order, each once."""
    doctor = Doctor(DoctorConfig(alerts=True))
    doctor.add_finding(_finding("alpha-rank-ratio", Severity.WARNING, "first"))
    assert wandb.run is None
    calls = _spy(wandb.init(project="lora-doctor-test"), monkeypatch)
    doctor.add_finding(_finding("loss-plateau", Severity.ERROR, "second"))
    doctor.observe(1, {"loss": 1.0})
    doctor.observe(2, {"loss": 1.0})
    assert [c["title"] for c in calls] == ["first", "second"]


@pytest.mark.parametrize(
    ("config", "emit"),
    [(DoctorConfig(), True), (DoctorConfig(alerts=True), False)],
    ids=["alerts-off", "not-main-process"],
)
def test_no_alert_unless_asked_on_the_main_process(
    offline: None, monkeypatch: pytest.MonkeyPatch, config: DoctorConfig, emit: bool
) -> None:
    calls = _spy(wandb.init(project="lora-doctor-test"), monkeypatch)
    doctor = Doctor(config, emit=emit)
    doctor.add_finding(_finding("loss-plateau", Severity.ERROR))
    doctor.observe(1, {"loss": 1.0})
    assert calls == []


def test_a_failing_alert_never_breaks_training(
    offline: None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    calls = _spy(wandb.init(project="lora-doctor-test"), monkeypatch, fail=True)
    doctor = Doctor(DoctorConfig(alerts=True))
    with caplog.at_level(logging.WARNING, logger="lora_doctor"):
        doctor.add_finding(_finding("loss-plateau", Severity.ERROR, "first"))
        doctor.add_finding(_finding("overfit", Severity.WARNING, "second"))
        doctor.observe(1, {"loss": 1.0})
    assert len(calls) == 1  # switched off after the first failure
    assert [f.title for f in doctor.findings] == ["first", "second"]
    failures = [r for r in caplog.records if "could not send an alert to W&B" in r.message]
    assert len(failures) == 1
    assert "ConnectionError: W&B is unreachable" in failures[0].getMessage()


@pytest.mark.slow
def test_trainer_with_wandb_reporting_gets_the_set_up_finding(
    offline: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real Trainer reporting to W&B: the doctor's set-up finding (found before the W&B callback
    starts its run) arrives as one alert, at WARN."""
    from tiny import Rows, tiny_args, tiny_peft
    from transformers import Trainer

    from lora_doctor import LoraDoctorCallback

    spies: list[list[dict[str, Any]]] = []
    init = wandb.init

    def init_and_spy(*args: Any, **kwargs: Any) -> Any:
        run = init(*args, **kwargs)
        spies.append(_spy(run, monkeypatch))
        return run

    monkeypatch.setattr(wandb, "init", init_and_spy)
    doctor = LoraDoctorCallback(
        alerts=True, ignore={"lora-param-budget", "attention-only-targets", "rank-inconclusive"}
    )
    trainer = Trainer(
        model=tiny_peft(4, 32),  # lora_alpha 32 at r 4: alpha-rank-ratio, a warning
        args=tiny_args(tmp_path, report_to=["wandb"]),
        train_dataset=Rows(),
        callbacks=[doctor],
    )
    trainer.train()
    (spy,) = spies
    assert [c["level"] for c in spy] == [wandb.AlertLevel.WARN]
    assert "alpha-rank-ratio" in spy[0]["text"]
