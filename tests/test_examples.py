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
@pytest.mark.parametrize(
    ("args", "fires", "quiet"),
    [
        (["--lr", "2e-5"], {"loss-plateau"}, {"adapter-not-learning"}),
        (["--lr", "2e-3"], set(), {"loss-plateau", "adapter-not-learning"}),
        (
            ["--lr", "2e-3", "--steps", "20", "--only-lora-a"],
            {"adapter-not-in-optimizer", "adapter-not-learning"},
            set(),
        ),
    ],
    ids=["mistake", "fixed", "optimizer-without-lora-B"],
)
def test_custom_loop_example(
    tmp_path: Path, args: list[str], fires: set[str], quiet: set[str]
) -> None:
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "custom_loop.py"),
            "--output-dir",
            str(tmp_path),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    found = set(_findings(tmp_path / "lora_doctor.json"))
    assert fires <= found
    assert not quiet & found
    assert "The diagnosis is in" in done.stdout
