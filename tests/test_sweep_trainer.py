"""Rank sweep with real Trainers on a tiny Llama: measurements, failures, provenance, the CLI."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import torch
from _sweep_build import tiny_trainer
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import Trainer

from lora_doctor import LoraDoctorCallback, rank_sweep
from lora_doctor.cli import main

BUILD_FILE = Path(__file__).with_name("_sweep_build.py")


@pytest.fixture(autouse=True)
def one_thread():
    """A tiny model trains fastest on one thread (and leaves the other cores to other tests)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _events(root: Path) -> tuple[dict[str, float], dict[str, str]]:
    """Every scalar's last value and every text summary under ``root``'s TensorBoard event files."""
    scalars: dict[str, float] = {}
    texts: dict[str, str] = {}
    for folder in {p.parent for p in root.rglob("events.out.tfevents.*")}:
        acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars[tag] = acc.Scalars(tag)[-1].value
        for tag in acc.Tags()["tensors"]:
            texts[tag] = acc.Tensors(tag)[-1].tensor_proto.string_val[0].decode()
    return scalars, texts


@pytest.mark.slow
def test_real_sweep_measures_and_logs_to_tensorboard(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    built: dict[int, Trainer] = {}

    def build(r: int, lora_alpha: float) -> Trainer:
        own = [LoraDoctorCallback(report_path=False)] if r == 4 else None
        built[r] = tiny_trainer(
            r, lora_alpha, str(tmp_path / f"r{r}"), report_to="tensorboard", callbacks=own
        )
        return built[r]

    result = rank_sweep(build, ranks=(4, 2))

    assert "lora-doctor rank sweep: 100%" in capsys.readouterr().err  # the progress bar

    assert [(row.r, row.lora_alpha, row.status) for row in result.rows] == [
        (2, 4, "ok"),
        (4, 8, "ok"),
    ]
    for row in result.rows:
        assert row.metric is not None and math.isfinite(row.metric)
        assert row.train_seconds is not None and row.train_seconds > 0
        assert row.peak_memory_bytes is None  # no CUDA here
        assert isinstance(row.findings, list)
    # q_proj and v_proj (64 -> 64 and 64 -> 32) in 2 layers: r * (64 + 64 + 64 + 32) * 2
    assert [row.lora_params for row in result.rows] == [2 * 224 * 2, 4 * 224 * 2]
    assert result.chosen_rank in (2, 4)
    # the user's own doctor is used, not doubled
    assert sum(isinstance(c, LoraDoctorCallback) for c in built[4].callback_handler.callbacks) == 1
    assert sum(isinstance(c, LoraDoctorCallback) for c in built[2].callback_handler.callbacks) == 1

    # provenance: the last trainer's (r=4) TensorBoard run holds the choice and the table
    scalars, texts = _events(tmp_path / "r4")
    assert scalars["train/lora_doctor/sweep/chosen_rank"] == result.chosen_rank
    assert scalars["train/lora_doctor/sweep/r2/eval_loss"] == pytest.approx(result.rows[0].metric)
    table = next(v for k, v in texts.items() if k.startswith("train/lora_doctor/sweep/table"))
    assert table == result.table()
    reason = next(v for k, v in texts.items() if k.startswith("train/lora_doctor/sweep/reason"))
    assert reason == result.reason
    assert "train/lora_doctor/sweep/chosen_rank" not in _events(tmp_path / "r2")[0]


class _OutOfMemoryTrainer(Trainer):
    def training_step(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


class _NaNLossTrainer(Trainer):
    def training_step(self, *args, **kwargs):
        return super().training_step(*args, **kwargs) * float("nan")


class _NaNWeightsTrainer(Trainer):
    def training_step(self, model, *args, **kwargs):
        loss = super().training_step(model, *args, **kwargs)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.fill_(float("nan"))
        return loss


@pytest.mark.slow
def test_failed_ranks_are_recorded_and_the_sweep_goes_on(tmp_path: Path) -> None:
    classes = {2: Trainer, 4: _NaNWeightsTrainer, 8: _OutOfMemoryTrainer, 16: _NaNLossTrainer}

    def build(r: int, lora_alpha: float) -> Trainer:
        if r == 32:  # e.g. the model does not even fit on the device
            raise torch.OutOfMemoryError("CUDA out of memory while loading")
        trainer = tiny_trainer(r, lora_alpha, str(tmp_path / f"r{r}"), trainer_cls=classes[r])
        trainer.args.logging_nan_inf_filter = False  # else the Trainer hides a NaN training loss
        return trainer

    result = rank_sweep(build, ranks=(2, 4, 8, 16, 32), progress=False)

    by_rank = {row.r: row for row in result.rows}
    assert by_rank[2].status == "ok"
    assert by_rank[4].status == "failed" and by_rank[4].reason.startswith("diverged: ")
    assert by_rank[8].status == "failed"
    assert by_rank[8].reason == "out of memory: CUDA out of memory. Tried to allocate 2.00 GiB"
    assert by_rank[8].metric is None
    assert (by_rank[16].status, by_rank[16].reason) == ("failed", "diverged: training loss is nan")
    assert (by_rank[32].status, by_rank[32].reason, by_rank[32].findings) == (
        "failed",
        "out of memory: CUDA out of memory while loading",
        [],
    )
    assert result.chosen_rank == 2
    assert "Left out: r=4 diverged" in result.reason and "r=8 out of memory" in result.reason


@pytest.mark.slow
def test_metric_the_run_does_not_report(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"metric='eval_accuracy'.*'eval_loss'"):
        rank_sweep(
            lambda r, a: tiny_trainer(r, a, str(tmp_path), steps=1),
            ranks=(2,),
            metric="eval_accuracy",
            progress=False,
        )


def test_build_must_return_a_trainer() -> None:
    with pytest.raises(ValueError, match=r"build\(r=2, lora_alpha=4\) must return a transformers"):
        rank_sweep(lambda r, a: object(), ranks=(2,), progress=False)


def test_report_to_is_checked() -> None:
    with pytest.raises(ValueError, match=r"report_to=.*'nowhere'.*not supported"):
        rank_sweep(lambda r, a: None, ranks=(2,), report_to=["nowhere"], progress=False)


@pytest.mark.slow
def test_cli_sweep_from_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        [
            "sweep",
            f"{BUILD_FILE}:build",
            "--ranks",
            "2",
            "4",
            "--metric",
            "train_loss",
            "--out",
            str(tmp_path),
            "--no-progress",
        ]
    )
    captured = capsys.readouterr()
    out = captured.out
    assert "lora-doctor rank sweep:" not in captured.err  # --no-progress
    assert code == 0
    assert "lora-doctor rank sweep (train_loss)" in out and "chosen: r=" in out
    assert {p.name for p in tmp_path.iterdir()} >= {"sweep.json", "sweep.csv", "sweep.png"}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["sweep", "no_colon"], "expected MODULE:FUNCTION"),
        (["sweep", "no_such_module_xyz:build"], "cannot load 'no_such_module_xyz'"),
        (["sweep", "os.path:no_such_function"], "'os.path' has no function 'no_such_function'"),
        (["sweep", "missing/dir/train.py:build"], "no such file: missing/dir/train.py"),
        (["sweep", f"{BUILD_FILE}:build", "--ranks", "0"], "must be one or more integers >= 1"),
        (["sweep", f"{BUILD_FILE}:build", "--metric", "eval_logps"], "greater_is_better"),
    ],
    ids=["no-colon", "no-module", "no-function", "no-file", "bad-rank", "unknown-direction"],
)
def test_cli_bad_input(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.count("\n") == 1 and err.startswith("lora-doctor sweep: ")


class _FakeWandb:
    """The part of the ``wandb`` module that transformers' WandbCallback.on_log uses."""

    def __init__(self) -> None:
        self.logged: list[dict] = []
        self.run = type("Run", (), {"summary": {}})()

    def log(self, data: dict) -> None:
        self.logged.append(data)


def test_summary_goes_through_wandb_callback() -> None:
    from transformers import TrainerControl, TrainerState, TrainingArguments
    from transformers.integrations import WandbCallback

    from lora_doctor.integrations.hf_sweep import Reporter, log_summary
    from lora_doctor.sweep import SweepResult, SweepRow, summary_logs

    callback = WandbCallback.__new__(WandbCallback)  # wandb itself is not installed here
    callback._wandb, callback._initialized = _FakeWandb(), True
    result = SweepResult.from_rows(
        [SweepRow(8, 16, 92.0, 10.0), SweepRow(16, 32, 94.0, 18.0), SweepRow(32, 64, 94.1, 35.0)],
        "eval_accuracy",
        greater_is_better=True,
    )
    state = TrainerState()
    state.global_step = 7
    args = TrainingArguments(output_dir="unused", report_to="none", use_cpu=True)
    log_summary(Reporter(args, state, TrainerControl(), [callback]), summary_logs(result))

    (logged,) = callback._wandb.logged
    assert logged["train/lora_doctor/sweep/chosen_rank"] == 16
    assert logged["train/lora_doctor/sweep/r32/eval_accuracy"] == 94.1
    assert logged["train/lora_doctor/sweep/reason"] == result.reason
    assert logged["train/global_step"] == 7


def test_a_failing_integration_does_not_fail_the_sweep(caplog: pytest.LogCaptureFixture) -> None:
    from lora_doctor.integrations.hf_sweep import Reporter, log_summary

    class Broken:
        def on_log(self, *args, **kwargs):
            raise RuntimeError("tracker down")

    log_summary(Reporter(None, None, None, [Broken()]), {"lora_doctor/sweep/chosen_rank": 8})
    assert "could not log the rank sweep through Broken" in caplog.text


@pytest.mark.parametrize(
    ("report_to", "expected"),
    [(None, ["TensorBoardCallback"]), ("none", []), (["tensorboard"], ["TensorBoardCallback"])],
    ids=["trainers-own", "none", "named"],
)
def test_which_integrations_get_the_summary(report_to, expected: list[str]) -> None:
    from lora_doctor.integrations.hf_sweep import _reporter

    reporter = _reporter(tiny_trainer(2, 4, report_to="tensorboard"), report_to)
    names = [type(c).__name__ for c in reporter.callbacks] if reporter is not None else []
    assert names == expected


@pytest.mark.slow
def test_peak_memory_is_read_when_cuda_is_there(monkeypatch: pytest.MonkeyPatch) -> None:
    """CUDA faked: the peak is reset before the build and read after the run, even a failed one."""
    from lora_doctor.integrations import hf_sweep

    calls: list[str] = []
    monkeypatch.setattr(hf_sweep, "_cuda_ready", lambda: True)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda: calls.append("reset"))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: 3 * 2**30)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("empty_cache"))

    def build(r: int, lora_alpha: float) -> Trainer:
        calls.append("build")
        return tiny_trainer(r, lora_alpha, trainer_cls=_OutOfMemoryTrainer)

    result = rank_sweep(build, ranks=(2,), progress=False)
    (row,) = result.rows
    assert (row.status, row.peak_memory_bytes) == ("failed", 3 * 2**30)
    assert calls == ["reset", "build", "empty_cache"]
    assert "| 2 | 4 | n/a | - | 3.00 |" in result.table()


def _build_out_of_memory(r: int, lora_alpha: float) -> Trainer:
    raise torch.OutOfMemoryError("CUDA out of memory while loading")


@pytest.mark.parametrize(("rank", "shown"), [("0", True), ("1", False)], ids=["main", "other"])
def test_only_the_main_process_shows_and_logs(
    rank: str,
    shown: bool,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv("RANK", rank)
    with caplog.at_level(logging.INFO, logger="lora_doctor"):
        result = rank_sweep(_build_out_of_memory, ranks=(2, 4))
    assert result.chosen_rank is None
    assert ("lora-doctor rank sweep:" in capsys.readouterr().err) is shown
    assert ("chosen: none" in caplog.text) is shown
