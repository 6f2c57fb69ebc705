"""Multi-process behaviour: one JSON, findings logged once, per-rank readings, sharded shapes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny import torchrun

from lora_doctor.probes.dist import (
    RankReadings,
    RankSpread,
    gather_min_max,
    is_main,
    rank,
    world_size,
)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """Runs tests/dist_worker.py on 2 CPU processes (gloo) under torchrun, once for the module."""
    out = tmp_path_factory.mktemp("ranks")
    code, output = torchrun("dist_worker.py", out)
    assert code == 0, output[-4000:]
    return out, output


@pytest.mark.slow
def test_only_main_process_logs_and_writes(two_ranks: tuple[Path, str]) -> None:
    out, output = two_ranks
    reports = sorted(p.relative_to(out) for p in out.rglob("lora_doctor*.json"))
    assert reports == [Path("run/lora_doctor.json")]
    lines = [line for line in output.splitlines() if "[LD110 alpha-rank-ratio]" in line]
    assert len(lines) == 1 and lines[0].startswith("rank0 ")
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    # Both ranks diagnosed the run (rank 1 silently): the collectives stayed in step.
    assert all("alpha-rank-ratio" in r["ddp"]["findings"] for r in ranks)
    report = json.loads((out / "run" / "lora_doctor.json").read_text())
    assert report["run"]["world_size"] == 2
    assert "alpha-rank-ratio" in {f["slug"] for f in report["findings"]}


@pytest.mark.slow
def test_step_time_spread_over_ranks_is_logged(two_ranks: tuple[Path, str]) -> None:
    out, _ = two_ranks
    history = json.loads((out / "rank0.json").read_text())["ddp"]["logged"]
    train_logs = [e for e in history if "loss" in e]
    assert len(train_logs) == 3
    for entry in train_logs:
        assert 0 < entry["lora_doctor/step_seconds_min"] <= entry["lora_doctor/step_seconds_max"]


@pytest.mark.slow
def test_gather_min_max_over_two_ranks(two_ranks: tuple[Path, str]) -> None:
    out, _ = two_ranks
    for r in (0, 1):
        spread = json.loads((out / f"rank{r}.json").read_text())["gather"]
        assert spread["step_seconds"] == vars(RankSpread(1.0, 2.0, 0, 1, 2))
        assert spread["peak_bytes"] == vars(RankSpread(100.0, 200.0, 0, 1, 2))
        assert spread["only_rank1"] == vars(RankSpread(7.0, 7.0, 1, 1, 1))


@pytest.mark.slow
def test_fsdp2_dtensor_shapes_and_first_steps(two_ranks: tuple[Path, str]) -> None:
    out, _ = two_ranks
    for r in (0, 1):
        fsdp = json.loads((out / f"rank{r}.json").read_text())["fsdp2"]
        assert fsdp["param_type"] == "DTensor" and fsdp["local_shape"] == [2, 64]  # a real shard
        # True (global) shapes: A is (r, d_in), B is (d_out, r); v_proj's d_out is 2 kv heads x 16.
        assert fsdp["layers"]["model.layers.0.self_attn.q_proj"] == [[4, 64], [64, 4]]
        assert fsdp["layers"]["model.layers.1.self_attn.v_proj"] == [[4, 64], [32, 4]]
        assert fsdp["lora_params"] == 2 * (4 * 64 + 64 * 4 + 4 * 64 + 32 * 4)
        # Gradients and movement judged over the whole tensor (all-reduced over the shards).
        assert (
            fsdp["no_grad_layers"] == fsdp["b_still_zero_layers"] == fsdp["frozen_in_place"] == []
        )
        # The update's spectrum from gathered DTensors: every layer, equal to a dense SVD.
        assert fsdp["spectrum_layers"] == 4 and fsdp["spectrum_q_relative_update"] > 0
        assert fsdp["spectrum_q"] == pytest.approx(fsdp["spectrum_q_dense"], rel=1e-4, abs=1e-7)
    spectra = [
        json.loads((out / f"rank{r}.json").read_text())["fsdp2"]["spectrum_q"] for r in (0, 1)
    ]
    assert spectra[0] == spectra[1]


def test_single_process_helpers() -> None:
    assert (world_size(), rank(), is_main()) == (1, 0, True)
    spread = gather_min_max({"a": 2, "b": float("nan"), "c": None, "d": True})  # type: ignore[dict-item]
    assert spread == {"a": RankSpread(2.0, 2.0)}


def test_rank_readings_exchange_clears_the_local_readings() -> None:
    readings = RankReadings()
    readings.put("step_seconds", 0.5)
    readings.put("step_seconds", 0.25)  # the latest value wins
    assert readings.exchange() == {"step_seconds": RankSpread(0.25, 0.25)}
    assert readings.by_rank == [{"step_seconds": 0.25}]
    assert readings.exchange() == {}
