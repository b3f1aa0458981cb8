"""Writing user files safely: never half-written, never overwritten without --force."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import EnormError


def check_writable(
    path: Path, force: bool, flag: str = "--out", force_hint: str = "--force"
) -> None:
    """Fail before any work when ``path`` cannot be written or would clobber a file
    (``force_hint``: how the caller overwrites, ``force=True`` in Python)."""
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise EnormError(f"{flag} {str(path)!r} is a directory: give a file name")
    if path.exists() and not force:
        raise EnormError(
            f"{flag} {str(path)!r} exists: pass {force_hint} to overwrite it, or pick another path"
        )
    if not parent.is_dir():
        raise EnormError(f"directory {str(parent)!r} for {flag} does not exist: create it first")
    try:  # a real probe: os.access says yes to root even on read-only file systems
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError:
        raise EnormError(
            f"directory {str(parent)!r} for {flag} is not writable: pick another path"
        ) from None


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path``; renamed onto it only if the block succeeds."""
    parent = path.parent if str(path.parent) else Path(".")
    # The suffix stays last: torch.export.save wants a name ending in .pt2.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=parent)
    os.close(fd)
    try:
        yield Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would surprise users
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    """``path.write_text(text)``, never half-written (``atomic_path``)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
