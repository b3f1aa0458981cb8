"""What EN's math reads from a layer: its settings in the current mode and its tensors.

Both the tensor ops (``exemplar_function``) and the C++ kernel's loader (``native``) take
these, so they live apart from either.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from torch import Tensor

from .statistics import StatsMode


@dataclass(frozen=True)
class KernelSettings(StatsMode):
    """The layer's settings the math reads (built by ``ExemplarNorm2d.kernel_settings``)."""

    relu: bool = False
    """The ratio branch's hidden activation is relu (else tanh)."""
    shared_affine: bool = False
    logit_scale: float = 1.0


class ENTensors(NamedTuple):
    """Every tensor the math reads besides x, in ``ExemplarNormFunction.apply``'s order."""

    running_mean: Tensor
    running_var: Tensor
    weight: Tensor
    bias: Tensor
    conv: Tensor | None
    fc1_w: Tensor
    fc1_b: Tensor
    fc2_w: Tensor
    fc2_b: Tensor
    stale: Tensor | None = None
    """``renorm_frozen``'s guard has tripped: batch statistics (``MixedNorm2d.frozen_stale``)."""
    offset: Tensor | None = None
    """o (K): the mixing weights are lambda + o (``ExemplarNorm2d.mix_offset``); None: o = 0."""
