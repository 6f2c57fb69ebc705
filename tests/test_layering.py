"""The engine imports without torch, transformers or peft: the layering DESIGN.md asks for."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

ENGINE = [
    "lora_doctor.findings",
    "lora_doctor.history",
    "lora_doctor.facts",
    "lora_doctor.config",
    "lora_doctor.checks",
    "lora_doctor.engine",
    "lora_doctor.report",
    "lora_doctor.sweep",
    "lora_doctor.cli",
    "lora_doctor.offline",
    "lora_doctor.plot",
]
BLOCKED = ["torch", "transformers", "peft", "accelerate", "trl", "deepspeed", "bitsandbytes"]

SCRIPT = textwrap.dedent(
    """
    import importlib, importlib.abc, pkgutil, sys

    BLOCKED = {blocked!r}

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"blocked import of {{name}}")
            return None

    sys.meta_path.insert(0, Block())
    for name in BLOCKED:
        sys.modules.pop(name, None)

    import lora_doctor.checks as checks
    for info in pkgutil.iter_modules(checks.__path__, "lora_doctor.checks."):
        importlib.import_module(info.name)
    for name in {engine!r}:
        importlib.import_module(name)

    from lora_doctor.checks import Phase
    from lora_doctor.engine import Doctor
    from lora_doctor.facts import AdapterFacts, RunFacts

    facts = RunFacts(has_lora=True, adapters={{"default": AdapterFacts(r=16, lora_alpha=8)}})
    doctor = Doctor(facts=facts, emit=False)
    slugs = [f.slug for f in doctor.run_phase(Phase.SETUP)]
    doctor.diagnosis("offline").to_dict()
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    print("SLUGS", slugs)
    print("LOADED", loaded)
    """
)


def run_blocked(blocked: list[str]) -> subprocess.CompletedProcess[str]:
    code = SCRIPT.format(blocked=blocked, engine=ENGINE)
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def test_engine_imports_and_runs_with_frameworks_blocked() -> None:
    result = run_blocked(BLOCKED)
    assert result.returncode == 0, result.stderr
    assert "SLUGS ['alpha-rank-ratio']" in result.stdout
    assert "LOADED []" in result.stdout


@pytest.mark.parametrize(
    "module", ["lora_doctor.probes.model", "lora_doctor.integrations.hf"], ids=["probe", "callback"]
)
def test_blocker_bites_on_framework_modules(module: str) -> None:
    """The same blocker stops the modules that do need torch (so the test above can fail)."""
    code = SCRIPT.format(blocked=BLOCKED, engine=[*ENGINE, module])
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode != 0
    assert (
        "blocked import of torch" in result.stderr
        or "blocked import of transformers" in result.stderr
    )
