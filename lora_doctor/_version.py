"""The package's version, in one place, in a module of its own so that any module can read it
without importing the package's ``__init__`` (which imports most modules: that would close an
import cycle).

The version is the installed distribution's (``importlib.metadata``), so it is the one
``pyproject.toml`` declared when the package was installed (``pip install`` or ``pip install -e``).
A source tree that is not installed (a checkout put on ``PYTHONPATH``) has no distribution to ask:
its version is :data:`UNKNOWN`, ``"0+unknown"`` (a valid PEP 440 local version that sorts below
every release), rather than a number copied here that could drift from ``pyproject.toml``.
"""

from __future__ import annotations

from importlib import metadata

__all__ = ["UNKNOWN", "__version__", "version"]

#: The version reported when the package is not installed.
UNKNOWN = "0+unknown"


def version(distribution: str = "lora-doctor") -> str:
    """The installed version of ``distribution``, or :data:`UNKNOWN` when it is not installed.

    Example:
        >>> version("no-such-distribution-here")
        '0+unknown'
    """
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return UNKNOWN


__version__ = version()
