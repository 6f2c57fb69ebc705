"""The command and the files it writes: links followed, permissions kept, non-regular targets
refused, a closed standard output, ``--plot`` checked before any work, ``--version``, help text,
and the hints a user gets when an optional dependency is missing."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import pytest

from lora_doctor.cli import _parser, main
from lora_doctor.report import write_json_atomic

ROOT = Path(__file__).resolve().parents[1]


def _run(folder: Path) -> Path:
    """A run whose loss is flat: a plateau warning, so exit 1 under ``--fail-on warning``."""
    folder.mkdir(parents=True, exist_ok=True)
    log = [
        {"loss": 2.0 + 0.01 * ((i * 7) % 5 - 2), "step": i + 1, "learning_rate": 2e-4}
        for i in range(100)
    ]
    (folder / "trainer_state.json").write_text(json.dumps({"max_steps": 100, "log_history": log}))
    return folder


@pytest.fixture
def umask() -> Iterator[None]:
    """Runs the test under umask 022, whatever the shell's, and restores it."""
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


# --- where --json writes ---------------------------------------------------------------------------
def test_json_onto_a_symlink_writes_its_target_and_keeps_the_link(tmp_path: Path) -> None:
    real = tmp_path / "reports" / "d.json"
    real.parent.mkdir()
    real.write_text("old")
    link = tmp_path / "latest.json"
    link.symlink_to(os.path.relpath(real, tmp_path))  # a relative link, as `ln -s` makes
    assert main(["diagnose", str(_run(tmp_path / "run")), "--json", str(link)]) == 0
    assert link.is_symlink() and json.loads(real.read_text())["source"] == "offline"
    assert sorted(p.name for p in real.parent.iterdir()) == ["d.json"]  # no temporary file left


def test_dangling_symlink_creates_its_target(tmp_path: Path) -> None:
    link = tmp_path / "d.json"
    link.symlink_to(tmp_path / "out" / "target.json")
    write_json_atomic(link, "{}")
    assert link.is_symlink() and (tmp_path / "out" / "target.json").read_text() == "{}\n"


def test_new_file_gets_the_umask_permissions(tmp_path: Path, umask: None) -> None:
    target = write_json_atomic(tmp_path / "d.json", "{}")
    assert stat.S_IMODE(target.stat().st_mode) == 0o644  # 0666 & ~022, not mkstemp's 0600


def test_existing_file_keeps_its_permissions(tmp_path: Path, umask: None) -> None:
    target = tmp_path / "d.json"
    target.write_text("old")
    target.chmod(0o640)
    write_json_atomic(target, "{}")
    assert stat.S_IMODE(target.stat().st_mode) == 0o640 and target.read_text() == "{}\n"


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda p: p.mkdir(), "is a folder, not a file"),
        (lambda p: os.mkfifo(p), "is a FIFO, not a regular file"),
    ],
    ids=["folder", "fifo"],
)
def test_non_regular_json_target_is_refused_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], make, reason: str
) -> None:
    target = tmp_path / "d.json"
    make(target)
    kind = stat.S_IFMT(target.stat().st_mode)
    assert main(["diagnose", str(_run(tmp_path / "run")), "--json", str(target)]) == 2
    captured = capsys.readouterr()
    assert captured.err == f"lora-doctor: error: cannot write {target}: {reason}\n"
    assert captured.out.startswith("lora-doctor:")  # the diagnosis is still printed
    assert stat.S_IFMT(target.stat().st_mode) == kind  # a FIFO is not replaced by a file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.json", "run"]


# --- a closed standard output ----------------------------------------------------------------------
def test_closed_stdout_writes_the_json_and_exits_by_the_findings(tmp_path: Path) -> None:
    """``lora-doctor diagnose RUN --json F | head -0``: the reader is gone before the first line."""
    out = tmp_path / "d.json"
    read_end, write_end = os.pipe()
    os.close(read_end)  # every write to the pipe now fails with EPIPE
    try:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "lora_doctor.cli",
                "diagnose",
                str(_run(tmp_path / "run")),
                "--json",
                str(out),
                "--fail-on",
                "warning",
            ],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            check=False,
        )
    finally:
        os.close(write_end)
    assert done.stderr == ""  # no BrokenPipeError traceback, no "Exception ignored" at exit
    assert done.returncode == 1  # the plateau warning
    assert json.loads(out.read_text())["source"] == "offline"


# --- --plot ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "needle"),
    [
        ("plot.docx", "matplotlib does not write '.docx' files"),
        ("plot", "it has no file extension"),
    ],
    ids=["unknown-extension", "no-extension"],
)
def test_plot_format_is_checked_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, needle: str
) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "d.json"
    argv = [
        "diagnose",
        str(tmp_path / "missing"),
        "--json",
        str(out),
        "--plot",
        str(tmp_path / name),
    ]
    assert main(argv) == 2  # the run does not even exist: the plot's name is refused first
    err = capsys.readouterr().err
    assert err.startswith(f"lora-doctor: error: --plot: cannot plot to {tmp_path / name}: {needle}")
    assert "png" in err and err.count("\n") == 1 and not out.exists()


def test_plot_extension_is_case_blind(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "p.PNG"
    assert main(["diagnose", str(_run(tmp_path / "run")), "--plot", str(out)]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.skipif(shutil.which("xelatex") is not None, reason="LaTeX is installed: pgf works")
def test_plot_that_matplotlib_cannot_draw_keeps_the_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "d.json"
    argv = [
        "diagnose",
        str(_run(tmp_path / "run")),
        "--json",
        str(out),
        "--plot",
        str(tmp_path / "p.pgf"),
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("lora-doctor: error: cannot draw the plot:") and err.count("\n") == 1
    assert json.loads(out.read_text())["source"] == "offline"


def test_plot_without_matplotlib_still_diagnoses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ("matplotlib", "matplotlib.backend_bases", "matplotlib.pyplot"):
        monkeypatch.setitem(sys.modules, name, None)  # `import` now raises ImportError
    out = tmp_path / "d.json"
    argv = [
        "diagnose",
        str(_run(tmp_path / "run")),
        "--json",
        str(out),
        "--plot",
        str(tmp_path / "p.png"),
        "--fail-on",
        "warning",
    ]
    assert main(argv) == 1  # by the findings, not 2
    captured = capsys.readouterr()
    assert "LD208 loss-at-chance" in captured.out and json.loads(out.read_text())
    assert captured.err == (
        "lora-doctor: --plot skipped: plotting needs matplotlib: pip install 'lora-doctor[plot]'\n"
    )
    assert not (tmp_path / "p.png").exists()


# --- --version and help ------------------------------------------------------------------------------
def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out == f"lora-doctor {metadata.version('lora-doctor')}\n"


def test_one_version_everywhere(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI, ``lora_doctor.__version__`` and the report's ``tool.version`` are the installed
    distribution's version; a source tree that is not installed says ``0+unknown``."""
    import lora_doctor
    from lora_doctor import _version
    from lora_doctor.report import Diagnosis

    installed = metadata.version("lora-doctor")
    assert lora_doctor.__version__ == installed
    assert Diagnosis(findings=[]).to_dict()["tool"] == {"name": "lora-doctor", "version": installed}

    def not_installed(name: str) -> str:
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(_version.metadata, "version", not_installed)
    assert _version.version() == _version.UNKNOWN == "0+unknown"


def test_every_diagnose_option_has_help() -> None:
    sub = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    diagnose = sub.choices["diagnose"]
    actions = [a for a in diagnose._actions if not isinstance(a, argparse._HelpAction)]
    assert {a.dest for a in actions} == {
        "path",
        "json",
        "fix_json",
        "suggestions",
        "suggest",
        "plot",
        "fail_on",
    }
    assert all(a.help and a.help.strip() for a in actions)


# --- the callback without transformers --------------------------------------------------------------
def test_callback_import_without_transformers_says_which_extra(tmp_path: Path) -> None:
    script = textwrap.dedent(
        """
        import sys

        class Blocker:  # as if transformers were not installed
            def find_spec(self, name, path=None, target=None):
                if name.partition(".")[0] == "transformers":
                    raise ModuleNotFoundError(f"No module named {name!r}", name=name)
                return None

        sys.meta_path.insert(0, Blocker())
        import lora_doctor  # the offline doctor needs no transformers
        try:
            from lora_doctor import LoraDoctorCallback
        except ModuleNotFoundError as err:
            print(type(err).__name__, err.name, "|", err)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, check=True
    )
    assert done.stdout == (
        "ModuleNotFoundError transformers | lora_doctor.LoraDoctorCallback needs transformers, "
        "which is not installed: pip install 'lora-doctor[hf]'\n"
    )
