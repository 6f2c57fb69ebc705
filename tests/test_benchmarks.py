"""The fault benchmark's scorer, a quick real run of it, and the overhead script's CPU mode."""

from __future__ import annotations

from pathlib import Path
from typing import Any

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


def C(slug: str, cause: str, verdict: str = "supported", step: int = 10) -> Finding:
    """A finding that ranks causes, its first-ranked one ``cause``."""
    return Finding(slug, "warning", step, cause, verdict)


_LR = "learning-rate-too-high"


@pytest.mark.parametrize(
    ("run", "named", "right"),
    [
        (_run(findings=[C("non-finite-values", _LR)], cause=_LR), _LR, True),
        (_run(findings=[C("non-finite-values", "bad-batch")], cause=_LR), "bad-batch", False),
        (_run(findings=[C("non-finite-values", _LR, "open")], cause=_LR), None, False),
        (_run(findings=[C("non-finite-values", _LR, "ruled-out")], cause=_LR), None, False),
        (_run(findings=[F("zero-loss", "error", 5)], cause="forward-numerics"), "zero-loss", False),
        (
            _run(findings=[F("zero-loss", "info", 5)], cause="data-or-task|zero-loss"),
            "zero-loss",
            True,
        ),
        (_run(findings=[F("loss-plateau")], cause=_LR), None, False),
        (
            _run(findings=[C("loss-divergence", _LR)], cause=_LR),
            None,
            False,
        ),
        (
            _run(findings=[F("zero-loss", step=5), C("non-finite-values", _LR, step=9)], cause=_LR),
            _LR,
            True,
        ),
        (
            _run(
                findings=[C("non-finite-values", _LR, step=9), C("zero-loss", "x", step=5)],
                cause="x",
            ),
            "x",
            True,
        ),
        (
            _run(
                must=("alpha-rank-ratio", "loss-plateau"),
                findings=[
                    F("alpha-rank-ratio", step=0),
                    C("loss-plateau", "alpha-too-small", step=50),
                ],
                cause="alpha-too-small",
            ),
            "alpha-too-small",
            True,
        ),
        (
            _run(
                must=("alpha-rank-ratio", "loss-plateau"),
                findings=[F("alpha-rank-ratio", step=0), C("loss-at-chance", "alpha-too-small")],
                cause="alpha-too-small",
            ),
            "alpha-rank-ratio",
            False,
        ),
        (
            _run(must=("a|b",), findings=[F("b", step=3), F("a", step=7)], cause="a|b"),
            "b",
            True,
        ),
        (_run(findings=[C("non-finite-values", _LR)]), _LR, None),
        (_run("healthy", findings=[C("loss-plateau", _LR)]), None, None),
    ],
    ids=[
        "ranked-supported-right",
        "ranked-supported-wrong",
        "ranked-open-names-none",
        "ranked-ruled-out-names-none",
        "self-named-wrong",
        "self-named-at-info-right",
        "finding-outside-must-not-read",
        "ranked-outside-must-not-read",
        "ranked-read-before-earlier-self-named",
        "first-ranked-by-step",
        "symptom-over-setup-finding",
        "symptom-missed-setup-finding-read",
        "multi-slug-group-first-by-step",
        "unlabelled-no-verdict",
        "healthy-no-verdict",
    ],
)
def test_named_cause(run: RunResult, named: str | None, right: bool | None) -> None:
    assert run.named_cause == named
    assert run.cause_right is right


def test_summary_cause_accuracy_and_table() -> None:
    label = "learning-rate-too-high"
    results = [
        _run(scenario="lr", findings=[C("non-finite-values", label)], cause=label),
        _run(scenario="lr", findings=[C("non-finite-values", label)], cause=label),
        _run(scenario="lr", findings=[C("non-finite-values", label, "open")], cause=label),
        _run(scenario="lr", findings=[], cause=label),
        _run(
            scenario="rs",
            must=("rank-changed-on-resume",),
            cause="rank-changed-on-resume",
            findings=[F("rank-changed-on-resume", "error", 20)],
        ),
        _run(scenario="old", findings=[F("non-finite-values", "error", 41)]),
        _run("healthy", scenario="ok"),
        _run(scenario="gpu", skipped="needs a CUDA GPU", cause="oom-risk"),
    ]
    lr, rs, old, ok, gpu = summarize(results)
    assert (lr.labelled, lr.cause_right, lr.cause_accuracy) == (4, 2, 0.5)
    assert lr.wrong_causes == ["none"]
    assert (rs.cause_accuracy, old.cause_accuracy, ok.cause_accuracy) == (1.0, None, None)
    assert (gpu.labelled, gpu.cause_accuracy) == (0, None)
    table = format_table([lr, rs, old, ok, gpu])
    row = next(line for line in table.splitlines() if line.startswith("lr "))
    assert "0.75 (3/4)" in row and "0.50 (2/4)" in row  # recall, then cause accuracy
    assert "cause named instead: none" in row
    old_row = next(line for line in table.splitlines() if line.startswith("old ")).split()
    assert old_row[2:5] == ["1.00", "(1/1)", "-"]  # no labels (an old results file): no accuracy
    assert "top-1 cause accuracy over all labelled fault runs: 0.60 (3/5)" in table
    assert "lowest per fault: 0.50  (target >= 0.9: NOT met)" in table


def _echo_after(delay: float, value: str, wait_for: str = "", signal: str = "") -> str:
    """A stand-in run for the worker pool: ``value`` after ``delay`` seconds; a negative delay
    fails. ``wait_for`` names a file to wait for first (written by another run's ``signal``), so
    the order in which runs finish is set by the test, not by how fast the workers start."""
    import time

    if delay < 0:
        raise RuntimeError(f"run {value} failed")
    deadline = time.monotonic() + 300
    while wait_for and not Path(wait_for).exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"run {value}: {wait_for} never appeared")
        time.sleep(0.01)
    time.sleep(delay)
    if signal:
        Path(signal).touch()
    return value


@pytest.mark.parametrize(
    "jobs",
    [1, pytest.param(2, marks=pytest.mark.slow)],  # each worker imports torch: 15-50 s
    ids=["in-process", "two-workers"],
)
def test_map_runs_keeps_the_order_of_the_runs(jobs: int, tmp_path: Path) -> None:
    """Results come back in the order of the runs whatever order they finish in (with two
    workers the first run waits until the last has finished), so ``--jobs`` never changes the
    table."""
    from benchmarks.faults.runner import map_runs

    finished: list[str] = []
    last_done = str(tmp_path / "c-done") if jobs > 1 else ""
    runs = [(0.0, "a", last_done), (0.0, "b"), (0.0, "c", "", last_done)]
    results = map_runs(_echo_after, runs, jobs, done=lambda args, r, s: finished.append(r))
    assert results == ["a", "b", "c"]
    assert finished == (["a", "b", "c"] if jobs == 1 else ["b", "c", "a"])
    with pytest.raises(RuntimeError, match="run x failed"):
        map_runs(_echo_after, [(0.0, "b"), (-1.0, "x")], jobs)


def test_map_runs_needs_a_job() -> None:
    from benchmarks.faults.runner import map_runs

    with pytest.raises(ValueError, match="jobs must be >= 1, got 0"):
        map_runs(_echo_after, [(0.0, "a")], 0)


def test_saved_results_score_the_same(tmp_path: Path) -> None:
    """Results split over two processes and saved can be scored together (``--score``)."""
    import json
    from dataclasses import asdict

    from benchmarks.faults.bench import load_results

    nan = C("non-finite-values", "bad-batch", "open", step=40)
    a = [_run(scenario="nan-injected", findings=[nan], onset=40, cause="forward-numerics")]
    b = [_run("healthy", scenario="healthy", findings=[F("overfit", step=60)])]
    for name, part in (("a", a), ("b", b)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps([asdict(r) for r in part]))
    loaded = load_results([tmp_path / "a" / "results.json", tmp_path / "b" / "results.json"])
    assert [r.scenario for r in loaded] == ["healthy", "nan-injected"]  # the benchmark's order
    assert loaded[1].findings == [nan]
    assert format_table(summarize(loaded)) == format_table(summarize(b + a))


def test_results_saved_before_the_labels_load_without_accuracy(tmp_path: Path) -> None:
    import json
    from dataclasses import asdict

    from benchmarks.faults.bench import load_results

    raw = asdict(_run(scenario="nan-injected", findings=[F("zero-loss", "error", 45)], onset=40))
    del raw["cause"]
    for f in raw["findings"]:
        del f["cause"], f["verdict"]
    (tmp_path / "results.json").write_text(json.dumps([raw]))
    (summary,) = summarize(load_results([tmp_path / "results.json"]))
    assert (summary.recall, summary.labelled, summary.cause_accuracy) == (1.0, 0, None)


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
    # without a limit the spectrum starts up in train_begin, timed apart from its part there
    assert list(run["start_up_s"]) == [str(overhead.BEGIN)] and run["spectrum_begin_s"] > 0
    hooked = {int(k) for k in run["hook_s"]}
    assert {overhead.BEGIN, overhead.END} <= hooked
    assert {s for s in range(1, 41) if (s - 1) // 4 % 2 == 0} <= hooked  # every on-step
    assert hooked & set(range(1, 41)) <= {s for s in range(1, 41) if (s - 1) // 4 % 2 == 0} | {
        *range(4, 41, 4)
    }  # off-steps only where a reading was planned


def _scripted_run(seconds: list[float], hooks: dict[int, float], **fields: Any) -> Any:
    """A run of 12 steps of the overhead benchmark in 6 blocks of 2 (on, off, ..., the last one
    final) taking ``seconds`` each, 2.5 s in all, with ``hooks`` (seconds in the doctor's hooks by
    step) and readings at step 10 and at the end; ``fields`` are the record's others."""
    from benchmarks.overhead import END, Block, RunRecord

    blocks = [Block(i, i % 2 == 0, 2 * i + 1, 2 * i + 2, s) for i, s in enumerate(seconds)]
    blocks[-1].final = True
    return RunRecord(
        steps=12,
        rep=0,
        block=2,
        wall_s=2.5,
        blocks=blocks,
        hook_s=hooks,
        reading_s={10: 0.03, END: 0.01},
        **fields,
    )


def test_overhead_parts_and_extrapolation() -> None:
    """A scripted run of 12 steps in blocks of 2: the pair, the reading block's excess and the
    shares with and without the spectrum, by hand."""
    from benchmarks.overhead import END, summarize

    record = _scripted_run(
        [0.3, 0.2, 0.21, 0.2, 0.25, 0.3],  # block 4 holds the reading at step 10
        {0: 0.05, 1: 0.001, 2: 0.002, 5: 5e-4, 6: 5e-4, 9: 5e-4, 10: 0.0305, END: 0.02},
        waited_s={10: 0.0, END: 0.0},
        spectrum_begin_s=0.02,
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


def test_overhead_counts_the_spectrum_start_up_where_it_happens() -> None:
    """The spectrum's start-up, deferred to its first affordable reading, is the spectrum's time
    wherever it falls: at the end of training (one-time work) or at a step past the lead-in (a
    reading step, out of the steady steps)."""
    from benchmarks.overhead import END, _Parts, _parts

    def parts(start_up: dict[int, float]) -> _Parts:
        hooks = {0: 0.05, 1: 0.001, 2: 0.002, 5: 5e-4, 6: 5e-4, 10: 0.0305, END: 0.02}
        for step, seconds in start_up.items():
            hooks[step] += seconds
        return _parts(_scripted_run([0.2] * 6, hooks, spectrum_begin_s=0.002, start_up_s=start_up))

    plain, at_end, mid = parts({}), parts({END: 0.005}), parts({6: 0.005})
    assert at_end.one_time_s - plain.one_time_s == pytest.approx(0.005)
    assert at_end.one_time_spectrum_s - plain.one_time_spectrum_s == pytest.approx(0.005)
    assert plain.one_time_spectrum_s == pytest.approx(0.012)
    assert (plain.periodic_readings, mid.periodic_readings) == (1, 2)
    assert mid.reading_hook_s == pytest.approx(0.0305 + 0.0055)
    assert mid.one_time_spectrum_s == pytest.approx(plain.one_time_spectrum_s)
    # the on-steps 5, 6 and 9 (step 10 holds the reading; step 9 no hook time)
    assert plain.steady_hook_s == [5e-4, 5e-4, 0.0] and mid.steady_hook_s == [5e-4, 0.0]


# --- the fix loop ------------------------------------------------------------------------------------
def _outcome(
    findings: tuple[Finding, ...] = (),
    loss: float = 2.0,
    eval_loss: float | None = None,
    error: str | None = None,
):
    from benchmarks.faults.runner import Outcome

    return Outcome(
        findings=list(findings),
        log_history=[{"loss": 9.0, "step": 5}, {"loss": loss, "step": 10}],
        eval_loss=eval_loss,
        error=error,
    )


PLATEAU = F("loss-plateau", "warning", 40)
JUDGE_CASES = [
    ("fixed", _outcome((PLATEAU,)), _outcome(loss=1.0), True, ""),
    ("still-reported", _outcome((PLATEAU,)), _outcome((PLATEAU,), 1.0), False, "still reports loss-plateau"),
    ("info-is-not-reported", _outcome((PLATEAU,)), _outcome((F("loss-plateau", "info"),), 1.0), True, ""),
    ("loss-not-low-enough", _outcome((PLATEAU,)), _outcome(loss=1.8), False, "loss above 0.85 x the faulty run's"),
    ("new-error", _outcome((PLATEAU,)), _outcome((F("non-finite-values", "error"),), 1.0), False, "new error non-finite-values"),
    ("old-error-is-not-new", _outcome((F("zero-loss", "error"),)), _outcome((F("zero-loss", "error"),), 1.0), True, ""),
    ("died", _outcome((PLATEAU,)), _outcome(loss=1.0, error="RuntimeError: x"), False, "died: RuntimeError: x"),
    ("nan-before", _outcome((PLATEAU,), float("nan")), _outcome(loss=3.0), True, ""),
    ("nan-after", _outcome((PLATEAU,)), _outcome(loss=float("nan")), False, "loss above 0.85 x the faulty run's"),
    ("eval-loss-decides", _outcome((PLATEAU,), 0.1, 3.0), _outcome(loss=0.5, eval_loss=2.0), True, ""),
]  # fmt: skip


@pytest.mark.parametrize(
    ("faulty", "fixed", "verdict", "reason"),
    [c[1:] for c in JUDGE_CASES],
    ids=[c[0] for c in JUDGE_CASES],
)
def test_fix_loop_verdict(faulty, fixed, verdict: bool, reason: str) -> None:
    from benchmarks.faults.fixloop import FixResult, final_loss, judge
    from benchmarks.faults.scenarios import SCENARIOS

    scenario = next(s for s in SCENARIOS if s.name == "lr-too-low")  # must: loss-plateau
    record = FixResult(scenario.name, scenario.fault, "llama", 0)
    record.loss_key, record.loss_before = final_loss(faulty)
    judge(record, scenario, faulty, fixed)
    assert (record.fixed, record.reason) == (verdict, reason)


def test_fix_loop_selects_configuration_faults_and_controls() -> None:
    from benchmarks.faults.fixloop import QUICK, select
    from benchmarks.faults.scenarios import SCENARIOS

    every = select(quick=False)
    assert {s.name for s in every} == {s.name for s in SCENARIOS if s.config_fix or s.healthy}
    assert [s.name for s in select(quick=True)] == [
        n for n in (s.name for s in every) if n in QUICK
    ]
    with pytest.raises(ValueError, match=r"not in the fix loop: \['labels-masked'\]"):
        select(quick=False, only=["labels-masked"])


def test_fix_loop_results_round_trip_and_table(tmp_path: Path) -> None:
    from benchmarks.faults.fixloop import FixResult, format_table, load, save

    runs = [
        FixResult("alpha-not-scaled", "r changed without alpha", "llama", s, applied={"LoraConfig": {"lora_alpha": 32}},
                  loss_before=1.4, loss_after=0.8 + s, fixed=s == 0, reason="" if s == 0 else "loss above 0.85 x the faulty run's")
        for s in (0, 1)
    ] + [FixResult("healthy", "healthy", "llama", 0, unchanged=True)]  # fmt: skip
    save(runs, tmp_path / "fixloop.json")
    back = load([tmp_path / "fixloop.json"])
    assert [r.scenario for r in back] == ["healthy", "alpha-not-scaled", "alpha-not-scaled"]
    table = format_table(back)
    assert (
        "| `alpha-not-scaled` (r changed without alpha) | **1/2** | loss | 1.4 -> 1.3 | `lora_alpha=32` | loss above 0.85 x the faulty run's (llama s1) |"
        in table
    )
    assert "| `healthy` | 1 | 1 |" in table


#: The fix loop's saved results (python -m benchmarks.faults --fix-loop --seeds 3 --out ...).
FIXLOOP_RESULTS = (
    Path(__file__).resolve().parents[1] / "benchmarks" / "faults" / "fixloop_results.json"
)


def test_every_change_the_benchmark_recommended_builds_both_objects(tmp_path: Path) -> None:
    """Each finding's config_changes in the saved fix-loop runs, applied to a real LoraConfig and
    TrainingArguments, is taken whole; each run's applied changes build both objects."""
    from peft import LoraConfig
    from transformers import TrainingArguments

    from benchmarks.faults.fixloop import load
    from lora_doctor.findings import Finding as Found
    from lora_doctor.findings import Recommendation, Severity
    from lora_doctor.fix import apply_findings

    results = load([FIXLOOP_RESULTS])
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    args = TrainingArguments(
        output_dir=str(tmp_path), eval_strategy="steps", eval_steps=5, report_to="none"
    )
    recommended = [rec for r in results for rec in r.recommended]
    assert recommended, "the saved results hold no recommendation"
    for rec in recommended:
        fix = Recommendation("fix", (), rec["config_changes"])
        finding = Found(rec["code"], rec["slug"], Severity.WARNING, 1, "t", "m", {}, fix)
        applied = apply_findings([finding], lora, args)
        assert not applied.unrouted, (rec, applied.unrouted)
        assert len(applied.applied) == len(rec["config_changes"]), rec
    for r in results:  # under the field names of the installed classes (renames included)
        changes = {k: v for target in r.applied.values() for k, v in target.items()}
        fix = Recommendation("fix", (), changes)
        finding = Found("LD000", r.scenario, Severity.WARNING, 1, "t", "m", {}, fix)
        applied = apply_findings([finding], lora, args)
        assert not applied.unrouted and len(applied.applied) == len(changes), (r, applied)


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_quick_fix_loop_removes_the_faults(tmp_path: Path) -> None:
    """Three faults trained, diagnosed, fixed by ``Diagnosis.apply`` and trained again; the
    control's diagnosis changes nothing."""
    from benchmarks.faults.fixloop import FIXED_LOSS_RATIO, QUICK, collect, format_table, select

    results = collect(select(quick=True), ["llama"], [0], tmp_path, progress=False)
    assert {r.scenario for r in results} == set(QUICK)
    for r in results:
        if r.healthy:
            assert r.unchanged and r.applied == {}, r
            continue
        assert r.applied and not r.unrouted, r
        assert r.loss_after is not None and r.loss_before is not None
        assert r.fixed, r
        assert r.loss_after <= FIXED_LOSS_RATIO * r.loss_before and not r.still_found
    assert "**1/1**" in format_table(results)
