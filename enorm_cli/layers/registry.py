"""Mixed norm layers by name: the one place the EN-or-SN choice is made.

As timm's ``layers/create_norm.py`` (``_NORM_MAP``, ``get_norm_layer``), with an
unknown name answered by the list of valid ones.
"""

from __future__ import annotations

from .base import MixedNorm2d
from .exemplar_norm import ExemplarNorm2d
from .norm_act import ExemplarNormAct2d, SwitchableNormAct2d
from .switchable_norm import SwitchableNorm2d

_NORM_MAP: dict[str, tuple[type[MixedNorm2d], type[MixedNorm2d]]] = {
    ExemplarNorm2d.kind: (ExemplarNorm2d, ExemplarNormAct2d),
    SwitchableNorm2d.kind: (SwitchableNorm2d, SwitchableNormAct2d),
}

NORM_LAYERS: tuple[str, ...] = tuple(_NORM_MAP)
"""Every layer name: "en" (Exemplar Normalization), "sn" (Switchable, the baseline)."""


def check_norm_layer(name: str) -> str:
    """Validate a layer name (``NORM_LAYERS``); the one check, also for settings."""
    if name not in _NORM_MAP:
        raise ValueError(f"layer must be one of {', '.join(NORM_LAYERS)}, got {name!r}")
    return name


def get_norm_layer(name: str, act: bool = False) -> type[MixedNorm2d]:
    """The layer class for ``name``; with ``act``, its norm+act variant (drop, activation)."""
    plain, with_act = _NORM_MAP[check_norm_layer(name)]
    return with_act if act else plain
