"""``enorm export`` as a user calls it."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import invoke, one_error_line


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "r.safetensors"
    result = invoke(
        "convert", "test_resnet", "--no-pretrained", "--num-classes", "4", "--out", str(path)
    )
    assert result.exit_code == 0, result.stderr
    return path


@pytest.mark.slow
def test_export_both_formats(checkpoint: Path, tmp_path: Path) -> None:
    for name in ("m.onnx", "m.pt2"):
        result = invoke("export", str(checkpoint), "--out", str(tmp_path / name))
        assert result.exit_code == 0, result.stderr
        assert (
            "top-1 agreement 100.0%" in result.stdout
            and f"wrote {tmp_path / name}" in result.stdout
        )
    one_error_line(invoke("export", str(checkpoint), "--out", str(tmp_path / "m.pt2")), "--force")
    assert (
        invoke("export", str(checkpoint), "--out", str(tmp_path / "m.pt2"), "--force").exit_code
        == 0
    )


def test_bad_export_calls(checkpoint: Path, tmp_path: Path) -> None:
    one_error_line(
        invoke("export", str(checkpoint), "--out", str(tmp_path / "m.bin")),
        "give --format onnx or pt2",
    )
    one_error_line(
        invoke("export", str(tmp_path / "none.safetensors"), "--out", str(tmp_path / "m.onnx")),
        "not found",
    )
    one_error_line(
        invoke("export", str(checkpoint), "--out", str(tmp_path / "no" / "m.onnx")),
        "does not exist",
    )
    one_error_line(
        invoke("export", str(checkpoint), "--out", str(tmp_path / "m.onnx"), "--opset", "13"),
        "--opset 13 is too old",
    )
    assert list(tmp_path.iterdir()) == []
