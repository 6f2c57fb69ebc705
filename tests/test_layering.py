"""The engine imports without torch, transformers or peft: the layering DESIGN.md asks for."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

ENGINE = [
    "lora_doctor.findings",
    "lora_doctor.history",
    "lora_doctor.facts",
    "lora_doctor.config",
    "lora_doctor.checks",
    "lora_doctor.engine",
    "lora_doctor.report",
    "lora_doctor.fix",
    "lora_doctor.sweep",
    "lora_doctor.cli",
    "lora_doctor.offline",
    "lora_doctor.plot",
]
BLOCKED = ["torch", "transformers", "peft", "accelerate", "trl", "deepspeed", "bitsandbytes"]

#: Makes every import of a blocked package fail, as on a machine without them.
BLOCKER = textwrap.dedent(
    f"""
    import importlib, importlib.abc, pkgutil, sys

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {BLOCKED!r}:
                raise ImportError(f"blocked import of {{name}}")
            return None

    sys.meta_path.insert(0, Block())
    for name in {BLOCKED!r}:
        sys.modules.pop(name, None)
    """
)

ENGINE_SCRIPT = BLOCKER + textwrap.dedent(
    f"""
    import lora_doctor.checks as checks
    for info in pkgutil.iter_modules(checks.__path__, "lora_doctor.checks."):
        importlib.import_module(info.name)
    for name in {ENGINE!r}:
        importlib.import_module(name)

    from lora_doctor.checks import Phase
    from lora_doctor.engine import Doctor
    from lora_doctor.facts import AdapterFacts, RunFacts

    facts = RunFacts(has_lora=True, adapters={{"default": AdapterFacts(r=16, lora_alpha=8)}})
    doctor = Doctor(facts=facts, emit=False)
    slugs = [f.slug for f in doctor.run_phase(Phase.SETUP)]
    doctor.diagnosis("offline").to_dict()
    print("FIX", doctor.diagnosis("offline").apply().config_changes())
    print("SLUGS", slugs)
    print("LOADED", sorted(m for m in sys.modules if m.split(".")[0] in {BLOCKED!r}))
    """
)

FRAMEWORK_SCRIPT = BLOCKER + textwrap.dedent(
    """
    for name in ("lora_doctor.probes.model", "lora_doctor.integrations.hf"):
        try:
            importlib.import_module(name)
            print("IMPORTED", name)
        except ImportError as err:
            print("BLOCKED", name, err)
    """
)


def run_script(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def test_engine_imports_and_runs_with_frameworks_blocked() -> None:
    result = run_script(ENGINE_SCRIPT)
    assert result.returncode == 0, result.stderr
    assert "SLUGS ['alpha-rank-ratio']" in result.stdout
    assert "FIX {'LoraConfig': {'lora_alpha': 32}}" in result.stdout
    assert "LOADED []" in result.stdout


def test_blocker_bites_on_framework_modules() -> None:
    """The same blocker stops the modules that do need torch (so the test above can fail)."""
    result = run_script(FRAMEWORK_SCRIPT)
    assert result.returncode == 0, result.stderr
    assert "BLOCKED lora_doctor.probes.model blocked import of torch" in result.stdout
    assert "BLOCKED lora_doctor.integrations.hf blocked import of" in result.stdout
