"""Which path an EN layer's forward takes: decided here, and only here.

The tensor ops (``exemplar_function.en_coefficients``) define EN; every other path computes
the same function faster and is checked against them in the tests:

- ``reference``: autograd over the tensor ops (``set_fused_en(False)``; tests, debugging);
- ``inference``: eval without autograd, the whole layer as one C++ call (``native``);
- ``node``: one autograd node with a hand-written backward (``ExemplarNormFunction``);
- ``no_grad``: the node's forward without recording it.

``node`` and ``no_grad`` run on the C++ kernel where it is built and the input allows
(``native.eligible``), on the tensor ops otherwise; the backward uses what the forward used.
With ``ENORM_TRITON=1`` their passes over X run as Triton kernels (``triton_ops``) on CUDA
inputs (and on CPU ones under ``TRITON_INTERPRET=1``, for the tests); off by default until
measured on a GPU.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from types import ModuleType
from typing import NamedTuple

import torch
from torch import Tensor

from . import native, triton_ops

_fused = True
TRITON_ENV = "ENORM_TRITON"


class Runtime(NamedTuple):
    """A forward's path, the C++ kernel it runs on (None: the tensor ops), and whether its
    passes over X are Triton's."""

    path: str
    kernel: ModuleType | None
    triton: bool = False


def choose(x: Tensor, training: bool, needs_grad: bool) -> Runtime:
    """The path of one EN forward on ``x`` (``needs_grad``: autograd must see it)."""
    if not _fused:
        return Runtime("reference", None)
    kernel = native.kernel() if native.eligible(x) else None
    if kernel is not None and not (training or torch.is_grad_enabled()):
        return Runtime("inference", kernel)
    triton = (
        kernel is None
        and os.environ.get(TRITON_ENV, "0") == "1"
        and triton_ops.eligible(x)
        and triton_ops.available()
        and not torch.compiler.is_compiling()
    )
    return Runtime("node" if needs_grad else "no_grad", kernel, triton)


def set_fused_en(enable: bool = True) -> None:
    """Run EN as one autograd node with a hand-written backward (the default), or not.

    With ``False`` every EN layer records ``en_coefficients`` under plain autograd (as timm's
    ``set_fast_norm`` switches its norm kernels): the reference the tests check the node
    against. Both compute the same function; the switch exists to compare them and to debug.
    """
    global _fused
    _fused = enable


def is_fused_en() -> bool:
    return _fused


@contextlib.contextmanager
def fused_en(enable: bool) -> Iterator[None]:
    """``set_fused_en`` for a block."""
    before = _fused
    set_fused_en(enable)
    try:
        yield
    finally:
        set_fused_en(before)
