"""The built-in checks, and the registry each :class:`~lora_doctor.engine.Doctor` builds from them.

Adding a built-in rule is one class in a module and one entry in its ``CHECKS``; a user's own check
is passed to ``Doctor(checks=...)`` or ``LoraDoctorCallback(extra_checks=...)`` and can then be
silenced or stopped on like a built-in one.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

from lora_doctor.checks import (
    adapter,
    curves,
    ecosystem,
    learning,
    memory,
    rank,
    reward,
    run,
    update,
)
from lora_doctor.checks.base import Cadence, Check, Context, Phase, Points, Read, Reads

__all__ = [
    "BUILTIN_CHECKS",
    "Cadence",
    "Check",
    "Context",
    "Phase",
    "Points",
    "Read",
    "Reads",
    "Registry",
]

BUILTIN_CHECKS: tuple[type[Check], ...] = (
    *adapter.CHECKS,
    *update.CHECKS,
    *ecosystem.CHECKS,
    *memory.CHECKS,
    *rank.CHECKS,
    *curves.CHECKS,
    *reward.CHECKS,
    *learning.CHECKS,
    *run.CHECKS,
)


class Registry:
    """The checks of one doctor, instantiated, with the names ``ignore`` and ``stop_on`` accept.

    Args:
        checks: the check classes (the built-in ones when None).
        extra: more check classes, e.g. a user's own, added after ``checks``.

    Raises:
        ValueError: an entry is not a :class:`Check` subclass, or two checks share a code or a
            slug.

    Example:
        >>> "loss-plateau" in Registry().names
        True
    """

    def __init__(
        self, checks: Iterable[type[Check]] | None = None, extra: Iterable[type[Check]] = ()
    ) -> None:
        classes = [*(BUILTIN_CHECKS if checks is None else checks), *extra]
        for cls in classes:
            if not (isinstance(cls, type) and issubclass(cls, Check)):
                raise ValueError(
                    f"extra_checks holds {cls!r}: each entry must be a check class, a subclass of "
                    "lora_doctor.checks.Check (the class itself, not an instance)"
                )
        self.checks: list[Check] = [cls() for cls in classes]
        codes: dict[str, str] = {}
        for check in self.checks:
            for name in (check.code, check.slug):
                owner = codes.setdefault(name, type(check).__name__)
                if owner != type(check).__name__:
                    raise ValueError(
                        f"check {type(check).__name__} reuses the name {name!r} of check {owner}: "
                        "give each check its own code and slug"
                    )
        self.names: frozenset[str] = frozenset(codes)

    def validate(self, field: str, names: Iterable[str]) -> None:
        """Raises a ValueError naming the unknown finding names among ``names``.

        Args:
            field: the option being validated, for the message (``"DoctorConfig.ignore"``).
            names: slugs or codes.
        """
        unknown = sorted(set(names) - self.names)
        if unknown:
            near = {n: difflib.get_close_matches(n, self.names, n=1) for n in unknown}
            meant = "; ".join(f"did you mean {m[0]!r} for {n!r}?" for n, m in near.items() if m)
            if meant:
                raise ValueError(f"{field} has unknown finding names {unknown}: {meant}")
            slugs = ", ".join(sorted(n for n in self.names if not n.startswith("LD")))
            raise ValueError(
                f"{field} has unknown finding names {unknown}: use slugs such as 'loss-plateau' or "
                f"codes such as 'LD201' (known slugs: {slugs}); pass your own checks to "
                "Doctor(checks=...) or LoraDoctorCallback(extra_checks=...) to use their names"
            )
