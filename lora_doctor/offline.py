"""The offline doctor: diagnoses a finished (or stopped) run from the files it saved.

It reads a ``trainer_state.json`` (from a run folder, a checkpoint folder, or the file itself) and the
``adapter_config.json`` beside it, then replays the log entry by entry through the same
:class:`~lora_doctor.engine.Doctor` phases as the live callback (SETUP, then LOG for each training
entry and EVAL for each evaluation entry, then END), so the same logs give the same verdicts at the
same steps. No torch is needed.
"""

from __future__ import annotations

import collections
import json
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_doctor.checks import Phase
from lora_doctor.config import DoctorConfig
from lora_doctor.engine import Doctor
from lora_doctor.facts import AdapterFacts, RunFacts
from lora_doctor.history import as_float
from lora_doctor.report import REPORT_NAME, Diagnosis

__all__ = [
    "RunFiles",
    "RunReadError",
    "adapter_width",
    "diagnose",
    "input_files",
    "load_run",
    "replay",
]

STATE_NAME = "trainer_state.json"
ADAPTER_NAME = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")

PathLike = str | os.PathLike[str]


class RunReadError(ValueError):
    """The run could not be read: a missing or malformed file, or an argument of
    :func:`diagnose` of the wrong type. The message is one line that names the problem (the file
    or the argument, and what it should be)."""


@dataclass
class RunFiles:
    """What a saved run tells: its log, the trainer state's scalars, and its adapter config.

    Attributes:
        log_history: the entries of ``trainer_state.json``'s ``log_history``, in order.
        state: the other top-level fields of the trainer state (``max_steps``, ``global_step`` ...).
        adapter_config: the parsed ``adapter_config.json``, or None when there is none.
        state_path: the file the log was read from (None for in-memory input).
        hidden_size: the model's width as the saved adapter weights tell it
            (:func:`adapter_width`), or None.
    """

    log_history: list[Mapping[str, Any]]
    state: dict[str, Any] = field(default_factory=dict)
    adapter_config: dict[str, Any] | None = None
    state_path: Path | None = None
    hidden_size: int | None = None


def _read_json(path: Path, what: str) -> Any:
    try:
        if path.exists() and not path.is_file():  # a FIFO would block the read forever
            raise RunReadError(f"{what} {path} is not a regular file")
        # json accepts the NaN and Infinity literals Python's json writes
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise RunReadError(f"cannot read {what} {path}: {err.strerror or err}") from None
    except UnicodeDecodeError:
        raise RunReadError(f"{what} {path} is not UTF-8 text") from None
    except json.JSONDecodeError as err:
        raise RunReadError(
            f"{what} {path} is not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})"
        ) from None
    except RecursionError:
        raise RunReadError(f"{what} {path} is nested too deeply to be a {what}") from None
    except MemoryError:
        raise RunReadError(f"{what} {path} is too large to read into memory") from None


def _find_state(path: Path) -> Path:
    """The trainer_state.json a path names: the file, the folder's own, or its latest checkpoint's."""
    try:
        return _search_state(path)
    except OSError as err:  # a folder that cannot be listed, a path that cannot be looked at
        raise RunReadError(f"cannot read {err.filename or path}: {err.strerror or err}") from None


def _search_state(path: Path) -> Path:
    if not path.exists():
        raise RunReadError(f"{path} does not exist")
    if path.is_file():
        return path
    if not path.is_dir():
        raise RunReadError(
            f"{path} is neither a file nor a folder: name a run folder, a checkpoint folder or "
            f"a {STATE_NAME}"
        )
    own = path / STATE_NAME
    if own.is_file():
        return own
    checkpoints = []
    for child in path.iterdir():
        m = _CHECKPOINT.match(child.name)
        if m and (child / STATE_NAME).is_file():
            checkpoints.append((int(m.group(1)), child / STATE_NAME))
    if checkpoints:
        return max(checkpoints)[1]
    live = (
        f"; its {REPORT_NAME} already holds the live run's diagnosis"
        if (path / REPORT_NAME).is_file()
        else ""
    )
    raise RunReadError(
        f"no {STATE_NAME} in {path} (nor in a checkpoint-N folder inside it): the Trainer writes "
        f"one with each checkpoint (save_strategy) or on trainer.save_state(){live}"
    )


def load_run(
    source: PathLike, adapter_config: PathLike | Mapping[str, Any] | None = None
) -> RunFiles:
    """Reads a saved run: a run folder, a checkpoint folder or a ``trainer_state.json``.

    A run folder without its own trainer_state.json is read from its latest ``checkpoint-N``. The
    ``adapter_config.json`` is looked for beside the trainer state, then in the folder named (the
    model's width is read from the ``adapter_model.safetensors`` beside it, :func:`adapter_width`);
    it is read strictly (:meth:`~lora_doctor.facts.AdapterFacts.parse_config`): a field of the wrong type
    is an error that names it, since guessing it (is ``"false"`` false? peft takes it as true)
    could give a confident wrong verdict on the adapter.

    Raises:
        RunReadError: a missing file, unreadable JSON, a file that is not a trainer state, or an
            adapter config with a field of the wrong type.

    Example:
        >>> run = load_run("outputs/checkpoint-500")  # doctest: +SKIP
        >>> run.state["max_steps"]  # doctest: +SKIP
        1000
    """
    path = Path(source)
    state_path = _find_state(path)
    adapter = _adapter(adapter_config)
    data = _read_json(state_path, "trainer state")
    if not isinstance(data, Mapping):
        raise RunReadError(f"{state_path} is not a trainer state (a JSON object with log_history)")
    log = data.get("log_history")
    if not isinstance(log, list):
        if isinstance(data.get("findings"), list) and "schema_version" in data:
            raise RunReadError(
                f"{state_path} is a diagnosis lora-doctor wrote, not a trainer_state.json: read it "
                "with lora_doctor.Diagnosis.from_dict(json.load(...)), or diagnose the run folder"
            )
        raise RunReadError(f"{state_path} has no log_history list: not a trainer_state.json")
    state = {k: v for k, v in data.items() if k != "log_history"}
    folders = [state_path.parent] + ([path] if path.is_dir() else [])
    if isinstance(adapter_config, (str, os.PathLike)):
        folders = [Path(adapter_config).parent]
    elif adapter is None and adapter_config is None:
        found = [f for f in folders if (f / ADAPTER_NAME).is_file()]
        folders = found[:1]
        if found:
            adapter = _read_adapter(found[0] / ADAPTER_NAME)
    width = next((w for f in folders if (w := adapter_width(f)) is not None), None)
    entries = [e for e in log if isinstance(e, Mapping)]
    return RunFiles(entries, state, adapter, state_path, width)


#: Layers whose input is the hidden size (peft's target names): the width is read from these when
#: the adapter has any, else from every LoRA layer.
_HIDDEN_IN = frozenset(
    {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "c_attn", "c_fc", "query", "key"}
    | {"value", "q", "k", "v", "wi", "wi_0", "wi_1", "fc1", "qkv_proj", "W_pack", "Wqkv"}
    | {"query_key_value", "w1", "w3", "in_proj"}
)
#: Widths a model's hidden size can have; anything else in a file is not one.
_WIDTH_BOUNDS = (8, 65536)


def adapter_width(folder: Path) -> int | None:
    """The model's hidden size as the LoRA weights saved in ``folder`` tell it: the input size of
    the ``lora_A`` matrices (r x in_features) in ``adapter_model.safetensors``, read from the
    file's header without loading a tensor. It is taken from the layers whose input is the hidden
    size (the attention's q, k and v projections, the MLP's up and gate ...) when the adapter has
    any, else from every LoRA layer: the most common value, a tie going to the smaller (the MLP's
    inner size, ``down_proj``'s input, is the larger). None when there is no such file, the
    ``safetensors`` package is not installed, the file cannot be read, or the value is outside 8
    to 65,536.

    Example:
        >>> adapter_width(Path("outputs/checkpoint-500"))  # doctest: +SKIP
        4096
    """
    path = folder / ADAPTER_WEIGHTS
    if not path.is_file():
        return None
    try:
        from safetensors import safe_open  # with transformers; the bare install goes without
    except ImportError:
        return None
    try:
        with safe_open(str(path), framework="numpy") as weights:
            shapes = [
                (key.split(".lora_A.")[0].rsplit(".", 1)[-1], weights.get_slice(key).get_shape())
                for key in weights.keys()  # noqa: SIM118 - safe_open has no __iter__
                if ".lora_A." in key and key.endswith(".weight")
            ]
    except Exception:  # a damaged or foreign file: the width stays unknown
        return None
    low, high = _WIDTH_BOUNDS
    inputs = [(name, int(s[1])) for name, s in shapes if len(s) == 2 and low <= s[1] <= high]
    hidden = [n for name, n in inputs if name in _HIDDEN_IN] or [n for _, n in inputs]
    counts = collections.Counter(hidden)
    return max(counts, key=lambda n: (counts[n], -n)) if counts else None


def input_files(source: PathLike) -> list[Path]:
    """The files :func:`diagnose` reads for ``source``: the trainer state, and the adapter config
    and weights beside it or in the folder named, those that exist (what an output must not
    overwrite).

    Raises:
        RunReadError: as :func:`load_run`, when there is no trainer state to read.
    """
    path = Path(source)
    state = _find_state(path)
    folders = [state.parent] + ([path] if path.is_dir() else [])
    names = (ADAPTER_NAME, ADAPTER_WEIGHTS)
    return [state] + [f / n for f in folders for n in names if (f / n).is_file()]


def _adapter(adapter_config: Any) -> dict[str, Any] | None:
    """The adapter config given to :func:`load_run` or :func:`diagnose`: a dict, a path, or None."""
    if adapter_config is None:
        return None
    if isinstance(adapter_config, Mapping):
        return _checked_adapter(dict(adapter_config), "adapter_config", "")
    if isinstance(adapter_config, (str, os.PathLike)):
        return _read_adapter(Path(adapter_config))
    raise RunReadError(
        "adapter_config must be the path of an adapter_config.json or its dict, got "
        f"{type(adapter_config).__name__}"
    )


def _read_adapter(path: Path) -> dict[str, Any]:
    data = _read_json(path, "adapter config")
    if not isinstance(data, Mapping):
        raise RunReadError(f"adapter config {path} is not a JSON object")
    return _checked_adapter(dict(data), f"adapter config {path}", " (correct the file)")


def _checked_adapter(data: dict[str, Any], what: str, fix: str) -> dict[str, Any]:
    """``data`` when every field the doctor reads has peft's type; else one line naming them."""
    problems = AdapterFacts.parse_config("default", data)[1]
    if not isinstance(data.get("peft_type", ""), str):
        problems.append(f"peft_type must be text, got {data['peft_type']!r:.40}")
    if problems:
        raise RunReadError(f"{what}: {'; '.join(problems)}{fix}")
    return data


def _int(value: Any) -> int:
    """A whole number from a saved field; 0 when it is not a finite number."""
    number = as_float(value)
    if number is None or not math.isfinite(number):
        return 0
    return value if isinstance(value, int) else int(number)


def _peak_learning_rate(log: Iterable[Mapping[str, Any]]) -> float | None:
    """The largest finite ``learning_rate`` logged, or None."""
    peak = -math.inf
    for entry in log:
        v = entry.get("learning_rate")
        if type(v) is float:  # the common case, without the checks below
            if v > peak and v != math.inf:
                peak = v
        else:
            number = as_float(v)
            if number is not None and math.isfinite(number):
                peak = max(peak, number)
    return peak if peak > -math.inf else None


def facts_from_files(run: RunFiles) -> RunFacts:
    """The run facts a saved run tells: planned length, the step reached (and whether the state is a
    checkpoint's), peak learning rate, adapter config."""
    facts = RunFacts()
    facts.max_steps = max(0, _int(run.state.get("max_steps")))  # 0: not known
    if "global_step" in run.state:
        facts.saved_global_step = _int(run.state.get("global_step"))
    folder = run.state_path.parent if run.state_path is not None else None
    if folder is not None and _CHECKPOINT.match(folder.name):
        facts.saved_checkpoint = folder.name
    epochs = run.state.get("num_train_epochs")
    # an "infinite" epoch count (sys.maxsize when max_steps drives the run) is not a plan
    if isinstance(epochs, (int, float)) and not isinstance(epochs, bool) and 0 < epochs < 1e6:
        facts.num_train_epochs = float(epochs)
    # the configured rate is the peak of the schedule, not the first (warm-up) value
    facts.learning_rate = _peak_learning_rate(run.log_history)
    setup = facts.setup
    for key in ("logging_steps", "save_steps"):
        value = _int(run.state.get(key))
        setattr(setup, key, value if value > 0 else None)
    setup.metric_for_best_model = _best_metric_name(run)
    if run.state_path is not None:
        folder = run.state_path.parent
        if _CHECKPOINT.match(folder.name):  # a checkpoint's own state: the run is one folder up
            folder = folder.parent
        setup.output_dir = str(folder)
        try:
            names = [p.name for p in folder.iterdir()]
        except OSError:
            names = []
        setup.checkpoint_steps = sorted(
            int(m.group(1)) for n in names if (m := _CHECKPOINT.match(n))
        )
    setup.hidden_size = run.hidden_size
    if run.adapter_config is not None:
        facts.adapters = {"default": AdapterFacts.from_config("default", run.adapter_config)}
        peft_type = str(run.adapter_config.get("peft_type", "LORA")).upper()
        facts.has_lora = True if peft_type in ("LORA", "ADALORA") else None
    return facts


def _best_metric_name(run: RunFiles) -> str | None:
    """The run's ``metric_for_best_model``, which the trainer state does not name: the one
    evaluation metric logged at ``best_global_step`` with the value ``best_metric``; None when
    no single one matches (no best model kept, or an older trainer state without the step)."""
    best, step = run.state.get("best_metric"), run.state.get("best_global_step")
    if isinstance(best, bool) or not isinstance(best, (int, float)) or not math.isfinite(best):
        return None
    names = {
        key
        for entry in run.log_history
        if entry.get("step") == step
        for key, value in entry.items()
        if key.startswith("eval_")
        and isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isclose(value, best, rel_tol=1e-9, abs_tol=1e-12)
    }
    return names.pop() if len(names) == 1 else None


def replay(doctor: Doctor, entries: Iterable[Mapping[str, Any]]) -> Doctor:
    """Feeds saved log entries to ``doctor`` as the live callback would, then ends the run.

    SETUP runs first, then each entry is observed and its phase run (EVAL for evaluation entries,
    LOG for the others) at the entry's step (see :meth:`~lora_doctor.history.History.add`: an
    entry without a usable step takes the last one), and END last.
    """
    doctor.start()
    for entry in entries:
        doctor.observe(None, entry)  # the entry's own step (History.add reads it)
    doctor.run_phase(Phase.END)
    return doctor


def diagnose(
    path_or_log_history: PathLike | Iterable[Mapping[str, Any]] | Mapping[str, Any],
    adapter_config: PathLike | Mapping[str, Any] | None = None,
    *,
    config: DoctorConfig | None = None,
) -> Diagnosis:
    """Diagnoses a finished run from its saved files or its log history.

    Args:
        path_or_log_history: a run folder, a ``checkpoint-N`` folder, a ``trainer_state.json``
            path, a parsed trainer state (a dict with ``log_history``), or the ``log_history``
            list itself.
        adapter_config: the LoRA config (path to ``adapter_config.json`` or its dict); by default
            the one beside the trainer state, if any.
        config: thresholds; defaults when None.

    Returns:
        The :class:`~lora_doctor.Diagnosis`, with ``source="offline"``; its ``history`` holds the
        replayed curves (for :func:`lora_doctor.plot.plot_diagnosis`).

    Raises:
        RunReadError: (a ``ValueError``) when the input cannot be read or holds no log entry, or
            an argument is of the wrong type (the message names it).

    Example:
        >>> d = diagnose([{"step": 10, "loss": 2.0}, {"step": 20, "loss": 1.9}])
        >>> d.source
        'offline'
    """
    if config is not None and not isinstance(config, DoctorConfig):
        raise RunReadError(f"config must be a DoctorConfig or None, got {type(config).__name__}")
    source = path_or_log_history
    if isinstance(source, (str, os.PathLike)):
        run = load_run(source, adapter_config)
    elif isinstance(source, Mapping):
        log = source.get("log_history")
        if not isinstance(log, (list, tuple)):
            raise RunReadError(
                "the trainer state given has no log_history list (got "
                f"{type(log).__name__}): pass a trainer_state.json's content or its log_history"
            )
        state = {k: v for k, v in source.items() if k != "log_history"}
        run = RunFiles([e for e in log if isinstance(e, Mapping)], state, _adapter(adapter_config))
    elif isinstance(source, Iterable) and not isinstance(source, (bytes, bytearray)):
        entries = [e for e in source if isinstance(e, Mapping)]
        run = RunFiles(entries, {}, _adapter(adapter_config))
    else:
        raise RunReadError(
            "path_or_log_history must be a path, a trainer state dict or a log_history list, "
            f"got {type(source).__name__}"
        )
    if not run.log_history:
        where = f" in {run.state_path}" if run.state_path else ""
        raise RunReadError(f"the log is empty{where}: log_history has no entries to diagnose")
    doctor = Doctor(config, facts_from_files(run), emit=False)
    replay(doctor, run.log_history)
    diagnosis = doctor.diagnosis("offline")
    if run.state_path is not None:
        diagnosis.run["trainer_state"] = str(run.state_path)
    return diagnosis
