"""Writing user files safely: never half-written, never overwritten without --force."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import EnormError

CAUSES = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "the disk quota is used up",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EIO: "an I/O error",
}
"""The file system's refusals a user can fix, by errno, in words."""
MESSAGES = {
    "No space left": errno.ENOSPC,
    "Disk quota": errno.EDQUOT,
    "Read-only file system": errno.EROFS,
    "Permission denied": errno.EACCES,
    "Input/output error": errno.EIO,
}
"""The same refusals as other libraries word them (safetensors' SafetensorError)."""
SHORT_WRITE = ("unexpected pos", "PytorchStreamWriter failed")
"""torch.save's zip writer on a short write: it does not say why."""
FIXES = {
    errno.ENOSPC: "free space under {dir}",
    errno.EDQUOT: "free space under {dir} (or raise the quota)",
    errno.EROFS: "make {dir} writable",
    errno.EACCES: "make {dir} writable",
    errno.EPERM: "make {dir} writable",
    errno.EIO: "check the disk under {dir}",
}


def _existing(path: Path) -> Path:
    """The nearest folder of ``path`` that exists (for a file system probe)."""
    for parent in (path, *path.parents):
        if parent.is_dir():
            return parent
    return Path(".")


def write_errno(exc: BaseException, path: Path) -> int | None:
    """Why writing ``path`` failed, when the file system refused it (``CAUSES``), else None:
    the errno of an ``OSError``, the words of another library's error, or for torch's
    cause-less short write, what the file system shows now (full, or read-only)."""
    if isinstance(exc, OSError) and exc.errno in CAUSES:
        return exc.errno
    text = str(exc)
    for words, code in MESSAGES.items():
        if words in text:
            return code
    if any(words in text for words in SHORT_WRITE) or isinstance(exc, OSError):
        folder = _existing(path)
        with contextlib.suppress(OSError):
            if os.statvfs(folder).f_flag & os.ST_RDONLY:
                return errno.EROFS
            if shutil.disk_usage(folder).free < 64 << 20:
                return errno.ENOSPC
    return None


class WriteRefused(EnormError):
    """A write the file system refused (``CAUSES``): one line with the path, the cause and
    the fix; ``reworded`` gives a caller's own next step."""

    def __init__(self, path: Path, code: int, fix: str = "{fix}, or write elsewhere") -> None:
        self.path, self.code = path, code
        folder = _existing(path.parent)
        step = fix.format(fix=FIXES[code].format(dir=repr(str(folder))))
        super().__init__(f"could not write {str(path)!r}: {CAUSES[code]}; {step}")

    def reworded(self, fix: str) -> WriteRefused:
        return WriteRefused(self.path, self.code, fix)


def refused(
    exc: BaseException, path: Path, fix: str = "{fix}, or write elsewhere"
) -> WriteRefused | None:
    """``exc`` as a ``WriteRefused`` when the file system caused it (``write_errno``), else
    None. ``fix``: the caller's next step around the file system's own ("{fix}, then
    --resume")."""
    if isinstance(exc, WriteRefused):
        return exc.reworded(fix)
    code = write_errno(exc, path)
    return None if code is None else WriteRefused(path, code, fix)


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
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=parent)
    except OSError as exc:
        raise (refused(exc, path) or exc) from None
    os.close(fd)
    try:
        yield Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would surprise users
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        error = refused(exc, path) if isinstance(exc, Exception) else None
        if error is not None:
            raise error from None
        raise


def write_text_atomic(path: Path, text: str) -> None:
    """``path.write_text(text)``, never half-written (``atomic_path``)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
