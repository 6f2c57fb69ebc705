"""The examples and the README's code run as written, and say what they claim."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _readme_block(marker: str) -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    found = re.search(rf"<!-- {marker} -->\n```python\n(.*?)```", text, re.S)
    assert found, f"README has no python block after <!-- {marker} -->"
    return found.group(1)


def _findings(report: Path) -> dict[str, dict]:
    return {f["slug"]: f for f in json.loads(report.read_text())["findings"]}


@pytest.mark.slow
def test_readme_custom_loop_runs_as_written(tmp_path: Path) -> None:
    script = tmp_path / "loop.py"
    script.write_text(_readme_block("custom-loop"), encoding="utf-8")
    done = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    found = _findings(tmp_path / "out" / "loop" / "lora_doctor.json")
    plateau = found["loss-plateau"]
    assert plateau["recommendation"]["config_changes"] == {"learning_rate": 2e-4}
    assert "Most likely cause: learning rate too low for LoRA" in plateau["message"]


@pytest.mark.slow
def test_readme_apply_fix_runs_as_written(tmp_path: Path) -> None:
    """The README's fix loop: the diagnosis applied, the run from scratch clearly better."""
    script = tmp_path / "apply.py"
    script.write_text(_readme_block("apply-fix"), encoding="utf-8")
    done = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "LoraConfig.lora_alpha=32  [LD110 alpha-rank-ratio]" in done.stdout
    found = re.search(r"final loss ([\d.]+) with the mistake, ([\d.]+) with the fix", done.stdout)
    assert found, done.stdout[-2000:]
    before, after = float(found.group(1)), float(found.group(2))
    assert after <= 0.85 * before, (before, after)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("lr", "plateau"), [("2e-5", True), ("2e-3", False)], ids=["mistake", "fixed"]
)
def test_custom_loop_example(tmp_path: Path, lr: str, plateau: bool) -> None:
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "custom_loop.py"),
            "--output-dir",
            str(tmp_path),
            "--lr",
            lr,
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    found = _findings(tmp_path / "lora_doctor.json")
    assert ("loss-plateau" in found) is plateau
    assert "The diagnosis is in" in done.stdout
