"""Function preservation: do the source and the converted model agree on real inputs?

A randomly initialized deep network amplifies rounding until a correct float32 conversion
differs from its source by 1e-3 of its logits; so does casting both to float64, because
the converted model's float32 parameters (gamma / lambda_src) are themselves rounded.
The check that decides therefore has two parts (``verify_conversion``): the conversion
made in float64 from a float64 copy of the source computes the source's function to
float64 rounding, with a tolerance scaled to how much this network amplifies rounding
(measured on the source alone), and the model that is written is that float64 conversion
rounded to its own dtype, parameter by parameter (``rounding_ulps``). The float32
comparison of the two models as users run them is reported beside them.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ..data.images import load_rgb
from ..errors import EnormError
from ..layers import MixedNorm2d

if TYPE_CHECKING:
    from ..config.settings import ENSettings

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm"}
DEFAULT_BATCH = 8
MAX_CALIB_IMAGES = 64
FLOAT64_TOLERANCE = 1e-9
"""The least max |delta logit| / max |logit| of the float64 conversion against the float64
source that still counts as the same function (a network that barely amplifies rounding)."""
ROUNDING_MARGIN = 1e3
"""The tolerance is at least this many times the float64 rounding the network itself shows:
its source's float32 rounding (float32 vs float64 source logits) scaled by eps64 / eps32."""
EPS_RATIO = torch.finfo(torch.float64).eps / torch.finfo(torch.float32).eps  # 2^-29
MAX_ROUNDING_ULPS = 4.0
"""How far (in units of the dtype's rounding) the written model may sit from the float64
conversion: rounding to float32 moves a value by at most half a unit."""


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
    from PIL import UnidentifiedImageError
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
            images.append(transform(load_rgb(f)))
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
    expected, got = expected.double(), got.double()
    return Agreement(
        samples=expected.shape[0],
        top1_agreement=(expected.argmax(1) == got.argmax(1)).float().mean().item(),
        max_abs_delta=(expected - got).abs().max().item(),
        max_abs_logit=expected.abs().max().item(),
        calibration=calibration,
    )


def flat_outputs(out: Any, samples: int) -> Tensor | None:
    """A model's output on ``samples`` inputs as one samples x D matrix: a tensor (logits, a
    segmentation map), or the tensors of a list, tuple or dict (feature pyramids, torchvision's
    segmentation outputs), flattened per sample; None where the output is not one row per
    input (a detector's per-image detections)."""
    leaves = [out] if isinstance(out, Tensor) else out
    if isinstance(leaves, dict):
        leaves = list(leaves.values())
    if not isinstance(leaves, (list, tuple)) or not leaves:
        return None
    if not all(isinstance(x, Tensor) and x.dim() > 1 and x.shape[0] == samples for x in leaves):
        return None
    return torch.cat([x.flatten(1) for x in leaves], dim=1)


@torch.no_grad()
def eval_outputs(model: nn.Module, batch: Tensor, layers: list[str] | None = None) -> Tensor:
    """What verification compares, in eval mode (the model is left in eval mode): the model's
    output (``flat_outputs``), or with ``layers`` the outputs of those modules (the norm layers
    a conversion replaced, where the model's own output has no fixed shape, as a detector's):
    modules after the last of them are the same modules on the same inputs; one row then, as
    a detector's heads see as many regions as it proposes)."""
    model = model.eval()
    if layers is None:
        flat = flat_outputs(model(batch), len(batch))
        if flat is None:
            raise EnormError(
                f"{type(model).__name__}'s output has no fixed shape to compare; verification "
                "compares its converted layers' outputs instead (eval_outputs(..., layers))"
            )
        return flat
    seen: dict[str, Tensor] = {}
    handles = [
        model.get_submodule(name).register_forward_hook(
            lambda _m, _i, out, name=name: seen.__setitem__(name, out.reshape(1, -1))
        )
        for name in layers
    ]
    try:
        model(batch)
    finally:
        for handle in handles:
            handle.remove()
    return torch.cat([seen[name] for name in layers], dim=1)


@torch.no_grad()
def rounding_ulps(model: nn.Module, reference: nn.Module) -> float:
    """How far ``model``'s tensors sit from ``reference``'s (same names), in units of the
    model's own rounding (eps of its dtype, relative to the reference value).

    A model that is ``reference`` rounded to its dtype scores at most a few units; a tensor
    that differs in substance scores millions (inf where the reference is 0 and it is not).
    """
    ref = reference.state_dict()
    worst = 0.0
    for name, value in model.state_dict().items():
        expected = ref[name]
        if not value.dtype.is_floating_point:
            if not torch.equal(value, expected.to(value.dtype)):
                return math.inf
            continue
        delta = (value.double() - expected.double()).abs()
        scale = expected.double().abs() * torch.finfo(value.dtype).eps
        if bool((delta[scale == 0] > 0).any()):
            return math.inf
        if bool((scale > 0).any()):
            worst = max(worst, (delta[scale > 0] / scale[scale > 0]).max().item())
    return worst


@dataclass(frozen=True)
class Verification:
    """Whether a conversion computes its source's function, rounding told apart from error."""

    float32: Agreement
    """The two models as users run them (reported: rounding amplified, not decisive)."""
    float64: Agreement
    """The conversion redone in float64 against the float64 source: its arithmetic."""
    rounding_ulps: float
    """The written model against that float64 conversion, per parameter (``rounding_ulps``)."""
    source_rounding: float
    """The source alone in float32 against float64 (relative): how far this network carries
    float32 rounding to its logits."""
    tolerance: float
    """For ``float64``: max(floor, ROUNDING_MARGIN * source_rounding * eps64 / eps32)."""

    @property
    def passed(self) -> bool:
        return (
            self.float64.relative_delta <= self.tolerance
            and self.rounding_ulps <= MAX_ROUNDING_ULPS
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "float32": self.float32.to_json(),
            "float64": self.float64.to_json(),
            "rounding_ulps": self.rounding_ulps,
            "source_rounding": self.source_rounding,
            "tolerance": self.tolerance,
            "max_rounding_ulps": MAX_ROUNDING_ULPS,
            "passed": self.passed,
        }


def verify_conversion(
    source: nn.Module,
    converted: nn.Module,
    settings: ENSettings,
    batch: Tensor,
    calibration: str,
    tolerance: float = FLOAT64_TOLERANCE,
) -> Verification:
    """Compare ``converted`` with ``source`` on ``batch`` in float32, and decide in float64.

    The float64 reference is ``converted`` cast to float64 with what the conversion computed
    redone from a float64 copy of the source (``surgery.restart_from_source``); the models
    passed in keep their parameters and are left in eval mode. ``tolerance`` is the floor of
    the float64 tolerance, which grows with how much the network amplifies rounding
    (``Verification.tolerance``).
    """
    from .surgery import restart_from_source

    source64 = copy.deepcopy(source).double()
    reference = copy.deepcopy(converted).double()
    restart_from_source(reference, source64, settings)
    with torch.no_grad():
        s32 = flat_outputs(source.eval()(batch), len(batch))
    layers = None  # the outputs compare; else the converted layers' (``eval_outputs``)
    if s32 is None:
        layers = [n for n, m in converted.named_modules() if isinstance(m, MixedNorm2d)]
        s32 = eval_outputs(source, batch, layers)
    c32 = eval_outputs(converted, batch, layers)
    s64 = eval_outputs(source64, batch.double(), layers)
    c64 = eval_outputs(reference, batch.double(), layers)
    source_rounding = agreement(s64, s32, calibration).relative_delta
    samples = {"samples": len(batch)}  # one row per input, or one row of layer outputs
    return Verification(
        float32=replace(agreement(s32, c32, calibration), **samples),
        float64=replace(agreement(s64, c64, calibration), **samples),
        rounding_ulps=rounding_ulps(converted, reference),
        source_rounding=source_rounding,
        tolerance=max(tolerance, ROUNDING_MARGIN * source_rounding * EPS_RATIO),
    )
