"""A rank that dies still leaves a report: its own, and the main process's when it hears of it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from tiny import torchrun


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Runs tests/dist_crash_worker.py on 2 CPU processes (gloo) under torchrun, once."""
    out = tmp_path_factory.mktemp("crash")
    code, output = torchrun("dist_crash_worker.py", out)
    assert code == 0, output[-4000:]
    return out


def _died(path: Path) -> dict[str, Any]:
    (finding,) = [
        f for f in json.loads(path.read_text())["findings"] if f["slug"] == "training-died"
    ]
    return finding  # type: ignore[no-any-return]


@pytest.mark.slow
def test_failing_rank_leaves_its_own_report(ranks: Path) -> None:
    error = json.loads((ranks / "rank1.json").read_text())["rank1-dies"]
    assert error == {
        "type": "IndexError",
        "message": "index out of range in self",
        "raised_in": "embedding",
    }
    died = _died(ranks / "rank1-dies" / "lora_doctor.rank1.json")
    assert died["evidence"]["signature"] == "token-id-past-embedding"
    assert "the tokenizer has 47 tokens but the input embedding has 45 rows" in died["message"]
    steps = " ".join(died["recommendation"]["steps"])  # the fix is the recommendation's
    assert "model.resize_token_embeddings(len(tokenizer))" in steps
    assert died["step"] == 1


@pytest.mark.slow
def test_main_process_hears_of_the_dead_rank(ranks: Path) -> None:
    error = json.loads((ranks / "rank0.json").read_text())["rank1-dies"]
    assert error["type"] == "RuntimeError" and "Connection closed by peer" in error["message"]
    died = _died(ranks / "rank1-dies" / "lora_doctor.json")
    assert died["evidence"]["signature"] == "collective-failed"
    assert (
        "Rank 1 died first: Training died at step 1: token ids past the embedding"
        in died["message"]
    )
    assert "lora_doctor.rank1.json" in died["message"]
    reports = sorted(p.name for p in (ranks / "rank1-dies").glob("lora_doctor*.json"))
    assert reports == ["lora_doctor.json", "lora_doctor.rank1.json"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["lora_doctor.json", "lora_doctor.rank1.json"])
def test_reentrant_checkpointing_under_ddp(ranks: Path, name: str) -> None:
    """Both ranks die of it; each leaves a report with the cause and the fix."""
    for rank in (0, 1):
        error = json.loads((ranks / f"rank{rank}.json").read_text())["ddp-reentrant"]
        assert error["type"] == "RuntimeError"
        assert error["message"].startswith("Expected to mark a variable ready only once")
    died = _died(ranks / "ddp-reentrant" / name)
    assert died["evidence"]["signature"] == "ddp-reentrant-checkpointing"
    assert "gradient checkpointing is on with use_reentrant=True" in died["message"]
    assert "DistributedDataParallel over 2 processes" in died["message"]
    assert died["recommendation"]["config_changes"] == {
        "activation_checkpointing": True,
        "activation_checkpointing_kwargs": {"use_reentrant": False},
        "ddp_find_unused_parameters": False,
    }
