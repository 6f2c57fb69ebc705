"""The engine: de-duplication, silencing, stopping and isolation of failing checks."""

from __future__ import annotations

import logging

import pytest

from lora_doctor.checks import Check, Context, Phase
from lora_doctor.config import DoctorConfig
from lora_doctor.engine import Doctor
from lora_doctor.findings import Severity


class _LossAbove(Check):
    code, slug, severity = "LD100", "no-lora-adapter", Severity.INFO
    phases = frozenset({Phase.LOG})

    def run(self, ctx: Context):
        loss = ctx.history.series("loss")
        if len(loss) and loss.values[-1] > 1:
            yield self.finding(ctx, "loss above 1", f"loss {loss.values[-1]}")


class _Broken(Check):
    code, slug = "LD110", "alpha-rank-ratio"
    phases = frozenset({Phase.LOG})

    def run(self, ctx: Context):
        raise RuntimeError("bug")


def test_finding_reported_once_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    doctor = Doctor(checks=[_LossAbove])
    with caplog.at_level(logging.INFO, logger="lora_doctor"):
        for step, loss in [(1, 2.0), (2, 3.0)]:
            doctor.observe(step, {"loss": loss})
            doctor.run_phase(Phase.LOG)
    assert [f.step for f in doctor.findings] == [1]
    assert sum("loss above 1" in r.getMessage() for r in caplog.records) == 1


def test_ignored_slug_is_silent() -> None:
    doctor = Doctor(DoctorConfig(ignore={"no-lora-adapter"}), checks=[_LossAbove])
    doctor.observe(1, {"loss": 2.0})
    assert doctor.run_phase(Phase.LOG) == []


def test_stop_on_sets_reason() -> None:
    doctor = Doctor(DoctorConfig(stop_on={"LD100"}), checks=[_LossAbove], emit=False)
    doctor.observe(1, {"loss": 2.0})
    doctor.run_phase(Phase.LOG)
    assert doctor.stop_reason is not None and doctor.stop_reason.slug == "no-lora-adapter"


def test_broken_check_is_switched_off_once(caplog: pytest.LogCaptureFixture) -> None:
    doctor = Doctor(checks=[_Broken, _LossAbove])
    with caplog.at_level(logging.WARNING, logger="lora_doctor"):
        for step in (1, 2, 3):
            doctor.observe(step, {"loss": 2.0})
            doctor.run_phase(Phase.LOG)
    assert sum("internal error in check LD110" in r.getMessage() for r in caplog.records) == 1
    assert len(doctor.findings) == 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"check_after_steps": 0}, "DoctorConfig.check_after_steps must be an integer >= 1, got 0"),
        ({"ignore": {"no-such-slug"}}, "unknown finding names ['no-such-slug']"),
        ({"scaling_low": 3.0}, "scaling_low must be <= scaling_high"),
        ({"budget_high": 2}, "DoctorConfig.budget_high must be a number in [0, 1], got 2"),
    ],
    ids=["steps-zero", "unknown-slug", "scaling-order", "budget-range"],
)
def test_config_errors_name_field_and_value(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError) as err:
        Doctor(DoctorConfig(**kwargs))  # the Doctor checks the names against its checks
    assert message in str(err.value)
