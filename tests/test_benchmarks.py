"""The fault benchmark's scorer, a quick real run of it, and the overhead script's CPU mode."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.faults.score import (
    AMBIENT,
    ANY,
    Finding,
    RunResult,
    format_table,
    summarize,
)


def _run(fault: str = "NaN injected", **kw) -> RunResult:
    kw.setdefault("must", () if fault == "healthy" else ("non-finite-values|zero-loss",))
    kw.setdefault("must_not", (ANY,) if fault == "healthy" else ("overfit",))
    return RunResult(kw.pop("scenario", "s"), fault, "llama", 0, **kw)


def F(slug: str, severity: str = "warning", step: int = 0) -> Finding:
    return Finding(slug, severity, step)


@pytest.mark.parametrize(
    ("run", "detected", "alarms", "step"),
    [
        (_run(findings=[F("non-finite-values", "error", 42)], onset=40), True, [], 42),
        (_run(findings=[F("zero-loss", "info", 45)], onset=40), True, [], 45),
        (_run(findings=[F("loss-plateau", "warning", 30)]), False, [], None),
        (_run(findings=[F("zero-loss", step=50), F("overfit", step=60)]), True, ["overfit"], 50),
        (_run(findings=[F("overfit", "info", 60), F("zero-loss", step=50)]), True, [], 50),
        (_run(must=("a", "b|c"), findings=[F("a", step=5), F("c", step=9)]), True, [], 9),
        (_run(must=("a", "b|c"), findings=[F("a", step=5)]), False, [], None),
        (_run("healthy", findings=[]), True, [], None),
        (_run("healthy", findings=[F("loss-plateau", step=20)]), True, ["loss-plateau"], None),
        (_run("healthy", findings=[F("rank-underused", "info", 90)]), True, [], None),
        (_run("healthy", findings=[F(next(iter(AMBIENT)), "warning")]), True, [], None),
    ],
    ids=[
        "found-error",
        "found-info-counts-for-recall",
        "missed",
        "found-with-wrong-finding",
        "wrong-finding-at-info-is-no-alarm",
        "two-groups-latest-first-match",
        "one-group-missing",
        "healthy-clean",
        "healthy-warning-is-alarm",
        "healthy-info-is-no-alarm",
        "healthy-ambient-is-no-alarm",
    ],
)
def test_run_scoring(run: RunResult, detected: bool, alarms: list[str], step: int | None) -> None:
    assert run.detected is detected  # a healthy run must find nothing, so it is vacuously met
    assert run.false_alarms == alarms
    assert run.detection_step == step


def test_summary_recall_delays_and_rate() -> None:
    results = [
        _run(scenario="nan", findings=[F("non-finite-values", "error", 41)], onset=40),
        _run(scenario="nan", findings=[F("zero-loss", "warning", 50)], onset=40),
        _run(
            scenario="nan", findings=[], onset=40, error="RuntimeError: boom", report_written=False
        ),
        _run("healthy", scenario="ok", findings=[F("loss-plateau", step=30)]),
        _run("healthy", scenario="ok"),
        _run(scenario="gpu", skipped="needs a CUDA GPU"),
    ]
    nan, ok, gpu = summarize(results)
    assert (nan.runs, nan.detected, nan.recall) == (3, 2, pytest.approx(2 / 3))
    assert (nan.delays, nan.detection_steps, nan.no_report, nan.errors) == (
        [1, 10],
        [41, 50],
        1,
        ["RuntimeError"],
    )
    assert (ok.runs, ok.false_alarm_runs, ok.false_alarm_slugs, ok.recall) == (
        2,
        1,
        ["loss-plateau"],
        None,
    )
    assert (gpu.runs, gpu.skipped) == (0, "needs a CUDA GPU")
    table = format_table([nan, ok, gpu], unregistered={"zero-loss"})
    assert "0.67 (2/3)" in table
    assert "false-alarm rate on healthy runs: 0.50 (1/2)" in table
    assert "no check yet for zero-loss" in table
    assert "skipped" in table and "needs a CUDA GPU" in table
    assert "no lora_doctor.json in 1" in table and "died: RuntimeError" in table


def test_saved_results_score_the_same(tmp_path: Path) -> None:
    """Results split over two processes and saved can be scored together (``--score``)."""
    import json
    from dataclasses import asdict

    from benchmarks.faults.bench import load_results

    a = [_run(scenario="nan-injected", findings=[F("zero-loss", "warning", 45)], onset=40)]
    b = [_run("healthy", scenario="healthy", findings=[F("overfit", step=60)])]
    for name, part in (("a", a), ("b", b)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps([asdict(r) for r in part]))
    loaded = load_results([tmp_path / "a" / "results.json", tmp_path / "b" / "results.json"])
    assert [r.scenario for r in loaded] == ["healthy", "nan-injected"]  # the benchmark's order
    assert format_table(summarize(loaded)) == format_table(summarize(b + a))


def test_unknown_scenario_is_named() -> None:
    from benchmarks.faults.bench import select

    with pytest.raises(ValueError, match=r"unknown scenario\(s\) \['nope'\]"):
        select(quick=False, only=["nope"])
    assert {s.name for s in select(quick=True)} < {s.name for s in select(quick=False)}


@pytest.fixture
def one_thread():
    """One torch thread, as the benchmarks' command lines use: on a busy 2-core machine two
    threads spin against each other and a 3 s run takes minutes."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_quick_benchmark_scores_real_runs(tmp_path: Path) -> None:
    """The quick subset trains for real; the scorer's verdicts follow the reports the runs wrote."""
    from benchmarks.faults.bench import collect, select

    scenarios = select(quick=True)
    results = collect(scenarios, ["llama"], [0], tmp_path, progress=False)
    assert [r.scenario for r in results] == [s.name for s in scenarios]
    for r in results:
        assert r.internal_errors == [], r.scenario
        assert r.report_written, r.scenario
        assert r.detected == all(
            any(f.slug in group.split("|") for f in r.findings) for group in r.must
        )
    summaries = summarize(results)
    table = format_table(summaries)
    for s in scenarios:
        assert s.name in table
    healthy = next(s for s in summaries if s.healthy)
    assert healthy.runs == 1 and healthy.recall is None


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_overhead_script_cpu_small(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The in-run design on CPU: one gated Trainer run, the spectrum read at every planned step
    (off blocks included), every hook timed."""
    import json

    from benchmarks import overhead

    argv = ["--device", "cpu", "--small", "--lengths", "40", "--block", "4", "--seq", "16"]
    overhead.main([*argv, "--time-budget", "none", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "\n   40    1 with " in out and "\n   40    1 without " in out
    run = json.loads((tmp_path / "overhead.json").read_text())["runs"][0]
    assert [(b["first"], b["on"]) for b in run["blocks"]] == [
        (4 * i + 1, i % 2 == 0) for i in range(10)
    ]
    assert [b["final"] for b in run["blocks"]] == [False] * 9 + [True]
    # the doctor reads at its planned steps (every 4), in the off blocks too, all 14 layers
    assert sorted(int(k) for k in run["reading_s"]) == list(range(4, 41, 4))
    assert run["layers_per_reading"] == [14] * 10 and run["planned"] == 10
    hooked = {int(k) for k in run["hook_s"]}
    assert {overhead.BEGIN, overhead.END} <= hooked
    assert {s for s in range(1, 41) if (s - 1) // 4 % 2 == 0} <= hooked  # every on-step
    assert hooked & set(range(1, 41)) <= {s for s in range(1, 41) if (s - 1) // 4 % 2 == 0} | {
        *range(4, 41, 4)
    }  # off-steps only where a reading was planned


def test_overhead_parts_and_extrapolation() -> None:
    """A scripted run of 12 steps in blocks of 2: the pair, the reading block's excess and the
    shares with and without the spectrum, by hand."""
    from benchmarks.overhead import END, Block, RunRecord, summarize

    seconds = [0.3, 0.2, 0.21, 0.2, 0.25, 0.3]  # block 4 holds the reading at step 10
    blocks = [Block(i, i % 2 == 0, 2 * i + 1, 2 * i + 2, seconds[i]) for i in range(6)]
    blocks[-1].final = True
    hooks = {0: 0.05, 1: 0.001, 2: 0.002, 5: 5e-4, 6: 5e-4, 9: 5e-4, 10: 0.0305, END: 0.02}
    record = RunRecord(
        steps=12,
        rep=0,
        block=2,
        wall_s=2.5,
        blocks=blocks,
        hook_s=hooks,
        waited_s={10: 0.0, END: 0.0},
        spectrum_begin_s=0.02,
        reading_s={10: 0.03, END: 0.01},
        layers_per_reading=[40, 112],
        layers_total=112,
        planned=2,
    )
    with_spectrum, without = summarize([record], 0.005)
    assert (with_spectrum.pairs, with_spectrum.step_ms) == (1, pytest.approx(100.0))
    assert with_spectrum.ratio_median == pytest.approx(0.05)
    assert with_spectrum.hook_step_us == pytest.approx(500.0)
    # one-time 0.073 s (begin, lead-in, end), the reading step's 0.0305, 9 steady steps of 0.5 ms
    assert with_spectrum.share_in_hook == pytest.approx(0.108 / 2.5)
    # less the spectrum's start-up and final reading (0.03 s); its step costs a steady one
    assert without.share_in_hook == pytest.approx(0.048 / 2.5)
    # 5% of 10 steps of 0.1 s, the reading block's 0.04 s over the on blocks' median, one-time
    assert with_spectrum.share_step_clock == pytest.approx(0.163 / 2.5)
    assert without.share_step_clock == pytest.approx(0.093 / 2.5)
    assert with_spectrum.readings == "2 of 2, 40-112 of 112 layers" and without.readings == "-"
