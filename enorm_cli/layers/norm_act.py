"""EN and SN followed by a drop and an activation, in place of timm's *NormAct2d layers.

As timm's ``BatchNormAct2d`` subclasses ``nn.BatchNorm2d``, these subclass the plain
layers, so their state dicts are the plain layer's plus nothing: ``drop`` and ``act``
hold no tensors.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from .exemplar_norm import ExemplarNorm2d
from .switchable_norm import SwitchableNorm2d


class _ActTail:
    """A drop and an activation after the norm, as timm's *NormAct2d layers have."""

    def __init__(
        self,
        *args: Any,
        drop: nn.Module | None = None,
        act: nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.drop = drop if drop is not None else nn.Identity()
        self.act = act if act is not None else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.drop(super().forward(x)))


class ExemplarNormAct2d(_ActTail, ExemplarNorm2d):
    """ExemplarNorm2d followed by a drop and an activation, in place of timm's *NormAct2d."""


class SwitchableNormAct2d(_ActTail, SwitchableNorm2d):
    """SwitchableNorm2d followed by a drop and an activation, in place of timm's *NormAct2d."""
