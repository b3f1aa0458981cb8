"""User files: checked before work, written whole or not at all, never clobbered without --force."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from enorm_cli.errors import EnormError
from enorm_cli.fileio import atomic_path, check_writable


def test_check_writable(tmp_path: Path) -> None:
    check_writable(tmp_path / "new.safetensors", force=False)
    (tmp_path / "old.onnx").write_text("mine")
    with pytest.raises(EnormError, match=r"--out .* exists: pass --force"):
        check_writable(tmp_path / "old.onnx", force=False)
    check_writable(tmp_path / "old.onnx", force=True)
    with pytest.raises(EnormError, match="is a directory"):
        check_writable(tmp_path, force=True)
    with pytest.raises(EnormError, match="for DEST does not exist: create it first"):
        check_writable(tmp_path / "no" / "x.yaml", force=False, flag="DEST")


def test_unwritable_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A real probe, not os.access (which says yes to root on read-only file systems)."""
    import tempfile

    def refuse(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(tempfile, "TemporaryFile", refuse)
    with pytest.raises(EnormError, match="is not writable: pick another path"):
        check_writable(tmp_path / "x.pt2", force=False)


def test_atomic_path_renames_only_on_success(tmp_path: Path) -> None:
    target = tmp_path / "model.pt2"
    with atomic_path(target) as tmp:
        assert (
            tmp.parent == tmp_path and tmp.name.endswith(".pt2") and tmp.name.startswith(".model.")
        )
        tmp.write_text("whole")
    assert target.read_text() == "whole"
    assert stat.S_IMODE(target.stat().st_mode) & 0o044  # readable by others, unlike mkstemp's 0600
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert target.read_text() == "whole"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt2"]


def test_a_refused_write_is_one_line_and_leaves_nothing(tmp_path: Path) -> None:
    """A full disk in the middle of a write: the file system's cause, the path and the fix in
    one EnormError, the temp file gone, the old file intact."""
    import errno

    from enorm_cli.errors import EnormError
    from enorm_cli.fileio import WriteRefused, atomic_path

    target = tmp_path / "out.bin"
    target.write_text("old")
    with pytest.raises(WriteRefused) as caught:
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise OSError(errno.ENOSPC, "No space left on device")
    message = str(caught.value)
    assert isinstance(caught.value, EnormError) and "\n" not in message
    assert str(target) in message and "no space left on the device" in message
    assert "free space under" in message
    assert target.read_text() == "old" and list(tmp_path.iterdir()) == [target]


def test_other_libraries_words_and_torchs_short_write_are_classified(
    tmp_path: Path, monkeypatch
) -> None:
    import shutil
    from collections import namedtuple

    from enorm_cli import fileio

    assert fileio.write_errno(RuntimeError("SafetensorError: No space left on device"), tmp_path)
    assert fileio.write_errno(RuntimeError("a bug"), tmp_path) is None  # not the disk's doing
    short = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 32")
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _p: usage(100, 100, 0))
    assert fileio.write_errno(short, tmp_path) == __import__("errno").ENOSPC
    monkeypatch.setattr(shutil, "disk_usage", lambda _p: usage(1 << 40, 0, 1 << 40))
    assert fileio.write_errno(short, tmp_path) is None  # space left: not a full disk
