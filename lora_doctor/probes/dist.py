"""Multi-process helpers: who is the main process, and per-rank readings as min/max over ranks.

Everything here is safe when ``torch.distributed`` is not available or not initialised: a single
process is rank 0 of a world of 1, and a "gather" returns its own readings.

Collectives follow one rule: every rank calls them the same number of times, in the same order, with
no condition that could differ between ranks. The callback calls :meth:`RankReadings.exchange` once per
``on_log`` on every rank, outside any per-rank guard, and probes only read its result; a probe never
runs a collective itself (one that failed on a single rank would leave the others waiting forever).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "RankReadings",
    "RankSpread",
    "gather_min_max",
    "is_main",
    "rank",
    "world_size",
]


def _dist() -> Any:
    """``torch.distributed`` when a process group is up, else None."""
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - torch is there whenever the callback runs
        return None
    if not (dist.is_available() and dist.is_initialized()):
        return None
    return dist


def world_size() -> int:
    """Number of processes in the default group (1 without torch.distributed).

    Example:
        >>> world_size()
        1
    """
    dist = _dist()
    return int(dist.get_world_size()) if dist is not None else 1


def rank() -> int:
    """This process's global rank (0 without torch.distributed).

    Example:
        >>> rank()
        0
    """
    dist = _dist()
    return int(dist.get_rank()) if dist is not None else 0


def is_main() -> bool:
    """True on the global rank 0 (and in a single process).

    Example:
        >>> is_main()
        True
    """
    return rank() == 0


@dataclass(frozen=True)
class RankSpread:
    """One reading over ranks: the lowest and highest value and the ranks that had them.

    Attributes:
        min: the lowest value over the ranks that reported it.
        max: the highest value.
        min_rank: the rank with the lowest value.
        max_rank: the rank with the highest value.
        ranks: how many ranks reported the reading.
    """

    min: float
    max: float
    min_rank: int = 0
    max_rank: int = 0
    ranks: int = 1


def gather_min_max(values: Mapping[str, float | int | None]) -> dict[str, RankSpread]:
    """Gathers each rank's readings and returns, per key, the min and max over ranks.

    A COLLECTIVE when torch.distributed is initialised: every rank must call it, as often and in the
    same order (ranks may pass different keys; a key missing or non-finite on some ranks is judged on
    the others). Without torch.distributed it returns the local readings as their own min and max.

    Args:
        values: this rank's readings, e.g. ``{"peak_bytes": 3.1e10, "step_seconds": 0.41}``.

    Returns:
        Per key, a :class:`RankSpread`.

    Example:
        >>> gather_min_max({"step_seconds": 0.5})["step_seconds"].max
        0.5
    """
    return _spread(_all_gather(values))


def _all_gather(values: Mapping[str, float | int | None]) -> list[dict[str, float]]:
    """Every rank's finite readings, by rank (COLLECTIVE under torch.distributed)."""
    local = {
        str(k): float(v)
        for k, v in values.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    }
    dist = _dist()
    if dist is None or dist.get_world_size() == 1:
        return [local]
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, local)
    return [part if isinstance(part, dict) else {} for part in parts]


def _spread(parts: list[dict[str, float]]) -> dict[str, RankSpread]:
    out: dict[str, RankSpread] = {}
    for r, part in enumerate(parts):
        for k, v in part.items():
            old = out.get(k)
            if old is None:
                out[k] = RankSpread(v, v, r, r, 1)
                continue
            lo, lo_r = (v, r) if v < old.min else (old.min, old.min_rank)
            hi, hi_r = (v, r) if v > old.max else (old.max, old.max_rank)
            out[k] = RankSpread(lo, hi, lo_r, hi_r, old.ranks + 1)
    return out


class RankReadings:
    """This rank's readings between two logs, and their spread over ranks after each exchange.

    Probes :meth:`put` readings at any time (no communication); the callback calls :meth:`exchange`
    once per log on every rank; probes then read :attr:`spread` (per key, min/max over ranks) or
    :attr:`by_rank` (each rank's readings, in rank order).

    Example:
        >>> readings = RankReadings()
        >>> readings.put("step_seconds", 0.5)
        >>> readings.exchange()["step_seconds"].min
        0.5
    """

    def __init__(self) -> None:
        self._local: dict[str, float] = {}
        self.spread: dict[str, RankSpread] = {}
        self.by_rank: list[dict[str, float]] = []

    def put(self, key: str, value: float | int | None) -> None:
        """Records this rank's current value of ``key`` (the latest value wins until the exchange)."""
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            self._local[key] = float(value)

    def exchange(self) -> dict[str, RankSpread]:
        """COLLECTIVE (see :func:`gather_min_max`): spreads the readings put since the last exchange."""
        local, self._local = self._local, {}
        self.by_rank = _all_gather(local)
        self.spread = _spread(self.by_rank)
        return self.spread
