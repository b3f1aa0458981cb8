"""Image files as the models want them: CMYK, 16-bit, palette, truncated, not an image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from enorm_cli.data.images import load_rgb, readable, to_rgb


def test_cmyk_16_bit_palette_and_float_images_become_8_bit_rgb(tmp_path: Path) -> None:
    Image.new("CMYK", (6, 4), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")  # red in CMYK
    red = np.asarray(load_rgb(tmp_path / "cmyk.jpg"))
    assert red.shape == (4, 6, 3) and red[..., 0].min() > 200 and red[..., 1:].max() < 60
    wide = np.full((4, 6), 30000, dtype=np.uint16)
    Image.fromarray(wide).save(tmp_path / "grey16.png")
    grey = np.asarray(load_rgb(tmp_path / "grey16.png"))
    assert Image.open(tmp_path / "grey16.png").mode.startswith("I")  # what PIL opens it as
    assert grey.dtype == np.uint8 and (grey == round(30000 / 257)).all()  # scaled, not clipped
    palette = Image.new("P", (3, 3), 1)
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    assert np.asarray(to_rgb(palette))[0, 0].tolist() == [10, 200, 30]
    floats = Image.fromarray(np.full((2, 2), 0.5, dtype=np.float32), mode="F")
    assert np.asarray(to_rgb(floats))[0, 0].tolist() == [128, 128, 128]


def test_truncated_files_load_and_non_images_are_found(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "ok.png")
    data = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "noise.jpg").write_bytes(b"not an image at all")
    assert load_rgb(tmp_path / "cut.png").size == (64, 64)
    good, bad = readable([str(tmp_path / n) for n in ("ok.png", "cut.png", "noise.jpg")])
    assert good == {str(tmp_path / "ok.png"), str(tmp_path / "cut.png")}
    assert bad == [str(tmp_path / "noise.jpg")]
    with pytest.raises(OSError):
        load_rgb(tmp_path / "noise.jpg")
