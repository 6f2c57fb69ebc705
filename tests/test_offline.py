"""The offline doctor and the ``lora-doctor diagnose`` command: folders, checkpoints, messy logs,
unreadable input, exit codes, the plot, and the labelled corpus of real runs."""

from __future__ import annotations

import csv
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lora_doctor import diagnose
from lora_doctor.cli import main
from lora_doctor.offline import RunReadError

#: The shared corpus sits beside the checkout (``../shared``), in CI as here.
CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus" / "wild-dev"


def _state(log: list[dict], **extra) -> dict:
    steps = [e.get("step", 0) for e in log if isinstance(e, dict)]
    return {"global_step": max(steps, default=0), "max_steps": 100, "log_history": log, **extra}


def _flat_log(n: int = 100, level: float = 2.0) -> list[dict]:
    """A loss that falls in its first five logs, then stays flat: a plateau."""
    return [
        {
            "loss": level + 0.01 * ((i * 7) % 5 - 2) + (1.0 if i < 5 else 0.0),
            "step": i + 1,
            "learning_rate": 2e-4,
        }
        for i in range(n)
    ]


def _write(folder: Path, state: dict | str, adapter: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    text = state if isinstance(state, str) else json.dumps(state)
    (folder / "trainer_state.json").write_text(text)
    if adapter is not None:
        (folder / "adapter_config.json").write_text(json.dumps(adapter))
    return folder


ADAPTER = {"peft_type": "LORA", "r": 16, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"]}


# --- where the files are ---------------------------------------------------------------------------
def _adapter_weights(folder: Path, width: int, intermediate: int, r: int = 8) -> None:
    """An adapter_model.safetensors as peft saves it for LoRA on every linear layer of a Llama."""
    import numpy as np
    from safetensors.numpy import save_file

    ins = {"q_proj": width, "k_proj": width, "v_proj": width, "o_proj": width}
    ins |= {"gate_proj": width, "up_proj": width, "down_proj": intermediate}
    tensors = {}
    for layer in range(2):
        for name, n in ins.items():
            prefix = f"base_model.model.model.layers.{layer}.{name}"
            tensors[f"{prefix}.lora_A.weight"] = np.zeros((r, n), dtype=np.float32)
            tensors[f"{prefix}.lora_B.weight"] = np.zeros((n, r), dtype=np.float32)
    save_file(tensors, str(folder / "adapter_model.safetensors"))


@pytest.mark.parametrize(
    ("weights", "width", "severity"),
    [((64, 172), 64, "info"), ((4096, 11008), 4096, "warning"), (None, None, "warning")],
    ids=["tiny-model-weights", "7b-weights", "no-weights"],
)
def test_the_width_comes_from_the_saved_adapter_weights(
    tmp_path: Path, weights: tuple[int, int] | None, width: int | None, severity: str
) -> None:
    """A rate of 0.02 is 8.7x the top of a 64-wide model's range (information, as live) but 20x a
    7B model's (a warning); with no weights to read the width from, the 7B range is said to apply."""
    lora = {**ADAPTER, "lora_alpha": 32}
    log = [{**e, "learning_rate": 0.02} for e in _flat_log(20)]
    run = _write(tmp_path / "run", _state(log), lora)
    if weights is not None:
        _adapter_weights(run, *weights)
    d = diagnose(run)
    assert d.run["setup"]["hidden_size"] == width
    (f,) = [f for f in d.findings if f.slug == "learning-rate-too-high"]
    assert f.severity.value == severity
    assert ("width is not known here" in f.message) is (width is None)


@pytest.mark.parametrize(
    ("layers", "width"),
    [
        ({"o_proj": 4096, "down_proj": 11008}, 4096),  # a tie: the smaller, not the MLP's inner
        ({"v_proj": 4096, "down_proj": 11008}, 4096),  # v_proj takes the hidden size in
        ({"down_proj": 11008, "q_proj": 4096, "fc2": 11008}, 4096),  # q_proj's input, outnumbered
        ({"c_attn": 768, "c_proj": 768}, 768),
        ({"q_proj": 1 << 30}, None),  # no model is this wide: not a width
        ({"q_proj": 1}, None),
    ],
    ids=["tie", "v-and-down", "most-are-inner", "gpt2", "absurd", "one"],
)
def test_the_width_is_the_hidden_size_not_the_mlps(
    tmp_path: Path, layers: dict[str, int], width: int | None
) -> None:
    import numpy as np
    from safetensors.numpy import save_file

    from lora_doctor.offline import adapter_width

    prefix = "base_model.model.model.layers.0"
    save_file(
        {f"{prefix}.x.{name}.lora_A.weight": np.zeros((2, n) if n < 1 << 20 else (0, n), np.float32)
         for name, n in layers.items()},
        str(tmp_path / "adapter_model.safetensors"),
    )  # fmt: skip
    assert adapter_width(tmp_path) == width


def test_an_unreadable_weights_file_leaves_the_width_unknown(tmp_path: Path) -> None:
    run = _write(tmp_path / "run", _state(_flat_log(20)), ADAPTER)
    (run / "adapter_model.safetensors").write_bytes(b"\x00\x01 not safetensors")
    assert diagnose(run).run["setup"]["hidden_size"] is None


def test_run_folder_reads_the_adapter_config_beside_it(tmp_path: Path) -> None:
    run = _write(tmp_path / "run", _state(_flat_log()), ADAPTER)
    d = diagnose(run)
    assert d.source == "offline"
    assert d.run["adapters"]["default"]["r"] == 16
    assert d.run["has_lora"] is True
    assert "alpha-rank-ratio" in d.slugs  # the static check runs from adapter_config.json
    assert "loss-plateau" in d.slugs


def test_run_folder_with_only_checkpoints_takes_the_latest(tmp_path: Path) -> None:
    _write(tmp_path / "out" / "checkpoint-50", _state(_flat_log(50)))
    _write(tmp_path / "out" / "checkpoint-100", _state(_flat_log(100)), ADAPTER)
    _write(tmp_path / "out" / "checkpoint-9", _state(_flat_log(9)))
    d = diagnose(tmp_path / "out")
    assert d.run["global_step"] == 100
    assert d.run["trainer_state"].endswith("checkpoint-100/trainer_state.json")


def test_bare_file_and_in_memory_inputs_agree(tmp_path: Path) -> None:
    state = _state(_flat_log())
    path = _write(tmp_path, state) / "trainer_state.json"
    from_file = diagnose(path)
    from_dict = diagnose(state)
    assert [f.to_dict() for f in from_file.findings] == [f.to_dict() for f in from_dict.findings]
    # a bare log_history list has no max_steps: still read, judged on what it has
    assert diagnose(state["log_history"]).source == "offline"


def test_adapter_config_given_explicitly(tmp_path: Path) -> None:
    d = diagnose(_state(_flat_log()), adapter_config=ADAPTER)
    assert d.run["adapters"]["default"]["lora_alpha"] == 4


# --- messy logs ------------------------------------------------------------------------------------
MESSY = {
    "no-logging-steps": _state(_flat_log()),
    "float-logging-steps": _state(_flat_log(), logging_steps=10.0, eval_steps=0.1),
    "custom-keys-only": _state([{"my_metric": i, "step": i} for i in range(1, 50)]),
    "stopped-before-max-steps": {**_state(_flat_log(30)), "max_steps": 1000},
    "nan-and-infinity-literals": '{"max_steps": 10, "log_history": [{"loss": NaN, "step": 1}, '
    '{"loss": 1.0, "grad_norm": Infinity, "step": 2}, {"loss": 1.0, "grad_norm": -Infinity, "step": 3}]}',
    "entries-without-step": _state(
        [{"loss": 2.0}, {"loss": 1.9}, {"loss": "n/a", "step": 3}, 5, None]
    ),
    "infinite-epoch-count": _state(_flat_log(), num_train_epochs=9223372036854775807),
}


@pytest.mark.parametrize("case", list(MESSY), ids=list(MESSY))
def test_messy_logs_are_read(tmp_path: Path, case: str) -> None:
    d = diagnose(_write(tmp_path, MESSY[case]))
    json.loads(d.to_json())  # strict JSON out
    if case == "nan-and-infinity-literals":
        assert "non-finite-values" in d.slugs
    if case in ("custom-keys-only", "stopped-before-max-steps"):
        assert d.slugs == {"training-stopped-early"}  # below max_steps, and no curve finding


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda p: p / "missing", "does not exist"),
        (lambda p: _write(p, "{not json"), "is not valid JSON (line 1"),
        (lambda p: (p / "empty").mkdir() or p / "empty", "no trainer_state.json in"),
        (lambda p: _write(p, _state([])), "the log is empty"),
        (lambda p: _write(p, "[1, 2]"), "is not a trainer state"),
        (lambda p: _write(p, '{"global_step": 3}'), "has no log_history list"),
    ],
    ids=["missing", "bad-json", "no-state-file", "empty-log", "not-an-object", "no-log-history"],
)
def test_unreadable_input_names_the_problem(tmp_path: Path, setup, message: str, capsys) -> None:
    path = setup(tmp_path)
    with pytest.raises(RunReadError) as err:
        diagnose(path)
    assert message in str(err.value)
    # the command: exit 2, one line on stderr, no traceback
    assert main(["diagnose", str(path)]) == 2
    err_text = capsys.readouterr().err
    assert err_text.count("\n") == 1 and message in err_text and "Traceback" not in err_text


# --- the command -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("log", "fail_on", "code"),
    [
        (_flat_log(), "error", 0),  # a plateau is a warning
        (_flat_log(), "warning", 1),
        ([{"loss": math.nan, "step": 1}, *_flat_log()[1:]], "error", 1),
        ([{"loss": 2.0 - 0.01 * i, "step": i + 1} for i in range(100)], "warning", 0),
    ],
    ids=["warning-below-error", "warning-at-warning", "error", "clean"],
)
def test_exit_codes(tmp_path: Path, log: list[dict], fail_on: str, code: int, capsys) -> None:
    run = _write(tmp_path, _state(log))  # json.dumps writes NaN literals, as the Trainer does
    out_json = tmp_path / "d.json"
    assert main(["diagnose", str(run), "--json", str(out_json), "--fail-on", fail_on]) == code
    printed = capsys.readouterr().out
    assert printed.startswith("lora-doctor:")
    assert json.loads(out_json.read_text())["source"] == "offline"


def test_unwritable_output_is_one_line(tmp_path: Path, capsys) -> None:
    run = _write(tmp_path / "run", _state(_flat_log()))
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["diagnose", str(run), "--json", str(blocker / "d.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lora-doctor: error: cannot write") and err.count("\n") == 1


def test_command_runs_as_a_module(tmp_path: Path) -> None:
    run = _write(tmp_path, _state(_flat_log()))
    done = subprocess.run(
        [sys.executable, "-m", "lora_doctor.cli", "diagnose", str(run), "--fail-on", "warning"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 1 and "LD201 loss-plateau" in done.stdout


def test_plot_is_written(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    run = _write(tmp_path / "run", _state(_flat_log()))
    out = tmp_path / "plot.png"
    assert main(["diagnose", str(run), "--plot", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_of_a_diagnosis_read_from_json_explains(tmp_path: Path) -> None:
    from lora_doctor.report import Diagnosis

    d = Diagnosis.from_dict(diagnose(_state(_flat_log())).to_dict())
    with pytest.raises(ValueError, match="carries no curves"):
        d.plot(tmp_path / "x.png")


# --- the labelled corpus of real runs ------------------------------------------------------------------
def _corpus_rows() -> list[dict]:
    if not (CORPUS / "runs.tsv").is_file():
        return []
    with open(CORPUS / "runs.tsv", encoding="utf-8") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


ROWS = {r["id"]: r for r in _corpus_rows()}
# a few runs that cover each kind of verdict: plateau, none, NaN + zero loss, GRPO, DPO, overfit
PICKED = ["007", "026", "028", "014", "019", "052", "060", "009"]


@pytest.mark.skipif(not ROWS, reason="the shared corpus is not on this machine")
@pytest.mark.parametrize("run_id", PICKED, ids=PICKED)
def test_corpus_run(run_id: str, tmp_path: Path) -> None:
    row = ROWS[run_id]
    # through a copy: the command reads the folder as a user's would
    run = shutil.copytree(CORPUS / run_id, tmp_path / run_id)
    found = diagnose(run).slugs
    must = {s for s in row["must"].split(",") if s}
    must_not = {s for s in row["must_not"].split(",") if s}
    assert must <= found, f"missed {must - found}"
    assert not (must_not & found), f"false alarms {must_not & found}"
