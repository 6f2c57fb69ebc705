"""lora_doctor.stats.theil_sen gives what scipy.stats.theilslopes gives (it replaces it to keep
scipy.stats out of the offline doctor's start-up)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from lora_doctor.stats import theil_sen


def _same(y: np.ndarray, x: np.ndarray, confidence: float) -> None:
    ours = theil_sen(y, x, confidence)
    theirs = stats.theilslopes(y, x, alpha=confidence)
    np.testing.assert_allclose(
        [ours.slope, ours.intercept, ours.low_slope, ours.high_slope],
        [theirs.slope, theirs.intercept, theirs.low_slope, theirs.high_slope],
        rtol=1e-12,
        atol=1e-12,
        equal_nan=True,
    )


@pytest.mark.filterwarnings("ignore:invalid value encountered in sqrt")  # scipy's side, tied data
@settings(max_examples=200, deadline=None, derandomize=True)
@given(
    st.lists(
        st.tuples(
            st.integers(0, 30),  # steps: repeats allowed (ties in x)
            st.floats(-10, 10, allow_nan=False).map(lambda v: round(v, 1)),  # ties in y
        ),
        min_size=2,
        max_size=40,
    ),
    st.sampled_from([0.9, 0.95, 0.99, 0.05]),
)
def test_matches_scipy(points: list[tuple[int, float]], confidence: float) -> None:
    x = np.array([p[0] for p in points], dtype=float)
    y = np.array([p[1] for p in points], dtype=float)
    if np.ptp(x) == 0:
        return  # scipy warns and returns NaN; the rules never fit identical steps
    _same(y, x, confidence)


@pytest.mark.parametrize("n", [3, 10, 100])
def test_matches_scipy_on_noisy_lines(n: int) -> None:
    rng = np.random.default_rng(n)
    x = np.arange(n, dtype=float)
    _same(2.0 - 0.01 * x + rng.normal(0, 0.1, n), x, 0.95)


def test_too_few_points() -> None:
    with pytest.raises(ValueError, match="length >= 2"):
        theil_sen(np.array([1.0]), np.array([1.0]))
