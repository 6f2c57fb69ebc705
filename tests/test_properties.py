"""Property-based tests (Hypothesis): whatever a saved run holds, the offline doctor returns a
diagnosis or raises its documented error, and the command exits 0, 1 or 2 with no traceback.

Every example also runs with warnings turned into errors and with the ``lora_doctor`` logger
watched: a numpy/scipy RuntimeWarning or an internal error of a check (which the engine would log
and switch the check off for) fails the property. The examples are derandomized and few, so the
module is deterministic and takes seconds on two cores.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lora_doctor import Diagnosis, diagnose
from lora_doctor.cli import main
from lora_doctor.offline import RunReadError
from lora_doctor.report import load_schema

SETTINGS = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

#: Numbers a log can hold, the awkward ones included: non-finite, near the float limits, signed
#: zero, tiny, huge integers (beyond a float, as in ``{"loss": 10**400}``).
NUMBERS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, 1e308, -1e308, 5e-324, 1.7976931348623157e308, 2.5, 1e-12]),
    st.integers(min_value=-(10**6), max_value=10**6),
    st.sampled_from([10**400, -(10**400), 2**63, -(2**63)]),
)
JSON_SCALARS = st.one_of(st.none(), st.booleans(), NUMBERS, st.text(max_size=8))
JSON = st.recursive(
    JSON_SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)
KEYS = st.sampled_from(
    [
        "loss",
        "eval_loss",
        "grad_norm",
        "learning_rate",
        "epoch",
        "step",
        "train_loss",
        "reward",
        "rewards/chosen",
        "eval_accuracy",
        "lora_doctor/peak_gib",
    ]
)
STEPS = st.one_of(
    st.integers(min_value=-5, max_value=10_000),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([10**400, "12", None, True]),
)
ENTRY = st.dictionaries(KEYS, st.one_of(NUMBERS, JSON), max_size=5).flatmap(
    lambda d: st.builds(lambda step: {**d, "step": step}, STEPS) if "step" not in d else st.just(d)
)
#: Logs that look like training: a loss per step, with the steps and values perturbed.
CURVE = st.builds(
    lambda n, start, scale, noise, same: [
        {
            "loss": start * math.exp(-scale * i) + noise * ((i * 7919) % 13 - 6),
            "grad_norm": 1.0 + noise * (i % 5),
            "learning_rate": 2e-4,
            "step": 5 if same else i + 1,
        }
        for i in range(n)
    ],
    st.integers(min_value=1, max_value=120),
    st.one_of(st.floats(min_value=-1e308, max_value=1e308), st.sampled_from([1e308, -1e308])),
    st.floats(min_value=0, max_value=1),
    st.floats(min_value=0, max_value=1e300),
    st.booleans(),
)
LOGS = st.one_of(st.lists(st.one_of(ENTRY, JSON), max_size=30), CURVE)
ADAPTER_KEYS = st.sampled_from(
    [
        "r",
        "lora_alpha",
        "use_rslora",
        "use_dora",
        "init_lora_weights",
        "target_modules",
        "rank_pattern",
        "alpha_pattern",
        "lora_dropout",
        "bias",
        "modules_to_save",
        "task_type",
        "base_model_name_or_path",
        "peft_type",
    ]
)
ADAPTER = st.dictionaries(ADAPTER_KEYS, JSON, max_size=6)
GOOD_ADAPTER = st.fixed_dictionaries(
    {
        "r": st.integers(min_value=1, max_value=512),
        "lora_alpha": st.one_of(st.integers(min_value=-64, max_value=1024), st.floats(0.01, 1e6)),
        "use_rslora": st.booleans(),
        "target_modules": st.sampled_from([["q_proj", "v_proj"], "all-linear", ["down_proj"]]),
        "rank_pattern": st.dictionaries(st.text(max_size=5), st.integers(1, 64), max_size=2),
    }
)


@contextlib.contextmanager
def _strict() -> Iterator[list[logging.LogRecord]]:
    """Warnings as errors, and the records the ``lora_doctor`` logger emitted."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = records.append  # type: ignore[method-assign]
    log = logging.getLogger("lora_doctor")
    log.addHandler(handler)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            yield records
    finally:
        log.removeHandler(handler)


def _check(source: Any, adapter_config: Any = None) -> Diagnosis | None:
    """Diagnoses ``source``: a Diagnosis whose JSON meets the schema, or RunReadError; nothing else,
    no warning and no internal error of a check."""
    with _strict() as records:
        try:
            diagnosis = diagnose(source, adapter_config)
        except RunReadError as err:
            assert "\n" not in str(err)
            diagnosis = None
        if diagnosis is not None:
            data = json.loads(diagnosis.to_json())  # strict JSON: no NaN
            jsonschema.validate(data, load_schema())
            diagnosis.summary()
    internal = [r.getMessage() for r in records if "internal error" in r.getMessage()]
    assert not internal, internal
    return diagnosis


@SETTINGS
@given(state=JSON)
def test_any_json_value_as_a_trainer_state(state: Any) -> None:
    _check(state)


@SETTINGS
@given(log=LOGS, max_steps=st.one_of(NUMBERS, JSON))
def test_any_log_entries(log: list[Any], max_steps: Any) -> None:
    _check({"max_steps": max_steps, "log_history": log})
    _check(log)


@SETTINGS
@given(log=CURVE, adapter=st.one_of(ADAPTER, GOOD_ADAPTER, JSON))
def test_any_adapter_config(log: list[dict[str, Any]], adapter: Any) -> None:
    try:
        diagnosis = _check({"max_steps": 100, "log_history": log}, adapter)
    except RunReadError:  # an adapter_config that is neither a dict nor a path
        assert not isinstance(adapter, dict)
        return
    if isinstance(adapter, dict) and diagnosis is not None and adapter.get("r") is not None:
        assert diagnosis.run["adapters"]["default"]["r"] == adapter["r"]


@SETTINGS
@given(state=st.one_of(JSON, st.builds(lambda log: {"log_history": log}, LOGS)), adapter=ADAPTER)
def test_command_exits_0_1_or_2_without_a_traceback(
    tmp_path_factory: Any, state: Any, adapter: dict[str, Any]
) -> None:
    run = tmp_path_factory.mktemp("run")
    (run / "trainer_state.json").write_text(json.dumps(state))
    (run / "adapter_config.json").write_text(json.dumps(adapter))
    out, err = io.StringIO(), io.StringIO()
    with _strict(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["diagnose", str(run), "--json", str(run / "d.json")])
    assert code in (0, 1, 2)
    assert "Traceback" not in err.getvalue()
    if code == 2:
        assert err.getvalue().count("\n") == 1 and err.getvalue().startswith("lora-doctor: error:")
    else:
        assert json.loads(Path(run / "d.json").read_text())["source"] == "offline"
