"""DoctorConfig: every threshold the checks use, with its default, help text and validation."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

__all__ = ["DoctorConfig"]

_Check = Callable[[Any], bool]


def _opt(default: Any, help: str, check: _Check | None = None, rule: str = "") -> Any:
    """A config field: its default, the help string, and the constraint a value must meet."""
    meta = {"help": help, "check": check, "rule": rule}
    if isinstance(default, (set, frozenset, dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def _positive(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def _non_negative(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0


def _fraction(v: Any) -> bool:
    return _non_negative(v) and v <= 1


def _positive_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _non_negative_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


@dataclass(frozen=True)
class DoctorConfig:
    """Thresholds and switches of every check.

    Every field has a default that suits most runs; change one by name. Invalid values raise a
    ``ValueError`` that names the field, the rule and the value received.

    Example:
        >>> cfg = DoctorConfig(ignore={"alpha-rank-ratio"}, check_after_steps=5)
        >>> cfg.check_after_steps
        5
    """

    # --- switches -------------------------------------------------------------------------------
    ignore: frozenset[str] = _opt(
        frozenset(), "Finding slugs (or codes) never to report, e.g. {'alpha-rank-ratio'}."
    )
    stop_on: frozenset[str] = _opt(
        frozenset(),
        "Finding slugs (or codes) that stop training when found (sets control.should_training_stop).",
    )
    check_after_steps: int = _opt(
        2,
        "Optimizer steps after which the post-step adapter checks run (gradients, B moved, shapes).",
        _positive_int,
        "an integer >= 1",
    )

    # --- adapter ----------------------------------------------------------------------------------
    scaling_low: float = _opt(
        1.0,
        "Lowest effective scaling (alpha/r, or alpha/sqrt(r) under rsLoRA) that passes: alpha = r.",
        _positive,
        "a number > 0",
    )
    scaling_high: float = _opt(
        2.0,
        "Highest effective scaling that passes: alpha = 2r.",
        _positive,
        "a number > 0",
    )
    scaling_tolerance: float = _opt(
        0.05,
        "Relative slack around [scaling_low, scaling_high] before alpha-rank-ratio fires.",
        _non_negative,
        "a number >= 0",
    )
    budget_low: float = _opt(
        0.0005,
        "Smallest share of the base model's parameters that LoRA parameters should make (0.05%).",
        _fraction,
        "a number in [0, 1]",
    )
    budget_high: float = _opt(
        0.01,
        "Largest share of the base model's parameters that LoRA parameters should make (1%).",
        _fraction,
        "a number in [0, 1]",
    )

    # --- multigpu / ecosystem -----------------------------------------------------------------------
    rl_min_rank: int = _opt(
        64,
        "Rank below which an online RL (GRPO) adapter gets the rl-low-rank information.",
        _positive_int,
        "an integer >= 1",
    )
    vllm_max_lora_rank: int | None = _opt(
        None,
        "max_lora_rank of a vLLM server the run generates with, when the doctor cannot read it "
        "(vllm serve --max-lora-rank); None: read it from the engine or the training arguments.",
        lambda v: v is None or _positive_int(v),
        "None or an integer >= 1",
    )

    # --- memory -----------------------------------------------------------------------------------
    oom_peak_share: float = _opt(
        0.90,
        "Share of the device's capacity that peak memory (PyTorch's peak allocated plus what is "
        "held outside PyTorch: CUDA context, other processes) may reach before oom-risk fires.",
        lambda v: _fraction(v) and v > 0,
        "a number in (0, 1]",
    )
    oom_retry_intervals: int = _opt(
        3,
        "Logging intervals, among the last oom_retry_window, in which the CUDA allocator's retry "
        "count (num_alloc_retries) rose before oom-risk fires.",
        _positive_int,
        "an integer >= 1",
    )
    oom_retry_window: int = _opt(
        5,
        "Logging intervals looked back over for rising allocator retries.",
        _positive_int,
        "an integer >= 1",
    )
    oom_growth_min_readings: int = _opt(
        5,
        "Memory readings (the first one, which holds the warm-up, left out) needed before the "
        "peak's growth is extrapolated to max_steps.",
        lambda v: _positive_int(v) and v >= 3,
        "an integer >= 3",
    )
    oom_growth_confidence: float = _opt(
        0.95,
        "Confidence of the Theil-Sen slope interval: the growth rule fires only when the whole "
        "interval is above zero (noise in the peak never extrapolates).",
        lambda v: _fraction(v) and 0 < v < 1,
        "a number in (0, 1)",
    )

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("ignore", "stop_on"):
                object.__setattr__(self, f.name, _slug_set(f.name, value))
                continue
            check = f.metadata.get("check")
            if check is not None and not check(value):
                raise ValueError(
                    f"DoctorConfig.{f.name} must be {f.metadata['rule']}, got {value!r}"
                )
        if self.scaling_low > self.scaling_high:
            raise ValueError(
                "DoctorConfig.scaling_low must be <= scaling_high, "
                f"got {self.scaling_low!r} > {self.scaling_high!r}"
            )
        if self.budget_low > self.budget_high:
            raise ValueError(
                "DoctorConfig.budget_low must be <= budget_high, "
                f"got {self.budget_low!r} > {self.budget_high!r}"
            )
        if self.oom_retry_intervals > self.oom_retry_window:
            raise ValueError(
                "DoctorConfig.oom_retry_intervals must be <= oom_retry_window, "
                f"got {self.oom_retry_intervals!r} > {self.oom_retry_window!r}"
            )

    @classmethod
    def describe(cls) -> dict[str, tuple[Any, str]]:
        """Each field's default and help text, by name."""
        out: dict[str, tuple[Any, str]] = {}
        for f in fields(cls):
            default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
            out[f.name] = (default, f.metadata.get("help", ""))
        return out

    def silenced(self, slug: str, code: str = "") -> bool:
        """True when the user asked never to report this finding."""
        return slug in self.ignore or (bool(code) and code in self.ignore)

    def stops(self, slug: str, code: str = "") -> bool:
        """True when a finding of this slug (or code) should stop training."""
        return slug in self.stop_on or (bool(code) and code in self.stop_on)


def _slug_set(name: str, value: Any) -> frozenset[str]:
    """Validates a set of slugs or codes against the registry of checks."""
    from lora_doctor.checks import known_names

    if isinstance(value, str):
        value = {value}
    if not isinstance(value, Iterable):
        raise ValueError(
            f"DoctorConfig.{name} must be a set of finding slugs or codes, got {value!r}"
        )
    items = frozenset(str(v) for v in value)
    known = known_names()
    unknown = sorted(items - known)
    if unknown:
        raise ValueError(
            f"DoctorConfig.{name} has unknown finding names {unknown}: use slugs such as "
            f"'loss-plateau' or codes such as 'LD201' (known slugs: {', '.join(sorted(n for n in known if not n.startswith('LD')))})"
        )
    return items
