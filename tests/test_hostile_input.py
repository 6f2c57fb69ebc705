"""Hostile input to the offline doctor and the command: every case is a one-line error (exit 2) or
a diagnosis, never a traceback, a hang, a lost report or a warning on stderr.

The cases a user or an adversary would try: numbers beyond a float, malformed adapter_config.json
fields, paths that are neither files nor folders, arguments of the wrong type, odd steps and values.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Any

import pytest

from lora_doctor import DoctorConfig, diagnose
from lora_doctor.cli import main
from lora_doctor.facts import AdapterFacts
from lora_doctor.offline import RunReadError


def _flat_log(n: int = 100, level: float = 2.0) -> list[dict[str, Any]]:
    return [
        {"loss": level + 0.01 * ((i * 7) % 5 - 2), "step": i + 1, "learning_rate": 2e-4}
        for i in range(n)
    ]


def _run(folder: Path, log: list[Any] | str, adapter: Any = None, **state: Any) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    text = (
        log if isinstance(log, str) else json.dumps({"max_steps": 100, **state, "log_history": log})
    )
    (folder / "trainer_state.json").write_text(text)
    if adapter is not None:
        (folder / "adapter_config.json").write_text(
            adapter if isinstance(adapter, str) else json.dumps(adapter)
        )
    return folder


def _one_line_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str], needle: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lora-doctor: error:"), err
    assert needle in err and "Traceback" not in err
    return err


# --- numbers a float cannot hold -------------------------------------------------------------------
def test_integer_too_large_for_a_float_is_read_as_infinite(tmp_path: Path, capsys) -> None:
    """``10**400`` in the log is read as JSON reads ``1e400``: infinite, so non-finite-values."""
    text = json.dumps({"max_steps": 100, "log_history": _flat_log()}).replace(
        '"loss": 2.0', '"loss": 1' + "0" * 400, 1
    )
    run = _run(tmp_path, text)
    d = diagnose(run)
    assert "non-finite-values" in d.slugs
    assert main(["diagnose", str(run), "--fail-on", "warning"]) == 1
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.parametrize(
    "entry",
    [{"step": 10**400, "loss": 1.0}, {"step": 5, "learning_rate": 10**400}],
    ids=["huge-step", "huge-learning-rate"],
)
def test_huge_integers_elsewhere_in_the_log(entry: dict[str, Any]) -> None:
    d = diagnose({"max_steps": 10**400, "log_history": [*_flat_log(), entry]})
    assert d.run["max_steps"] == 0  # not a plan a run could have: not known
    json.loads(d.to_json())


# --- malformed adapter_config.json ---------------------------------------------------------------
BAD_ADAPTER = {
    "rank_pattern-list": ({"rank_pattern": ["q_proj", 8]}, "rank_pattern must be an object"),
    "alpha_pattern-string": ({"alpha_pattern": "q_proj=16"}, "alpha_pattern must be an object"),
    "rank_pattern-value": ({"rank_pattern": {"q_proj": "8"}}, "rank_pattern must be an object"),
    "r-nan": ('{"r": NaN, "lora_alpha": 16}', "r must be a positive integer, got nan"),
    "r-zero": ({"r": 0}, "r must be a positive integer, got 0"),
    "r-fraction": ({"r": 8.5}, "r must be a positive integer, got 8.5"),
    "r-string": ({"r": "8"}, "r must be a positive integer, got '8'"),
    "r-bool": ({"r": True}, "r must be a positive integer, got True"),
    "alpha-huge": ('{"r": 8, "lora_alpha": 1' + "0" * 400 + "}", "lora_alpha must be a finite"),
    "rslora-string-false": (
        {"use_rslora": "false"},
        "use_rslora must be true or false, got 'false'",
    ),
    "dora-int": ({"use_dora": 1}, "use_dora must be true or false, got 1"),
    "target-int": ({"target_modules": 5}, "target_modules must be a module name"),
    "modules_to_save-string-list": ({"modules_to_save": [1]}, "modules_to_save must be a list"),
    "peft_type-list": ({"peft_type": ["LORA"]}, "peft_type must be text"),
    "two-fields": ({"r": -1, "bias": 0}, "r must be a positive integer, got -1; bias must be text"),
}


@pytest.mark.parametrize("case", list(BAD_ADAPTER), ids=list(BAD_ADAPTER))
def test_malformed_adapter_config_is_one_line_naming_the_field(
    tmp_path: Path, capsys, case: str
) -> None:
    fields, needle = BAD_ADAPTER[case]
    if isinstance(fields, dict):
        fields = {"r": 8, "lora_alpha": 16, **fields}
    run = _run(tmp_path, _flat_log(), fields)
    with pytest.raises(RunReadError, match=r"adapter config .*adapter_config\.json: ") as err:
        diagnose(run)
    assert needle in str(err.value)
    _one_line_exit_2(["diagnose", str(run)], capsys, needle)


@pytest.mark.parametrize(
    "fields",
    [
        {"r": 16, "lora_alpha": 32, "target_modules": None, "modules_to_save": None},
        {"r": 16.0, "lora_alpha": 32.5, "use_rslora": False, "init_lora_weights": "pissa"},
        {"r": 8, "lora_alpha": 16, "rank_pattern": {"q_proj": 4}, "alpha_pattern": {"v": 8.0}},
        {"r": 8, "target_modules": "all-linear", "task_type": "CAUSAL_LM", "bias": "none"},
    ],
    ids=["nulls", "whole-float-rank-and-method-init", "patterns", "string-targets"],
)
def test_well_formed_adapter_configs_are_read(tmp_path: Path, fields: dict[str, Any]) -> None:
    d = diagnose(_run(tmp_path, _flat_log(), fields))
    assert d.run["adapters"]["default"]["r"] == int(fields["r"])


def test_adapter_facts_parse_booleans_strictly() -> None:
    """The live callback reads peft's own configs leniently: a wrong type is "not known"."""
    facts, problems = AdapterFacts.parse_config("default", {"r": 8, "use_rslora": "false"})
    assert facts.use_rslora is False and facts.r == 8
    assert problems == ["use_rslora must be true or false, got 'false'"]
    assert AdapterFacts.from_config("default", {"rank_pattern": [1], "r": math.nan}).r is None


# --- paths that are not what they seem ------------------------------------------------------------
def test_path_that_is_neither_file_nor_folder(tmp_path: Path, capsys) -> None:
    fifo = tmp_path / "state.fifo"
    os.mkfifo(fifo)
    with pytest.raises(RunReadError, match="is neither a file nor a folder"):
        diagnose(fifo)
    _one_line_exit_2(["diagnose", str(fifo)], capsys, "is neither a file nor a folder")


def test_adapter_config_that_is_a_fifo_is_not_read(tmp_path: Path) -> None:
    """Reading a FIFO would block forever: it is refused before any read."""
    fifo = tmp_path / "adapter.fifo"
    os.mkfifo(fifo)
    with pytest.raises(RunReadError, match="is not a regular file"):
        diagnose(_run(tmp_path / "run", _flat_log()), adapter_config=fifo)


def test_trainer_state_that_is_a_folder(tmp_path: Path, capsys) -> None:
    (tmp_path / "run" / "trainer_state.json").mkdir(parents=True)
    _one_line_exit_2(["diagnose", str(tmp_path / "run")], capsys, "no trainer_state.json in")


def test_deeply_nested_json_is_one_line(tmp_path: Path, capsys) -> None:
    run = _run(tmp_path, '{"log_history": ' + "[" * 100_000 + "]" * 100_000 + "}")
    _one_line_exit_2(["diagnose", str(run)], capsys, "is nested too deeply")


def test_file_too_large_for_memory_is_one_line(
    tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = _run(tmp_path, _flat_log())

    def no_memory(*args: Any, **kwargs: Any) -> Any:
        raise MemoryError

    monkeypatch.setattr(json, "loads", no_memory)
    _one_line_exit_2(["diagnose", str(run)], capsys, "is too large to read into memory")


def test_folder_that_cannot_be_listed_is_one_line(
    tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As a folder without read permission (``chmod 000``) for a user who is not root."""
    run = _run(tmp_path / "run" / "checkpoint-5", _flat_log()).parent

    def denied(self: Path) -> Any:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "iterdir", denied)
    _one_line_exit_2(["diagnose", str(run)], capsys, f"cannot read {run}: Permission denied")


# --- arguments of the wrong type ------------------------------------------------------------------
@pytest.mark.parametrize(
    ("args", "kwargs", "needle"),
    [
        ((None,), {}, "path_or_log_history must be a path, a trainer state dict or a log_history"),
        ((5,), {}, "got int"),
        ((b"trainer_state.json",), {}, "got bytes"),
        (({"log_history": 5},), {}, "has no log_history list (got int)"),
        (({"global_step": 5},), {}, "has no log_history list (got NoneType)"),
        ((_flat_log(),), {"config": "x"}, "config must be a DoctorConfig or None, got str"),
        ((_flat_log(), [1, 2]), {}, "adapter_config must be the path of an adapter_config.json"),
        ((_flat_log(), {"r": "8"}), {}, "adapter_config: r must be a positive integer"),
    ],
    ids=[
        "none",
        "int",
        "bytes",
        "log-history-int",
        "no-log-history",
        "config",
        "adapter-list",
        "adapter-dict-field",
    ],
)
def test_wrong_argument_types_raise_the_documented_error(
    args: tuple[Any, ...], kwargs: dict[str, Any], needle: str
) -> None:
    with pytest.raises(RunReadError) as err:
        diagnose(*args, **kwargs)
    assert needle in str(err.value) and "\n" not in str(err.value)


# --- odd steps and values: no warning, no internal error --------------------------------------------
ODD_LOGS = {
    "identical-steps": [
        {"loss": 2.0 + 0.01 * (i % 3), "grad_norm": 1.0, "step": 5} for i in range(60)
    ],
    "values-near-float-max": [
        {"loss": 1.7e308 - i * 1e300, "grad_norm": 1e308, "eval_loss": 1e308, "step": i + 1}
        for i in range(100)
    ],
    "negative-steps": [{"loss": math.nan if i == 30 else 2.0, "step": -i} for i in range(60)],
    "decreasing-steps": [{"loss": 2.0 - 0.001 * i, "step": 100 - i} for i in range(100)],
    "string-and-nan-steps": [{"loss": 2.0, "step": s} for s in ("3", math.nan, math.inf, None)]
    * 20,
    "non-string-keys": [{1: 2.0, ("a",): 1.0, "loss": 2.0, "step": i + 1} for i in range(60)],
}


@pytest.mark.parametrize("case", list(ODD_LOGS), ids=list(ODD_LOGS))
def test_odd_logs_give_no_warning_and_no_internal_error(
    case: str, caplog: pytest.LogCaptureFixture
) -> None:
    for source in ({"max_steps": 100, "log_history": ODD_LOGS[case]}, ODD_LOGS[case]):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a RuntimeWarning would reach the user's stderr
            d = diagnose(source)
        assert not [r for r in caplog.records if "internal error" in r.getMessage()]
        assert all(f.step is None or f.step >= 0 for f in d.findings)  # the schema's steps
        json.loads(d.to_json())


def test_values_near_float_max_are_judged_on_their_scale() -> None:
    """A loss at 1e308 is judged as one at 2.0: a fall then a flat stretch is a plateau, a loss
    flat from its first log never fell (loss-at-chance, offline), and neither fit overflows."""
    fell = [
        {**e, "loss": e["loss"] * 2.5e307 * (1 + max(0, 10 - i) / 10)}
        for i, e in enumerate(_flat_log())
    ]
    flat = [{**e, "loss": e["loss"] * 5e307} for e in _flat_log()]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        d = diagnose({"max_steps": 100, "log_history": fell})
        never = diagnose({"max_steps": 100, "log_history": flat})
    assert "loss-plateau" in d.slugs
    assert d.by_slug("loss-plateau")[0].evidence["level"] == pytest.approx(5e307, rel=0.01)
    assert never.slugs == {"loss-at-chance"}


# --- config -------------------------------------------------------------------------------------
def test_tiny_plateau_stride_is_refused() -> None:
    with pytest.raises(
        ValueError, match=r"plateau_start_stride must be a number >= 0.01, got 1e-300"
    ):
        DoctorConfig(plateau_start_stride=1e-300)
    assert DoctorConfig(plateau_start_stride=0.01).plateau_start_stride == 0.01


def test_slug_both_stopped_on_and_ignored_is_refused() -> None:
    with pytest.raises(ValueError, match=r"stop_on and ignore both name \['loss-plateau'\]"):
        DoctorConfig(stop_on={"loss-plateau", "overfit"}, ignore={"loss-plateau"})


def test_a_folder_without_a_trainer_state_says_how_to_get_one(tmp_path: Path) -> None:
    """The Trainer writes trainer_state.json with checkpoints or save_state(); a live run's own
    diagnosis beside it is pointed at."""
    with pytest.raises(RunReadError, match=r"save_strategy\) or on trainer.save_state\(\)$"):
        diagnose(tmp_path)
    (tmp_path / "lora_doctor.json").write_text("{}", encoding="utf-8")
    with pytest.raises(RunReadError, match=r"its lora_doctor.json already holds the live run's"):
        diagnose(tmp_path)


def test_a_diagnosis_file_is_not_taken_for_a_trainer_state(tmp_path: Path) -> None:
    report = tmp_path / "lora_doctor.json"
    diagnose({"max_steps": 100, "log_history": _flat_log()}).to_json(report)
    with pytest.raises(
        RunReadError, match=r"is a diagnosis lora-doctor wrote, not a trainer_state"
    ):
        diagnose(report)


@pytest.mark.parametrize(
    "bad", [object, object(), "loss-plateau"], ids=["class", "instance", "str"]
)
def test_extra_checks_must_be_check_classes(bad: Any) -> None:
    from lora_doctor import LoraDoctorCallback

    with pytest.raises(
        ValueError, match=r"extra_checks holds .*: each entry must be a check class"
    ):
        LoraDoctorCallback(extra_checks=[bad])


def test_a_mistyped_slug_gets_the_near_one() -> None:
    from lora_doctor import LoraDoctorCallback

    with pytest.raises(
        ValueError, match=r"did you mean 'alpha-rank-ratio' for 'alpha-rank-ration'"
    ):
        LoraDoctorCallback(ignore={"alpha-rank-ration"})
