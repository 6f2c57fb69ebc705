"""learning-rate-too-high and update-too-large in real Trainer runs on a tiny Llama (CPU, seconds
each)."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
from tiny import Rows, tiny_args, tiny_peft
from transformers import Trainer

from lora_doctor import DoctorConfig, LoraDoctorCallback
from lora_doctor.report import load_schema


def _run(tmp_path: Path, learning_rate: float) -> dict:
    model = tiny_peft(r=8, lora_alpha=16)
    callback = LoraDoctorCallback(config=DoctorConfig(spectrum_every_steps=10))
    args = tiny_args(
        tmp_path, max_steps=20, learning_rate=learning_rate, lr_scheduler_type="constant"
    )
    Trainer(model=model, args=args, train_dataset=Rows(64, 16), callbacks=[callback]).train()
    report = json.loads((tmp_path / "lora_doctor.json").read_text(encoding="utf-8"))
    jsonschema.validate(report, load_schema())
    return report


@pytest.mark.slow
@pytest.mark.parametrize(
    ("learning_rate", "expected"),
    [
        (2e-4, {}),
        (0.05, {"learning-rate-too-high": "warning", "update-too-large": "warning"}),
        (0.5, {"learning-rate-too-high": "error", "update-too-large": "warning"}),
    ],
    ids=["usual-rate", "rate-0.05", "rate-0.5"],
)
def test_learning_rate_and_update_size_in_a_real_run(
    tmp_path: Path, learning_rate: float, expected: dict[str, str]
) -> None:
    report = _run(tmp_path, learning_rate)
    found = {
        f["slug"]: f
        for f in report["findings"]
        if f["slug"] in ("learning-rate-too-high", "update-too-large")
    }
    assert {slug: f["severity"] for slug, f in found.items()} == expected
    if "learning-rate-too-high" in found:
        f = found["learning-rate-too-high"]
        assert (
            f["evidence"]["optimizer_family"] == "adam" and not f["evidence"]["optimizer_assumed"]
        )
        assert f["recommendation"]["config_changes"] == {"learning_rate": 2e-4}
    if "update-too-large" in found:
        f = found["update-too-large"]
        assert f["evidence"]["median_relative_update"] >= 2.0
        top = f["evidence"]["causes"][0]
        assert (top["cause"], top["verdict"]) == ("learning-rate-too-high", "supported")
        # the loss of this run stays flat: no rate of its own to follow, the usual one
        assert f["recommendation"]["config_changes"] == {"learning_rate": 2e-4}
