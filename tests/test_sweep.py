"""Rank sweep, pure part: the metric's direction, the choice rule, the result's files, validation."""

from __future__ import annotations

import csv
import io
import json
import math
import sys

import pytest

from lora_doctor import SweepResult, SweepRow, rank_sweep
from lora_doctor.sweep import choose_rank, metric_direction, summary_logs


def rows(*spec: tuple[int, float | None, float | None]) -> list[SweepRow]:
    return [SweepRow(r, 2 * r, metric, seconds) for r, metric, seconds in spec]


OOM = SweepRow(16, 32, None, None, status="failed", reason="out of memory: CUDA out of memory")


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("eval_loss", False),
        ("train_loss", False),
        ("eval_perplexity", False),
        ("eval_wer", False),
        ("error_rate", False),
        ("eval_accuracy", True),
        ("eval_mean_token_accuracy", True),
        ("eval_f1", True),
        ("eval_macro_f1", True),
        ("eval_bleu", True),
        ("eval_rougeLsum", True),
        ("eval_rewards/accuracies", True),
        ("reward", True),
    ],
    ids=lambda v: str(v),
)
def test_direction_from_name(name: str, expected: bool) -> None:
    assert metric_direction(name) is expected


@pytest.mark.parametrize(
    ("name", "flag", "expected"),
    [("eval_logps", True, True), ("eval_loss", True, True), ("eval_accuracy", False, False)],
    ids=["unknown-name-explicit", "explicit-overrides-loss", "explicit-overrides-accuracy"],
)
def test_direction_explicit(name: str, flag: bool, expected: bool) -> None:
    assert metric_direction(name, flag) is expected


@pytest.mark.parametrize(
    ("name", "flag", "match"),
    [
        ("eval_logps/chosen", None, "cannot tell from the name 'eval_logps/chosen'"),
        ("eval_loss_accuracy", None, "reads both ways"),
        ("", None, "non-empty string"),
        ("eval_loss", "yes", "greater_is_better"),
    ],
    ids=["unknown", "both-ways", "empty", "flag-not-bool"],
)
def test_direction_errors(name: str, flag: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        metric_direction(name, flag)  # type: ignore[arg-type]


CHOICE_CASES = [
    # id, rows, greater_is_better, kwargs, expected rank, phrases the reason must contain
    (
        "issue-92-94-94.1-diminishing-returns",
        rows((8, 92, 10), (16, 94, 18), (32, 94.1, 35)),
        True,
        {},
        16,
        [
            "r=32 improves it by only 0.1",
            "diminishing returns",
            "r=8 (metric 92) is 2.1% worse than r=16, more than the 1% of the best",
        ],
    ),
    (
        "accuracy-flat-smallest-wins",
        rows((4, 93.9, 10), (8, 94.0, 12), (16, 94.1, 30)),
        True,
        {},
        4,
        ["r=4", "diminishing returns"],
    ),
    (
        "loss-within-5pct-and-1pct-gain",
        rows((4, 2.10, 10), (8, 2.05, 11), (16, 2.04, 13), (32, 2.03, 20)),
        False,
        {},
        8,
        ["0.99% worse than the best (2.03 at r=32", "r=4 (metric 2.1) is 3% worse than r=16"],
    ),
    (
        "same-numbers-read-as-accuracy",
        rows((4, 2.10, 10), (8, 2.05, 11), (16, 2.04, 13), (32, 2.03, 20)),
        True,
        {},
        4,
        ["is the best"],
    ),
    (
        "time-limit-excludes-best-rank",
        rows((4, 2.05, 10), (8, 2.02, 12), (16, 1.97, 40)),
        False,
        {},
        8,
        ["r=16 is better by 2.5% for 3.33x the time, over the 70% time limit (28 s)"],
    ),
    (
        "time-share-1-keeps-slowest",
        rows((4, 2.05, 10), (8, 2.02, 12), (16, 1.97, 40)),
        False,
        {"time_share": 1.0},
        16,
        ["is the best"],
    ),
    (
        "equal-times-drop-time-rule",
        rows((4, 2.3, 10), (8, 2.0, 10.5), (16, 1.99, 11)),
        False,
        {},
        8,
        ["rank barely changes the cost here", "time rule was dropped"],
    ),
    (
        "quality-needs-slow-rank",
        rows((4, 3.0, 10), (8, 2.9, 11), (16, 2.0, 40)),
        False,
        {},
        16,
        ["No rank within 5% of the best trained within 70%", "r=8 (metric 2.9) is 45% worse"],
    ),
    (
        "stricter-quality-share",
        rows((8, 92, 10), (16, 94, 18), (32, 94.1, 35)),
        True,
        {"quality_share": 0.9999},
        32,
        ["time rule was dropped"],
    ),
    (
        "looser-min-gain",
        rows((8, 92, 10), (16, 94, 18), (32, 94.1, 35)),
        True,
        {"min_gain": 0.05},
        8,
        ["r=16 improves it by only 2"],
    ),
    (
        "failed-rank-left-out",
        [*rows((4, 2.1, 10), (8, 2.0, 12)), OOM],
        False,
        {},
        8,
        ["Left out: r=16 out of memory: CUDA out of memory"],
    ),
    (
        "non-finite-metric-left-out",
        rows((4, 2.1, 10), (8, float("nan"), 12)),
        False,
        {},
        4,
        ["Left out: r=8 has no finite metric"],
    ),
    ("tie-goes-to-smaller-rank", rows((4, 2.0, 10), (8, 2.0, 10)), False, {}, 4, ["is the best"]),
    (
        "negative-rewards",
        rows((4, -1.0, 10), (8, -0.5, 10), (16, -0.48, 10)),
        True,
        {},
        16,
        ["r=8 (metric -0.5) is 4.2% worse than r=16"],
    ),
    (
        "smaller-rank-measured-against-the-best-kept",
        rows((4, 2.10, 10), (8, 2.085, 10), (16, 2.07, 10)),
        False,
        {},
        8,
        ["r=4 (metric 2.1) is 1.4% worse than r=16, more than the 1%"],
    ),
    (
        "no-times-recorded",
        rows((4, 2.1, None), (8, 2.0, None)),
        False,
        {},
        8,
        ["No training times were recorded"],
    ),
    (
        "rows-in-any-order",
        rows((32, 94.1, 35), (8, 92, 10), (16, 94, 18)),
        True,
        {},
        16,
        ["diminishing returns"],
    ),
]


@pytest.mark.parametrize(
    ("rows_", "greater", "kwargs", "expected", "phrases"),
    [case[1:] for case in CHOICE_CASES],
    ids=[case[0] for case in CHOICE_CASES],
)
def test_choice(
    rows_: list[SweepRow], greater: bool, kwargs: dict, expected: int, phrases: list[str]
) -> None:
    rank, reason = choose_rank(rows_, greater_is_better=greater, **kwargs)
    assert rank == expected, reason
    for phrase in phrases:
        assert phrase in reason


@pytest.mark.parametrize(
    "failed",
    [[OOM], [SweepRow(4, 8, float("inf"), 3.0, status="failed", reason="diverged: loss is inf")]],
    ids=["all-out-of-memory", "all-diverged"],
)
def test_no_rank_when_all_failed(failed: list[SweepRow]) -> None:
    result = SweepResult.from_rows(failed, "eval_loss", greater_is_better=False)
    assert result.chosen_rank is None and result.chosen is None
    assert result.reason.startswith("No rank finished with a finite eval_loss")
    assert failed[0].reason in result.reason


@pytest.mark.parametrize(
    ("findings", "metric", "reason"),
    [
        ([], 2.0, None),
        ([{"slug": "alpha-rank-ratio", "title": "alpha/r is 0.5"}], 2.0, None),
        ([{"slug": "loss-divergence", "title": "Loss rose 3x"}], 2.0, "diverged: Loss rose 3x"),
        ([{"slug": "non-finite-values", "title": "NaN loss"}], 2.0, "diverged: NaN loss"),
        ([], float("nan"), "diverged: eval_loss is nan"),
    ],
    ids=["clean", "other-finding", "loss-divergence", "non-finite-values", "nan-metric"],
)
def test_divergence(findings: list[dict], metric: float, reason: str | None) -> None:
    row = SweepRow(8, 16, metric, 1.0, findings=findings)
    row.check_divergence("eval_loss")
    assert row.reason == reason
    assert row.status == ("ok" if reason is None else "failed")
    assert row.usable is (reason is None)


def test_failure_reason_is_the_first() -> None:
    row = SweepRow(8, 16)
    row.fail("out of memory: x")
    row.fail("diverged: y")
    assert (row.status, row.reason) == ("failed", "out of memory: x")


def sample_result() -> SweepResult:
    return SweepResult.from_rows(
        [
            SweepRow(4, 8, 2.1, 10.0, 2**30, 1000, [{"slug": "alpha-rank-ratio", "code": "LD110"}]),
            SweepRow(8, 16, 2.0, 12.0, 2 * 2**30, 2000),
            SweepRow(16, 32, float("nan"), None, None, None, status="failed", reason="diverged"),
        ],
        "eval_loss",
        greater_is_better=False,
        alpha_ratio=2.0,
    )


def test_json_is_strict_and_round_trips(tmp_path) -> None:
    result = sample_result()
    path = tmp_path / "deep" / "sweep.json"
    text = result.to_json(path)
    data = json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"non-strict {c}"))
    assert data == json.loads(text)
    assert data["schema_version"] == 1 and data["kind"] == "rank-sweep"
    assert (data["chosen_rank"], data["chosen_lora_alpha"]) == (8, 16)
    assert data["rows"][2]["metric"] is None
    assert data["rule"] == {
        "quality_share": 0.95,
        "time_share": 0.7,
        "min_gain": 0.01,
        "alpha_ratio": 2.0,
    }
    back = SweepResult.from_dict({**data, "unknown_key": 1})
    assert back.chosen_rank == 8 and back.reason == result.reason
    assert [row.r for row in back.rows] == [4, 8, 16]
    assert back.rows[0].findings == result.rows[0].findings
    assert not list(tmp_path.joinpath("deep").glob(".*tmp"))


def test_csv(tmp_path) -> None:
    result = sample_result()
    result.to_csv(tmp_path / "sweep.csv")
    table = list(csv.DictReader(io.StringIO((tmp_path / "sweep.csv").read_text())))
    assert [row["r"] for row in table] == ["4", "8", "16"]
    assert [row["chosen"] for row in table] == ["False", "True", "False"]
    assert table[0]["findings"] == "alpha-rank-ratio"
    assert table[2]["status"] == "failed" and table[2]["metric"] == ""
    assert float(table[1]["peak_memory_bytes"]) == 2 * 2**30


def test_table_and_summary() -> None:
    text = sample_result().summary()
    assert "| 8 * | 16 | 2 | 12.0 | 2.00 | 2,000 | ok |" in text
    assert "failed: diverged" in text and "ok (alpha-rank-ratio)" in text
    assert "chosen: r=8, lora_alpha=16" in text


def test_summary_logs() -> None:
    logs = summary_logs(sample_result())
    assert logs["lora_doctor/sweep/chosen_rank"] == 8
    assert logs["lora_doctor/sweep/r4/eval_loss"] == 2.1
    assert logs["lora_doctor/sweep/r8/peak_memory_gib"] == 2.0
    assert "lora_doctor/sweep/r16/eval_loss" not in logs
    assert logs["lora_doctor/sweep/table"].startswith("| r |")


def test_plot(tmp_path) -> None:
    path = sample_result().plot(tmp_path / "sweep.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"pip install 'lora-doctor\[plot\]'"):
        sample_result().plot(tmp_path / "sweep.png")


def _build(r: int, lora_alpha: float) -> None:
    raise AssertionError("bad arguments must be refused before any training")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"ranks": []}, r"ranks=\.\.\.\) must be one or more integers >= 1, got \[\]"),
        ({"ranks": [0, 8]}, "integers >= 1"),
        ({"ranks": ["8"]}, "integers >= 1"),
        ({"ranks": [8, 8]}, "must be distinct"),
        ({"metric": "eval_logps"}, "greater_is_better=True or False"),
        ({"quality_share": 0}, r"quality_share=\.\.\.\) must be a number in \(0, 1\], got 0"),
        ({"quality_share": 1.5}, "quality_share"),
        ({"time_share": math.nan}, "time_share"),
        ({"min_gain": 1.0}, r"min_gain=\.\.\.\) must be a number in \[0, 1\)"),
        ({"alpha_ratio": 0}, r"alpha_ratio=\.\.\.\) must be a number > 0, got 0"),
        ({"build": "not callable"}, "must be a function build"),
    ],
    ids=[
        "no-ranks",
        "rank-zero",
        "rank-string",
        "duplicate-rank",
        "unknown-metric",
        "quality-zero",
        "quality-above-1",
        "time-nan",
        "min-gain-1",
        "alpha-ratio-zero",
        "build-not-callable",
    ],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    build = kwargs.pop("build", _build)
    with pytest.raises(ValueError, match=match):
        rank_sweep(build, **kwargs)


def test_cli_sweep_help_shows_plain_percent(capsys: pytest.CaptureFixture[str]) -> None:
    """argparse does not %-format a description: "95%%" was printed as it stands."""
    from lora_doctor.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["sweep", "--help"])
    assert exit_info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines at the terminal width
    assert "reaches 95% of the best metric within 70% of the slowest rank's training time" in out
    assert "%%" not in out
