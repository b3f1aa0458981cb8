"""Function preservation: do the source and the converted model agree on real inputs?"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .errors import EnormError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm"}
DEFAULT_BATCH = 8
MAX_CALIB_IMAGES = 64


@dataclass(frozen=True)
class Agreement:
    """Eval-mode agreement of two models' logits on one batch."""

    samples: int
    top1_agreement: float
    max_abs_delta: float
    max_abs_logit: float
    calibration: str

    @property
    def relative_delta(self) -> float:
        return self.max_abs_delta / max(self.max_abs_logit, 1e-12)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "relative_delta": self.relative_delta}


def default_batch(input_size: tuple[int, int, int], n: int = DEFAULT_BATCH) -> Tensor:
    """A deterministic batch of smooth, image-like inputs (already normalized).

    Low-frequency noise upsampled to the input size: real images are smooth too,
    so the network's activations look more like they do on photos than on white noise.
    """
    c, h, w = input_size
    g = torch.Generator().manual_seed(0)
    coarse = torch.randn(n, c, max(h // 16, 2), max(w // 16, 2), generator=g)
    fine = torch.randn(n, c, h, w, generator=g) * 0.1
    return (
        nn.functional.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False) + fine
    )


def image_files(root: Path) -> list[Path]:
    """Image files under ``root``, sorted, recursively."""
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def calibration_batch(
    root: Path, data_config: dict[str, Any], limit: int = MAX_CALIB_IMAGES
) -> Tensor:
    """Images from a directory, prepared with the model's own eval transform."""
    from PIL import Image, UnidentifiedImageError
    from timm.data import create_transform

    if not root.is_dir():
        raise EnormError(f"--calib {str(root)!r} is not a directory: give a folder of images")
    files = image_files(root)[:limit]
    if not files:
        raise EnormError(
            f"--calib {str(root)!r} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}): add some"
        )
    transform = create_transform(**_transform_args(data_config), is_training=False)
    images = []
    for f in files:
        try:
            with Image.open(f) as im:
                images.append(transform(im.convert("RGB")))
        except (UnidentifiedImageError, OSError) as exc:
            raise EnormError(
                f"calibration image {str(f)!r} cannot be read ({exc}): remove it"
            ) from None
    return torch.stack(images)


def _transform_args(data_config: dict[str, Any]) -> dict[str, Any]:
    keys = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
    return {k: tuple(v) if isinstance(v, list) else v for k, v in data_config.items() if k in keys}


def agreement(expected: Tensor, got: Tensor, calibration: str) -> Agreement:
    """How closely ``got`` logits follow ``expected`` (same batch)."""
    expected, got = expected.float(), got.float()
    return Agreement(
        samples=expected.shape[0],
        top1_agreement=(expected.argmax(1) == got.argmax(1)).float().mean().item(),
        max_abs_delta=(expected - got).abs().max().item(),
        max_abs_logit=expected.abs().max().item(),
        calibration=calibration,
    )


@torch.no_grad()
def compare(source: nn.Module, converted: nn.Module, batch: Tensor, calibration: str) -> Agreement:
    """Logits of both models in eval mode on ``batch``."""
    source.eval()
    converted.eval()
    return agreement(source(batch), converted(batch), calibration)
