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
