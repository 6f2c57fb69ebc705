"""The diagnosis file: strict JSON, the shipped schema, atomic writes, reading back."""

from __future__ import annotations

import json
import math
from pathlib import Path

import jsonschema
import pytest

from lora_doctor.facts import AdapterFacts, RunFacts
from lora_doctor.findings import Finding, Recommendation, Severity
from lora_doctor.report import Diagnosis, load_schema, write_json_atomic


def _diagnosis() -> Diagnosis:
    facts = RunFacts(
        has_lora=True,
        adapters={"default": AdapterFacts(r=8, lora_alpha=16)},
        max_steps=400,
        extra={"peak": math.inf},
    )
    finding = Finding(
        code="LD201",
        slug="loss-plateau",
        severity=Severity.WARNING,
        step=80,
        title="Training loss has been flat since step 40",
        message="slope -1e-5 per step against noise 0.02",
        evidence={"slope": float("nan"), "window": (40, 80)},
        recommendation=Recommendation(
            "Rank 8 looks too small", ("Stop training now",), {"r": 16}, True
        ),
    )
    return Diagnosis.build(facts, [finding], source="live", global_step=120)


def test_json_is_strict_and_matches_schema(tmp_path: Path) -> None:
    path = tmp_path / "out" / "lora_doctor.json"
    _diagnosis().to_json(path)
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    data = json.loads(text)
    jsonschema.validate(data, load_schema())
    assert data["findings"][0]["evidence"]["slope"] is None
    assert data["run"]["extra"]["peak"] is None
    assert data["run"]["adapters"]["default"]["r"] == 8


def test_round_trip_tolerates_unknown_and_missing_keys() -> None:
    data = _diagnosis().to_dict()
    data["future_key"] = {"x": 1}
    data["findings"][0]["new_field"] = 3
    del data["findings"][0]["evidence"]
    back = Diagnosis.from_dict(data)
    assert back.findings[0].slug == "loss-plateau"
    assert back.findings[0].recommendation is not None
    assert back.findings[0].recommendation.config_changes == {"r": 16}
    assert back.worst is Severity.WARNING


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d.update(schema_version=2),
        lambda d: d["findings"][0].update(severity="fatal"),
        lambda d: d["findings"][0].update(code="X1"),
        lambda d: d.pop("run"),
    ],
    ids=["version", "severity", "code", "no-run"],
)
def test_schema_rejects_malformed(mutate) -> None:
    data = _diagnosis().to_dict()
    mutate(data)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(data, load_schema())


def test_atomic_write_leaves_old_file_on_error(tmp_path: Path) -> None:
    target = tmp_path / "lora_doctor.json"
    write_json_atomic(target, '{"a": 1}')

    with pytest.raises(TypeError):
        write_json_atomic(target, 5)  # type: ignore[arg-type]
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["lora_doctor.json"]


def test_summary_lists_worst_first() -> None:
    d = _diagnosis()
    d.findings.append(
        Finding("LD100", "no-lora-adapter", Severity.INFO, None, "No LoRA", "none found")
    )
    lines = d.summary().splitlines()
    assert "2 finding(s) after step 120" in lines[0]
    assert "WARNING" in lines[1] and "INFO" in lines[3]


def _plateau_diagnosis() -> dict:
    """A real diagnosis whose plateau carries its ranked causes (low learning rate supported: the
    adapter config says the run trains LoRA)."""
    import numpy as np

    from lora_doctor.offline import diagnose

    t = np.arange(1, 301) / 300
    loss = 2.0 + 1.5 * np.exp(-t / 0.03) + np.random.default_rng(0).normal(0, 0.04, 300)
    log = [{"step": i + 1, "loss": float(v), "learning_rate": 1e-5} for i, v in enumerate(loss)]
    lora = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}
    return diagnose({"max_steps": 300, "log_history": log}, lora).to_dict()


def test_causes_match_the_schema() -> None:
    data = _plateau_diagnosis()
    (plateau,) = [f for f in data["findings"] if f["slug"] == "loss-plateau"]
    causes = plateau["evidence"]["causes"]
    assert causes[0]["cause"] == "learning-rate-too-low" and causes[0]["verdict"] == "supported"
    jsonschema.validate(data, load_schema())
    causes[0]["verdict"] = "probable"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(data, load_schema())


def test_the_schema_names_the_two_sources() -> None:
    data = _plateau_diagnosis()
    assert data["source"] == "offline"
    jsonschema.validate(data, load_schema())
    data["source"] = "replayed"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(data, load_schema())
