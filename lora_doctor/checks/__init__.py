"""The registry of checks. Adding a rule is one class in a module and one entry in its ``CHECKS``."""

from __future__ import annotations

from functools import cache

from lora_doctor.checks import adapter, curves, ecosystem, memory, rank, run
from lora_doctor.checks.base import Check, Context, Phase

__all__ = ["ALL_CHECKS", "Check", "Context", "Phase", "known_names"]

ALL_CHECKS: tuple[type[Check], ...] = (
    *adapter.CHECKS,
    *ecosystem.CHECKS,
    *memory.CHECKS,
    *rank.CHECKS,
    *curves.CHECKS,
    *run.CHECKS,
)


@cache
def known_names() -> frozenset[str]:
    """Every slug and code a check reports (what ``ignore`` and ``stop_on`` accept)."""
    names: set[str] = set()
    for check in ALL_CHECKS:
        names.add(check.slug)
        names.add(check.code)
    return frozenset(names)
