"""Style rules that CI keeps by running the test suite: ruff's complexity limit (C90)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(importlib.util.find_spec("ruff") is None, reason="ruff is in the [dev] extra")
def test_no_function_above_complexity_15() -> None:
    """pyproject.toml sets ruff's mccabe max-complexity to 15 for the whole package."""
    command = [
        sys.executable,
        "-m",
        "ruff",
        "check",
        "--select",
        "C90",
        "--output-format",
        "concise",
    ]
    result = subprocess.run(
        [*command, "lora_doctor"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
