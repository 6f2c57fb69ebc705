"""Property: whatever the Trainer logs, the live callback never raises, never warns, never
switches itself off, and always writes its JSON at the end of training.

The callback is driven through its Trainer events with real ``TrainingArguments`` and
``TrainerState`` (no model: the probes that need one stay idle), on sequences of logged dicts
with any keys and JSON-like values, integers too large for a float, NaN and infinities, nested
values and objects whose ``.item()`` fails.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import TrainerControl, TrainerState, TrainingArguments

from lora_doctor import LoraDoctorCallback


class _Unreadable:
    def item(self) -> float:
        raise ValueError("no scalar here")

    def __repr__(self) -> str:
        return "_Unreadable()"


_KEYS = st.one_of(
    st.sampled_from(
        ["loss", "grad_norm", "learning_rate", "epoch", "eval_loss", "step", "train_loss"]
    ),
    st.text(max_size=12),
    st.integers(),
    st.none(),
)
_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=1e307, max_value=1.7e308),
    st.integers(),
    st.integers(min_value=10**308, max_value=10**400) | st.integers(max_value=-(10**308)),
    st.sampled_from(["nan", "inf", "-Infinity", ""]),
    st.text(max_size=8),
    st.builds(_Unreadable),
)
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner),
    max_leaves=4,
)
_ENTRIES = st.lists(st.dictionaries(_KEYS, _VALUES, max_size=6), max_size=12)
#: Steps at which each entry is logged: increasing, repeated or going back.
_STEPS = st.lists(st.integers(min_value=0, max_value=50), max_size=12)


class _Problems(logging.Handler):
    """Collects the doctor's own complaints: internal errors and switched-off parts."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "internal error" in message or "switched off" in message:
            self.messages.append(message)


def _strict(text: str) -> Any:
    def refuse(constant: str) -> Any:
        raise ValueError(f"not strict JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def test_any_logged_sequence(tmp_path: Path) -> None:
    args = TrainingArguments(
        output_dir=str(tmp_path), report_to=[], use_cpu=True, max_steps=50, disable_tqdm=True
    )
    report = tmp_path / "lora_doctor.json"

    @settings(
        max_examples=60,
        derandomize=True,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(entries=_ENTRIES, steps=_STEPS)
    def run(entries: list[dict[Any, Any]], steps: list[int]) -> None:
        report.unlink(missing_ok=True)
        callback = LoraDoctorCallback(report_path=report)
        state, control = TrainerState(max_steps=50), TrainerControl()
        problems = _Problems()
        logger = logging.getLogger("lora_doctor")
        logger.addHandler(problems)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # a warning reaching the user is a failure
                callback.on_train_begin(args, state, control)
                for i, logs in enumerate(entries):
                    state.global_step = steps[i] if i < len(steps) else i + 1
                    callback.on_step_end(args, state, control)
                    callback.on_log(args, state, control, logs=logs)
                    if any(isinstance(k, str) and k.startswith("eval_") for k in logs):
                        callback.on_evaluate(args, state, control, metrics=logs)
                callback.on_train_end(args, state, control)
        finally:
            logger.removeHandler(problems)
        assert problems.messages == []
        written = _strict(report.read_text())
        assert written["schema_version"] == 1
        used = [steps[i] if i < len(steps) else i + 1 for i in range(len(entries))]
        assert written["run"]["global_step"] == max([0, *used])

    run()
