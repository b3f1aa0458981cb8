"""What a reader lands on: README.md short, docs/ and README free of development history and of
this machine's paths, and every relative link in README pointing at a file."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FORBIDDEN = {
    r"\bstops? \d+\b": "a session's stop number",
    r"this 2-core machine|this machine\b": "the development machine",
    r"(?<![\w.])/(work|tmp|root|home)/": "a development machine's path",
}


def test_readme_is_short() -> None:
    assert len((ROOT / "README.md").read_text()) <= 30_000


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_no_history_and_no_machine_paths(page: Path) -> None:
    text = page.read_text()
    for pattern, what in FORBIDDEN.items():
        found = re.search(pattern, text)
        assert not found, f"{page.name}: {what}: {found.group(0)!r}"


def test_readme_links_resolve() -> None:
    text = (ROOT / "README.md").read_text()
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
        if "://" not in target:
            assert (ROOT / target).exists(), target


def python_blocks(page: Path) -> list[str]:
    """The ```python blocks of a page, in order."""
    return re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.DOTALL)


@pytest.mark.slow
@pytest.mark.parametrize("index", range(3), ids=["plain-loop", "lightning", "detection"])
def test_own_loop_page_runs_as_written(index: int, tmp_path: Path, monkeypatch) -> None:
    """Each code block of "EN in your own training loop" runs unchanged (in a fresh folder)."""
    blocks = python_blocks(ROOT / "docs" / "own-loop.md")
    assert len(blocks) == 3
    monkeypatch.chdir(tmp_path)
    exec(compile(blocks[index], f"own-loop.md block {index}", "exec"), {"__name__": "own_loop"})
