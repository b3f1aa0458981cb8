"""The recipes that ship inside the package, and how ``--recipe`` finds one.

As torchtune's ``tune ls`` / ``tune cp``: ``enorm recipes`` lists them, ``enorm recipes cp``
copies one out to edit, and ``--recipe`` takes a path, a NAME or NAME.yaml from any
directory (an existing file wins). The checkout's ``recipes/`` is the package
``enorm_cli.recipes`` (pyproject's package-dir), so there is one copy of each file.
What each recipe is for, and the hardware and time it needs, is read from its header
comment: the text before "Hardware and time:" and the sentence after it.
"""

from __future__ import annotations

import difflib
import re
import shutil
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ..errors import EnormError
from ..fileio import atomic_path, check_writable

SUFFIX = ".yaml"
HARDWARE = "Hardware and time:"


@dataclass(frozen=True)
class RecipeEntry:
    """One packaged recipe."""

    name: str
    path: Path
    purpose: str
    hardware: str


def packaged_dir() -> Path:
    """Where the packaged recipes are on disk (the checkout's recipes/ in an editable install)."""
    return Path(str(resources.files("enorm_cli.recipes")))


def _header(text: str) -> str:
    """The first paragraph of the leading comment, as one line."""
    lines = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        body = line[1:].strip()
        if not body:
            break
        lines.append(body)
    return " ".join(lines)


def _first_sentence(text: str) -> str:
    return re.split(r"(?<=\.)\s+(?=[A-Z])", text.strip(), maxsplit=1)[0].rstrip(".")


def read_entry(path: Path) -> RecipeEntry:
    """Name, purpose and hardware/time of a recipe file: first sentences of its header's parts."""
    header = _header(path.read_text())
    purpose, _, rest = header.partition(HARDWARE)
    return RecipeEntry(
        name=path.stem, path=path, purpose=_first_sentence(purpose), hardware=_first_sentence(rest)
    )


def _files() -> list[Path]:
    return sorted(packaged_dir().glob("*" + SUFFIX))


def list_recipes() -> list[RecipeEntry]:
    """Every packaged recipe, by name."""
    return [read_entry(p) for p in _files()]


def find_packaged(name: str) -> Path:
    """A packaged recipe by NAME or NAME.yaml, with close names when it is not one."""
    stem = name.removesuffix(SUFFIX)
    if "/" in stem:  # a path, not a name
        raise EnormError(
            f"recipe file {name!r} not found: check the "
            "path, or give a packaged name (enorm recipes)"
        )
    path = packaged_dir() / (stem + SUFFIX)
    if path.is_file():
        return path
    names = [p.stem for p in _files()]
    close = difflib.get_close_matches(stem, names, n=2)
    hint = (
        f"did you mean {' or '.join(close)}?" if close else f"packaged recipes: {', '.join(names)}"
    )
    raise EnormError(
        f"recipe {name!r} is neither a file nor a packaged "
        f"recipe: {hint} (enorm recipes lists them)"
    )


def resolve_recipe(value: str | Path) -> Path:
    """``--recipe``: an existing file wins, then a packaged NAME or NAME.yaml."""
    path = Path(value).expanduser()
    if path.is_dir():
        raise EnormError(
            f"--recipe {str(value)!r} is a directory: give a recipe file or a name (enorm recipes)"
        )
    if path.is_file():
        return path
    return find_packaged(str(value))


def copy_recipe(name: str, dest: Path, force: bool = False) -> Path:
    """Copy a packaged recipe to DEST (a file, or a folder to put NAME.yaml in)."""
    source = find_packaged(name)
    target = dest / source.name if dest.is_dir() else dest
    check_writable(target, force, flag="DEST")
    with atomic_path(target) as tmp:
        shutil.copyfile(source, tmp)
    return target
