"""Per-sample appearance shift for evaluation: contrast, brightness or gamma, drawn per image.

A single set of BatchNorm statistics fits a dataset whose images share one exposure; IN and
LN statistics are computed per image and remove a per-image gain or offset. ``--shift
KIND:SEVERITY`` (``enorm eval``, ``enorm inspect``) or ``data.shift`` (the val split of a
recipe) tests that on a model's own val images: every image gets its own factor, drawn
log-uniformly from ``[exp(-m), exp(m)]`` with ``m = STEP[kind] * severity``, from a
generator keyed by the image's position, so every model sees the same shifted images.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch.utils.data import Dataset

from ..errors import EnormError
from .images import to_rgb

KINDS = ("contrast", "brightness", "gamma")
MAX_SEVERITY = 5
STEP = {"contrast": 0.3, "brightness": 0.25, "gamma": 0.3}
"""Half-width of the log-factor range per severity step: severity 5 spans contrast
x0.22-x4.5, brightness x0.29-x3.5, gamma 0.22-4.5."""


@dataclass(frozen=True)
class Shift:
    kind: str
    severity: int

    @property
    def log_range(self) -> float:
        return STEP[self.kind] * self.severity

    def factor(self, index: int) -> float:
        """The factor of the image at ``index`` (same on every process, every run)."""
        if self.severity == 0:
            return 1.0
        rng = random.Random(index)
        return math.exp(rng.uniform(-self.log_range, self.log_range))

    def apply(self, image: Any, index: int) -> Any:
        """The shifted RGB PIL image."""
        from torchvision.transforms import functional as F

        image = to_rgb(image)
        f = self.factor(index)
        if f == 1.0:
            return image
        if self.kind == "contrast":
            return F.adjust_contrast(image, f)
        if self.kind == "brightness":
            return F.adjust_brightness(image, f)
        return F.adjust_gamma(image, f)

    def __str__(self) -> str:
        return f"{self.kind}:{self.severity}"


def parse_shift(spec: str) -> Shift:
    """``KIND:SEVERITY`` (contrast, brightness or gamma; 0-5) -> Shift, else one clear line."""
    kind, sep, level = spec.partition(":")
    usage = f"use KIND:SEVERITY with KIND one of {', '.join(KINDS)} and SEVERITY 0-{MAX_SEVERITY}"
    if not sep or kind not in KINDS:
        raise EnormError(f"shift {spec!r}: {usage} (e.g. contrast:3)")
    try:
        severity = int(level)
    except ValueError:
        raise EnormError(f"shift {spec!r}: {usage}") from None
    if not 0 <= severity <= MAX_SEVERITY:
        raise EnormError(f"shift {spec!r}: {usage}")
    return Shift(kind, severity)


class ShiftedDataset(Dataset):
    """``dataset`` (which must return untransformed images) with each image shifted by its
    own factor before ``transform`` (resize, crop, normalize)."""

    def __init__(self, dataset: Dataset, shift: Shift, transform: Callable | None) -> None:
        self.dataset = dataset
        self.shift = shift
        self.transform = transform

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image, label = self.dataset[index]
        image = self.shift.apply(image, index)
        return (self.transform(image) if self.transform is not None else image), label
