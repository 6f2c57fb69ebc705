"""Step-indexed metric series, built from live Trainer logs or a saved ``log_history``."""

from __future__ import annotations

import math
import operator
from array import array
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["History", "Series", "as_float", "is_eval_entry"]


@dataclass(frozen=True)
class Series:
    """One metric over steps, in the order it was logged. Values may be NaN or infinite."""

    key: str
    steps: np.ndarray
    values: np.ndarray

    def __len__(self) -> int:
        return int(self.values.shape[0])

    def finite(self) -> Series:
        """The same series without its non-finite values."""
        keep = np.isfinite(self.values)
        return Series(self.key, self.steps[keep], self.values[keep])

    def since(self, step: float) -> Series:
        """The points logged at or after ``step``."""
        keep = self.steps >= step
        return Series(self.key, self.steps[keep], self.values[keep])


def as_float(value: Any) -> float | None:
    """A logged value as a float, or None when it is not a number (strings, lists, dicts).

    Ints, floats, numpy and torch scalars, and the strings "nan" and "inf" are numbers. An int too
    large for a float is infinite, as Python's JSON reader reads the literal ``1e400``.

    Example:
        >>> as_float(3), as_float(10**400), as_float("nan"), as_float("3")
        (3.0, inf, nan, None)
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        try:
            return float(value)
        except OverflowError:
            return math.inf if value > 0 else -math.inf
    if isinstance(value, float):
        return value
    try:
        item = getattr(value, "item", None)  # numpy / torch scalars
        if callable(item):
            out = item()
            return as_float(out) if isinstance(out, (int, float)) else None
    except Exception:  # a logged object the doctor cannot read is not a number to it
        return None
    if isinstance(value, str) and value.strip().lower() in {
        "nan",
        "inf",
        "+inf",
        "-inf",
        "infinity",
    }:
        return float(value.strip().lower().replace("infinity", "inf"))
    return None


_STARTS_EVAL = operator.methodcaller("startswith", "eval_")
_EMPTY: array[float] = array("d")
#: Integers below this in size convert to a float without overflow (larger ones go through as_float).
_INT_FLOAT = 2**1000


def is_eval_entry(entry: Mapping[str, Any]) -> bool:
    """True for a log entry written by an evaluation (its metrics carry the ``eval_`` prefix).

    The live callback and the offline replay both use it to run the EVAL phase instead of LOG.

    Example:
        >>> is_eval_entry({"eval_loss": 0.5, "epoch": 1.0}), is_eval_entry({"loss": 0.7})
        (True, False)
    """
    try:
        return any(map(_STARTS_EVAL, entry))  # C-level loop: this runs once per log entry
    except AttributeError:  # a key that is not a string
        return any(isinstance(k, str) and k.startswith("eval_") for k in entry)


class History:
    """Metrics logged during a run, by key, each with the step it was logged at.

    Entries are appended in log order; a key's series is built on demand and cached until that key
    gets a new point, so checks that read a series at every log cost nothing extra.

    Example:
        >>> h = History.from_log_history([{"step": 10, "loss": 2.0}, {"step": 20, "loss": 1.5}])
        >>> h.series("loss").values.tolist()
        [2.0, 1.5]
    """

    def __init__(self) -> None:
        # float64 arrays: 8 bytes a point (a list of floats takes 32), copied to numpy in one step
        self._steps: dict[str, array[float]] = {}
        self._values: dict[str, array[float]] = {}
        self._cache: dict[str, Series] = {}
        self._entries: list[dict[str, Any]] = []
        self.last_step: int = 0

    def add(self, step: int | float | None, logs: Mapping[str, Any]) -> None:
        """Records one log entry: every numeric value under its key, at ``step``.

        ``step`` defaults to the entry's own ``"step"`` key, then to the last step seen (also when it
        is not a number >= 0, as a step counts optimizer steps). Non-numeric values, and keys that
        are not strings, are kept in the raw entry but make no series; an integer too large for a
        float counts as an infinity. Never raises on what a log holds.
        """
        raw_step = logs.get("step") if step is None else step
        if type(raw_step) is int and -_INT_FLOAT < raw_step < _INT_FLOAT:
            step_f: float | None = float(raw_step)
        else:
            step_f = as_float(raw_step)
        if step_f is None or not 0 <= step_f < math.inf:
            step_f = float(self.last_step)
        # a saved entry already has its step and is kept as it is; a live one gets a copy with it
        entry = logs if "step" in logs else {**logs, "step": int(step_f)}
        self._entries.append(entry)  # type: ignore[arg-type]
        if step_f > self.last_step:
            self.last_step = int(step_f)
        steps, values = self._steps, self._values
        for key, raw in logs.items():
            if key == "step" or type(key) is not str:  # no check can ask for it by name
                continue
            # the common cases first, without as_float's checks
            kind = type(raw)
            if kind is float:
                value: float | None = raw
            elif kind is int and -_INT_FLOAT < raw < _INT_FLOAT:
                value = float(raw)
            else:
                value = as_float(raw)
            if value is None:
                continue
            series = values.get(key)
            if series is not None:
                series.append(value)
                steps[key].append(step_f)
            else:
                steps[key] = array("d", (step_f,))
                values[key] = array("d", (value,))

    def series(self, key: str) -> Series:
        """The series of ``key``; empty when the key was never logged.

        The arrays are cached until the key gets a new point.
        """
        cached = self._cache.get(key)
        if cached is not None and len(cached) == self.count(key):
            return cached
        steps = np.array(self._steps.get(key, ()), dtype=float)  # a copy: the arrays grow
        values = np.array(self._values.get(key, ()), dtype=float)
        out = Series(key, steps, values)
        self._cache[key] = out
        return out

    def count(self, key: str) -> int:
        """How many points ``key`` has (cheap: no array is built)."""
        return len(self._values.get(key, ()))

    def points(self, key: str, start: int = 0) -> tuple[Sequence[float], Sequence[float]]:
        """The steps and values of ``key`` from its ``start``-th point on (read-only sequences).

        Checks that run at every log read only the new points through this, so that a long log
        costs time linear in its length; with ``start=0`` the history's own arrays are returned
        without a copy.
        """
        steps, values = self._steps.get(key, _EMPTY), self._values.get(key, _EMPTY)
        if start:
            return steps[start:], values[start:]
        return steps, values

    def keys(self) -> Iterator[str]:
        """The keys with at least one numeric value, in first-seen order."""
        return iter(self._values)

    @property
    def key_count(self) -> int:
        """How many keys have at least one numeric value (cheap)."""
        return len(self._values)

    def __contains__(self, key: object) -> bool:
        return key in self._values

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def entries(self) -> list[dict[str, Any]]:
        """The raw entries, as logged (a copy of the list, not of the entries; treat them as
        read-only: a saved entry that had its step is the caller's own dict)."""
        return list(self._entries)

    @classmethod
    def from_log_history(cls, entries: Iterable[Mapping[str, Any]]) -> History:
        """Builds a history from a Trainer's ``state.log_history`` (or its JSON form).

        Entries that are not mappings are skipped; entries without ``"step"`` take the last step.
        """
        history = cls()
        for entry in entries:
            if isinstance(entry, Mapping):
                history.add(None, entry)
        return history
