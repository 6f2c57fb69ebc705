"""docs/custom-loops.md: the Accelerate loop runs as written on one CPU process, and the doctor
in it sees the adapters' first steps."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _docs_block(marker: str) -> str:
    text = (ROOT / "docs" / "custom-loops.md").read_text(encoding="utf-8")
    found = re.search(rf"<!-- {marker} -->\n```python\n(.*?)```", text, re.S)
    assert found, f"docs/custom-loops.md has no python block after <!-- {marker} -->"
    return found.group(1)


PARAMS = "params = [p for n, p in model.named_parameters() if p.requires_grad]"


@pytest.mark.parametrize(
    ("mistake", "not_learning"),
    [(None, False), ('if p.requires_grad and "lora_A" in n]', True)],
    ids=["as-written", "optimizer-without-lora-B"],
)
def test_accelerate_loop_runs_as_written(
    tmp_path: Path, mistake: str | None, not_learning: bool
) -> None:
    code = _docs_block("accelerate-loop")
    assert PARAMS in code
    if mistake is not None:
        code = code.replace("if p.requires_grad]", mistake)
    script = tmp_path / "loop.py"
    script.write_text(code, encoding="utf-8")
    done = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(ROOT), "ACCELERATE_USE_CPU": "true"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "accelerate" / "lora_doctor.json").read_text())
    slugs = {f["slug"] for f in report["findings"]}
    assert report["run"]["global_step"] == 10  # 20 batches, 2 accumulated per optimizer step
    assert report["run"]["max_steps"] == 10
    assert ("adapter-not-learning" in slugs) is not_learning
    assert ("adapter-not-in-optimizer" in slugs) is not_learning
