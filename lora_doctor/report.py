"""Diagnosis: the versioned JSON report, its text summary, and how it is written."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import stat
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_doctor._version import __version__
from lora_doctor.facts import RunFacts
from lora_doctor.findings import Finding, Severity, to_jsonable
from lora_doctor.fix import AppliedFix, apply_findings
from lora_doctor.history import History

__all__ = ["REPORT_NAME", "SCHEMA_VERSION", "Diagnosis", "load_schema", "write_json_atomic"]

SCHEMA_VERSION = 1
#: The diagnosis file's name in a run's output folder (the Trainer's ``output_dir``, Lightning's
#: ``default_root_dir``) when no ``report_path`` is given.
REPORT_NAME = "lora_doctor.json"


def load_schema() -> dict[str, Any]:
    """The JSON Schema of the diagnosis file (shipped in the package as
    ``lora_doctor/schema/diagnosis.schema.json``).

    Example:
        >>> load_schema()["properties"]["schema_version"]
        {'const': 1}
    """
    from importlib.resources import files

    text = files("lora_doctor").joinpath("schema/diagnosis.schema.json").read_text("utf-8")
    data: dict[str, Any] = json.loads(text)
    return data


@dataclass
class Diagnosis:
    """A run's diagnosis: what is known about the run and every finding, in the order found.

    Example:
        >>> d = Diagnosis(run={"global_step": 0}, findings=[])
        >>> d.to_dict()["schema_version"]
        1
    """

    run: dict[str, Any] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)
    source: str = "live"
    schema_version: int = SCHEMA_VERSION
    tool_version: str = __version__
    #: The curves the diagnosis was made from (not written to JSON; used by :meth:`plot`).
    history: History | None = field(default=None, repr=False, compare=False)

    @classmethod
    def build(
        cls, facts: RunFacts, findings: Iterable[Finding], source: str, global_step: int
    ) -> Diagnosis:
        run: dict[str, Any] = {"global_step": global_step}
        run.update(facts.to_dict())
        return cls(run=run, findings=list(findings), source=source)

    # --- reading ----------------------------------------------------------------------------------
    @property
    def worst(self) -> Severity | None:
        """The highest severity among the findings, None when there are none."""
        return max((f.severity for f in self.findings), default=None)

    def by_slug(self, slug: str) -> list[Finding]:
        return [f for f in self.findings if f.slug == slug]

    @property
    def slugs(self) -> set[str]:
        return {f.slug for f in self.findings}

    # --- writing ----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The diagnosis as strict-JSON data (non-finite numbers become None)."""
        return {
            "schema_version": self.schema_version,
            "tool": {"name": "lora-doctor", "version": self.tool_version},
            "source": self.source,
            "run": to_jsonable(self.run),
            "findings": [f.to_dict() for f in self.findings],
        }

    def to_json(self, path: str | os.PathLike[str] | None = None, indent: int = 2) -> str:
        """The diagnosis as a JSON string; also written atomically to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=indent, allow_nan=False)
        if path is not None:
            write_json_atomic(path, text)
        return text

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Diagnosis:
        """Reads a diagnosis back; unknown keys are ignored and missing ones take defaults."""
        tool = data.get("tool") or {}
        return cls(
            run=dict(data.get("run") or {}),
            findings=[
                Finding.from_dict(f) for f in data.get("findings") or [] if isinstance(f, Mapping)
            ],
            source=str(data.get("source", "live")),
            schema_version=int(data.get("schema_version", SCHEMA_VERSION)),
            tool_version=str(tool.get("version", __version__))
            if isinstance(tool, Mapping)
            else __version__,
        )

    def apply(
        self,
        lora_config: Any = None,
        training_args: Any = None,
        *,
        suggestions: bool | str | Collection[str] = False,
    ) -> AppliedFix:
        """Copies of ``lora_config`` and ``training_args`` with the recommended changes applied,
        and the steps that are not configuration (restart from the base model, fix the data ...).

        Errors come before warnings; when two findings set the same field to different values the
        more severe wins (at equal severity, one judged on the run's curves before one made at
        set-up, then the first found) and the other finding's changes are dropped together;
        information findings are suggestions, applied only with ``suggestions=True``. Each key goes
        to the object whose class has that field, and a value must have the field's annotated
        type: anything else is reported in ``unrouted``, not applied. The objects passed in are
        not modified. The full rules are in :mod:`lora_doctor.fix`.

        Args:
            lora_config: the run's ``peft.LoraConfig`` (or None).
            training_args: the run's ``transformers.TrainingArguments`` or a subclass (or None).
            suggestions: apply the information findings' changes too, after every warning and
                error: True for all, or the slugs of those to follow, a set or one string
                (``attention-only-targets``'s ``target_modules``; ``rank-underused``'s smaller
                rank ...).

        Returns:
            :class:`~lora_doctor.fix.AppliedFix`: ``lora_config``, ``training_args``, ``applied``,
            ``dropped``, ``unrouted``, ``steps``, and ``summary()``.

        Raises:
            TypeError: when an object given is not a dataclass instance.
            ValueError: a name in ``suggestions`` that no check and no finding has.

        Example:
            >>> fix = diagnosis.apply(lora_config, training_args)  # doctest: +SKIP
            >>> print(fix.summary())  # doctest: +SKIP
            >>> model = get_peft_model(fresh_base_model, fix.lora_config)  # doctest: +SKIP
        """
        return apply_findings(self.findings, lora_config, training_args, suggestions=suggestions)

    def plot(self, path: str | os.PathLike[str]) -> Path:
        """Draws loss, eval loss and grad norm with each finding marked at its step, to ``path``.

        Needs matplotlib (``pip install 'lora-doctor[plot]'``); see :func:`lora_doctor.plot.plot_diagnosis`.
        """
        from lora_doctor.plot import plot_diagnosis

        return plot_diagnosis(self, path)

    def summary(self) -> str:
        """A short human-readable report: one line per finding, worst first."""
        step = self.run.get("global_step")
        head = f"lora-doctor: {len(self.findings)} finding(s)"
        if step:
            head += f" after step {step}"
        if not self.findings:
            return head + ": nothing wrong found."
        lines = [head + ":"]
        for f in sorted(self.findings, key=lambda f: -f.severity.rank):
            where = f" (step {f.step})" if f.step is not None else ""
            lines.append(f"  {f.severity.value.upper():7} {f.code} {f.slug}{where}: {f.title}")
            if f.recommendation is not None:
                lines.append(f"          fix: {f.recommendation.summary}")
        return "\n".join(lines)


_SPECIAL = {
    stat.S_IFIFO: "a FIFO",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a device",
    stat.S_IFBLK: "a device",
}


def write_json_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Writes ``text`` (and a final newline) to ``path`` so that a reader never sees a half-written
    file: a temporary file in the same folder, flushed to disk, then renamed over the target.

    A symbolic link is followed: the file it points to is replaced and the link stays. A new file
    gets the permissions any new file gets (``0o666`` less the umask); an existing one keeps its
    own. Missing parent folders are created.

    Args:
        path: the file to write.
        text: the content.

    Returns:
        The path written (the link's target when ``path`` is a link).

    Raises:
        OSError: when the file cannot be written; ``IsADirectoryError`` when ``path`` is a folder,
            and an ``OSError`` with errno ``EINVAL`` when it is another non-regular file (a FIFO,
            a device, a socket), which a rename would silently replace. ``err.filename`` names
            the path, ``err.strerror`` the reason.

    Example:
        >>> write_json_atomic("out/lora_doctor.json", "{}")  # doctest: +SKIP
        PosixPath('out/lora_doctor.json')
    """
    target = Path(os.path.realpath(path))  # a link's target, so the link itself survives
    mode: int | None = None
    kind = stat.S_IFREG
    with contextlib.suppress(FileNotFoundError):
        found = os.stat(target).st_mode
        mode, kind = stat.S_IMODE(found), stat.S_IFMT(found)
    if kind == stat.S_IFDIR:
        raise IsADirectoryError(errno.EISDIR, "is a folder, not a file", str(path))
    if kind != stat.S_IFREG:
        what = _SPECIAL.get(kind, "a special file")
        raise OSError(errno.EINVAL, f"is {what}, not a regular file", str(path))
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _new_temp(target, 0o666 if mode is None else mode)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            if mode is not None:
                os.fchmod(fh.fileno(), mode)  # the existing file's mode, whatever the umask
            fh.write(text)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def _new_temp(target: Path, mode: int) -> tuple[int, str]:
    """A new, exclusively created temporary file beside ``target`` (``.NAME.XXXXXXXX.tmp``) and its
    descriptor. Created with ``mode`` through ``os.open``, so the umask applies as to any new file
    (``tempfile.mkstemp`` would make it 0600)."""
    for _ in range(100):
        tmp = str(target.parent / f".{target.name}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode), tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary file name", str(target.parent))
