"""The docs are current and hold together: the generated references equal what the code generates
(without importing torch), and every relative link in README.md and docs/*.md reaches an existing
file and heading."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
GENERATE = (
    "import runpy, sys; main = runpy.run_path('tools/gen_docs.py', run_name='gen_docs')['main']; "
    "rc = main(['--check']); assert 'torch' not in sys.modules, 'the generator imported torch'; "
    "sys.exit(rc)"
)


def test_generated_references_are_current() -> None:
    done = subprocess.run(
        [sys.executable, "-c", GENERATE], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]


def _anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    return {_anchor(h) for h in re.findall(r"(?m)^#{1,6} (.+)$", _prose(page))}


def _prose(page: Path) -> str:
    """The page without its fenced code blocks (a ``# comment`` there is no heading)."""
    return re.sub(r"(?ms)^```.*?^```", "", page.read_text(encoding="utf-8"))


def _links() -> list[tuple[Path, str]]:
    return [
        (page, target)
        for page in PAGES
        for target in re.findall(r"\]\(([^)\s]+)\)", _prose(page))
        if not re.match(r"[a-z]+:", target)
    ]


@pytest.mark.parametrize(("page", "target"), _links(), ids=[f"{p.name}->{t}" for p, t in _links()])
def test_relative_link_resolves(page: Path, target: str) -> None:
    path, _, anchor = target.partition("#")
    file = (page.parent / path).resolve() if path else page
    assert file.exists(), f"{page.name}: link to {target} names no file"
    if anchor:
        assert anchor in _anchors(file), f"{page.name}: link to {target} names no heading"


def test_the_link_check_sees_links() -> None:
    """Guards the check above against a pattern that matches nothing."""
    assert {t for p, t in _links() if p.name == "README.md"} >= {"docs/checks.md", "BENCHMARKS.md"}
    assert _anchor("Rank evidence: the spectrum of the learned update") == (
        "rank-evidence-the-spectrum-of-the-learned-update"
    )
