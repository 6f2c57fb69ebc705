"""LoraDoctorCallback's options: defaults, precedence over the config, clear errors."""

from __future__ import annotations

import pytest

from lora_doctor import DoctorConfig, LoraDoctorCallback


def test_no_arguments() -> None:
    cb = LoraDoctorCallback()
    assert cb.config == DoctorConfig()
    assert cb.report_path is None


def test_config_as_dict_of_fields() -> None:
    cb = LoraDoctorCallback(config={"check_after_steps": 5, "ignore": ["alpha-rank-ratio"]})
    assert cb.config == DoctorConfig(check_after_steps=5, ignore={"alpha-rank-ratio"})


def test_named_options_override_config() -> None:
    cfg = DoctorConfig(check_after_steps=7, ignore={"alpha-rank-ratio"})
    cb = LoraDoctorCallback(config=cfg, check_after_steps=3, stop_on={"LD110"})
    assert cb.config.check_after_steps == 3
    assert cb.config.ignore == {"alpha-rank-ratio"}
    assert cb.config.stop_on == {"LD110"}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"ignore": {"not-a-slug"}},
            "DoctorConfig.ignore has unknown finding names ['not-a-slug']",
        ),
        ({"stop_on": 5}, "DoctorConfig.stop_on must be a set of finding slugs or codes, got 5"),
        ({"check_after_steps": 0}, "check_after_steps must be an integer >= 1, got 0"),
        ({"check_after_steps": 1.5}, "check_after_steps must be an integer >= 1, got 1.5"),
        ({"report_path": 3}, "report_path=...) must be a file path"),
        ({"report_path": True}, "report_path=...) must be a file path"),
        ({"config": "strict"}, "config=...) must be a lora_doctor.DoctorConfig (or a dict"),
        ({"config": {"nope": 1}}, "config=...) has unknown DoctorConfig fields ['nope']"),
    ],
    ids=[
        "unknown-slug",
        "stop-on-int",
        "steps-zero",
        "steps-float",
        "path-int",
        "path-true",
        "config-str",
        "config-dict-unknown-field",
    ],
)
def test_bad_options_raise_clear_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError) as err:
        LoraDoctorCallback(**kwargs)
    assert message in str(err.value)
