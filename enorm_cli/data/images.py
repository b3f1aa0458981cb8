"""Reading image files as the models want them: RGB, 8 bits, whatever the file holds.

Photos come as CMYK JPEGs, 16-bit PNGs (microscopy, medical, scans), palettes with
transparency, grey; ``to_rgb`` turns each into 8-bit RGB (16-bit values scaled, not
clipped, as PIL's own ``convert("RGB")`` would). Files that are not images at all, or
whose header is broken, are found before training (``readable``) and skipped with a count;
a file cut short after a valid header loads with its missing part grey (PIL's
``LOAD_TRUNCATED_IMAGES``), so one bad file never stops a run hours in.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

_WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
"""Integer modes wider than 8 bits (PIL opens 16-bit grey PNGs as one of these)."""


def to_rgb(image: Any) -> Any:
    """A PIL image as 8-bit RGB: 16-bit grey scaled by 1/257, float clipped to [0, 1],
    palette and alpha composited on black by PIL, CMYK and the rest by ``convert``."""
    from PIL import Image

    if image.mode == "RGB":
        return image
    if image.mode in _WIDE_MODES:
        values = np.asarray(image, dtype=np.float64) / 257.0
        grey = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), mode="L")
        return grey.convert("RGB")
    if image.mode == "F":
        values = np.clip(np.asarray(image, dtype=np.float64), 0.0, 1.0) * 255.0
        return Image.fromarray(np.rint(values).astype(np.uint8), mode="L").convert("RGB")
    if image.mode == "P":
        image = image.convert("RGBA")
    return image.convert("RGB")


def load_rgb(path: str | Path) -> Any:
    """Open an image file as 8-bit RGB (``to_rgb``); a truncated one loads, padded grey."""
    from PIL import Image, ImageFile

    ImageFile.LOAD_TRUNCATED_IMAGES = True
    with Image.open(path) as image:
        image.load()
        return to_rgb(image)


def readable(paths: Iterable[str]) -> tuple[set[str], list[str]]:
    """Which files open as images (their header is read, not their pixels), and which do
    not, in order."""
    from PIL import Image, UnidentifiedImageError

    good: set[str] = set()
    bad: list[str] = []
    for path in paths:
        try:
            with Image.open(path) as image:
                image.size  # noqa: B018 - the header is parsed on open; size proves it
            good.add(path)
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
            bad.append(path)
    return good, bad
