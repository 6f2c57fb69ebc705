"""The examples and the docs' code run as written, and say what they claim."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _docs_block(page: str, marker: str) -> str:
    """The python block after ``<!-- marker -->`` in ``page`` (a path from the repository root)."""
    text = (ROOT / page).read_text(encoding="utf-8")
    found = re.search(rf"<!-- {marker} -->\n```python\n(.*?)```", text, re.S)
    assert found, f"{page} has no python block after <!-- {marker} -->"
    return found.group(1)


def _findings(report: Path) -> dict[str, dict]:
    return {f["slug"]: f for f in json.loads(report.read_text())["findings"]}


@pytest.mark.slow
def test_docs_custom_loop_runs_as_written(tmp_path: Path) -> None:
    script = tmp_path / "loop.py"
    script.write_text(_docs_block("docs/custom-loops.md", "custom-loop"), encoding="utf-8")
    done = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    found = _findings(tmp_path / "out" / "loop" / "lora_doctor.json")
    stuck = found["loss-at-chance"]  # the loss stays at ln(64): nothing is learned
    # LoRA's usual rate for this 64-wide model (a 768-wide model's, the narrowest the sources cover)
    assert stuck["recommendation"]["config_changes"] == {"learning_rate": 4.6e-4}
    assert "Most likely cause: learning rate too low for LoRA" in stuck["message"]
    assert "loss-plateau" not in found


@pytest.mark.slow
def test_docs_apply_fix_runs_as_written(tmp_path: Path) -> None:
    """docs/apply-fix.md's fix loop: the diagnosis applied, the run from scratch clearly better."""
    script = tmp_path / "apply.py"
    script.write_text(_docs_block("docs/apply-fix.md", "apply-fix"), encoding="utf-8")
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
    ("args", "fires", "quiet"),
    [
        (["--lr", "2e-5"], {"loss-at-chance"}, {"loss-plateau", "adapter-not-learning"}),
        (["--lr", "2e-3"], set(), {"loss-at-chance", "loss-plateau", "adapter-not-learning"}),
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


def _quickstart(out: Path, *options: str) -> str:
    """Runs examples/quickstart.py into ``out``; returns its standard output."""
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "quickstart.py"),
            "--output-dir",
            str(out),
            *options,
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},  # a tiny model: threads only contend
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow
def test_quickstart_mistake_is_named_and_the_doctors_fix_removes_it(tmp_path: Path) -> None:
    """The quickstart's mistake (lora_alpha=1 at r=16) keeps its loss where it started (it never
    falls 5%: loss-at-chance's "never fell", and no plateau beside it); the doctor names the alpha
    as the most likely cause; the script applies the diagnosis (Diagnosis.apply), trains again from
    step 0 and the loss falls, with nothing left above information."""
    out = _quickstart(tmp_path)
    found = _findings(tmp_path / "lora_doctor.json")
    assert found["alpha-rank-ratio"]["severity"] == "warning"
    assert "loss-plateau" not in found
    stuck = found["loss-at-chance"]
    top = stuck["evidence"]["causes"][0]
    assert (top["cause"], top["verdict"]) == ("alpha-too-small", "supported")
    assert "Most likely cause: alpha scales the update down" in stuck["message"]
    assert stuck["recommendation"]["config_changes"] == {"lora_alpha": 32}
    assert "LoraConfig.lora_alpha=32  [LD208 loss-at-chance]" in out
    both = re.search(r"Final training loss: ([\d.]+) with the mistake, ([\d.]+) with the fix", out)
    assert both, out
    stalled, fixed = float(both.group(1)), float(both.group(2))
    assert fixed < 0.6 * stalled, (fixed, stalled)
    fixed_found = _findings(tmp_path / "fixed" / "lora_doctor.json")
    assert not {f for f, v in fixed_found.items() if v["severity"] != "info"}, fixed_found


@pytest.mark.slow
def test_quickstart_set_and_no_fix(tmp_path: Path) -> None:
    """``--set`` applies a change by hand; ``--no-fix`` trains once."""
    out = _quickstart(tmp_path, "--set", "lora_alpha=32", "--no-fix")
    assert "with the fix" not in out and not (tmp_path / "fixed").exists()
    assert not {
        f for f, v in _findings(tmp_path / "lora_doctor.json").items() if v["severity"] != "info"
    }
