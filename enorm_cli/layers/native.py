"""EN's per-sample math as C++ calls on CPU: built once, loaded when built, else skipped.

The tensor-op path (``exemplar_function``) defines EN and stays the fallback and the test
reference. On CPU its coefficient math is some 35 small ops forward and 60 backward per
layer, each costing microseconds whatever its size; the kernel (``csrc/en_layer.cpp``) runs
each direction as one call (training: ``en_forward``, ``en_backward``; the bn member's batch
statistics, synced or renormalized, stay tensor ops around them) and the whole eval layer as
one (``en_inference``): docs/performance.md has what that buys. Like other PyTorch C++
extensions it is compiled on the user's machine by torch's JIT loader (a C++ compiler, about
a minute), once:

    enorm build-kernel          # build (scripts/setup_env.sh does it too)

``ENORM_NATIVE``: ``auto`` (the default) uses the kernel when it is built and never builds
in the middle of a run; ``0`` never uses it. The build lives in ``$ENORM_HOME/native/``
under a name that hashes the source, the flags and torch's version, so an upgrade builds
anew instead of loading a stale one.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
from pathlib import Path
from types import ModuleType
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .kernel_inputs import ENTensors, KernelSettings

SOURCE = Path(__file__).with_name("csrc") / "en_layer.cpp"
FLAGS = (
    "-O3",
    "-fno-math-errno",
    "-fassociative-math",
    "-fno-signed-zeros",
    "-fno-trapping-math",
    "-fopenmp",
)
"""Portable code (no -march), with reassociation so the row sums vectorize (the sums' order
differs from ATen's by float rounding only; no -ffast-math, so NaN and inf behave), and
OpenMP, without which ``at::parallel_for`` runs on one thread (layer_levers.json's notes)."""
ENV = "ENORM_NATIVE"
CODES = {"bn": 0, "in": 1, "ln": 2, "gn": 3}
"""Normalizer codes of the kernel (``Code`` in ``csrc/en_layer.cpp``)."""

_loaded: dict[str, ModuleType | None] = {}


def build_name() -> str:
    """The extension's name: the source, the flags and torch's version, hashed."""
    digest = hashlib.sha256(SOURCE.read_bytes())
    digest.update(" ".join(FLAGS).encode())
    digest.update(torch.__version__.encode())
    return f"enorm_native_{digest.hexdigest()[:12]}"


def build_dir(name: str | None = None) -> Path:
    from ..cache import enorm_home

    return enorm_home() / "native" / (name or build_name())


def _library(name: str) -> Path | None:
    """The built library of ``name``, if any (.so, or .pyd on Windows)."""
    directory = build_dir(name)
    found = sorted(directory.glob(f"{name}*.so")) + sorted(directory.glob(f"{name}*.pyd"))
    return found[0] if found else None


def build() -> ModuleType:
    """Compile (or load the existing build of) the kernel; raises when no compiler works."""
    from torch.utils.cpp_extension import load

    name = build_name()
    directory = build_dir(name)
    directory.mkdir(parents=True, exist_ok=True)
    module = load(
        name,
        [str(SOURCE)],
        extra_cflags=list(FLAGS),
        build_directory=str(directory),
        verbose=False,
    )
    _loaded["module"] = module
    return module


def kernel() -> ModuleType | None:
    """The built kernel, or None: disabled (``ENORM_NATIVE=0``), not built, or not loadable.

    Never compiles: a run does not stall for a minute at its first eval.
    """
    if os.environ.get(ENV, "auto") == "0":
        return None
    if "module" not in _loaded:
        name = build_name()
        library = _library(name)
        module = None
        if library is not None:
            try:
                spec = importlib.util.spec_from_file_location(name, library)
                if spec is not None and spec.loader is not None:
                    module = importlib.util.module_from_spec(spec)
                    spec.loader.exec_module(module)
            except (ImportError, OSError):
                module = None  # a broken build: the tensor-op path
        _loaded["module"] = module
    return _loaded["module"]


def _eager() -> bool:
    """Not tracing, scripting, compiling or exporting: those see the tensor-op graph."""
    return not (
        torch.compiler.is_compiling()
        or torch.jit.is_tracing()
        or torch.jit.is_scripting()
        or torch.onnx.is_in_onnx_export()
    )


def eligible(x: Tensor) -> bool:
    """Where the kernel may replace the tensor-op path, in training and at inference: a
    contiguous float32 or float64 CPU tensor, in eager mode."""
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64):
        return False
    return x.is_contiguous() and _eager()


def conv_arguments(conv: Tensor | None, channels: int, like: Tensor) -> tuple[Tensor, int]:
    """The ratio branch's grouped conv as the kernel takes it: its C weights (none without
    the conv) and its groups (C without the conv: z is xhat itself)."""
    if conv is None:
        return like.new_empty(0), channels
    return conv.reshape(-1), conv.shape[0]


def _as(t: Tensor | None, like: Tensor) -> Tensor:
    """t as the kernel reads it: like's dtype, contiguous; None as empty. No op where t is
    already so (a layer's calls are a few dozen microseconds; each op costs one or two)."""
    if t is None:
        return like.new_empty(0)
    if t.dtype != like.dtype:
        t = t.to(like.dtype)
    return t if t.is_contiguous() else t.contiguous()


@functools.cache
def _codes(normalizers: tuple[str, ...]) -> list[int]:
    return [CODES[name] for name in normalizers]


def layer_arguments(
    cfg: KernelSettings, p: ENTensors, like: Tensor, bn_mean: Tensor | None, bn_var: Tensor | None
) -> list[Any]:
    """The arguments every kernel call ends with (``EN_LAYER_PARAMS`` in the source), in
    like's dtype: the bn member's mean and variance (1 x C, None without bn), the layer's
    parameters (FC1's weight transposed, as the kernel's loops run) and settings. Built once
    per forward; the backward reuses them."""
    conv, groups = conv_arguments(p.conv, like.shape[1], like)
    return [
        _codes(cfg.normalizers),
        cfg.num_groups,
        _as(None if bn_mean is None else bn_mean.reshape(-1), like),
        _as(None if bn_var is None else bn_var.reshape(-1), like),
        _as(p.weight, like),
        _as(p.bias, like),
        _as(conv, like),
        groups,
        _as(p.fc1_w.t(), like),
        _as(p.fc1_b, like),
        _as(p.fc2_w, like),
        _as(p.fc2_b, like),
        cfg.eps,
        cfg.relu,
        cfg.logit_scale,
        cfg.shared_affine,
        _as(p.offset, like),
    ]


def en_moments(module: ModuleType, x: Tensor) -> tuple[Tensor, Tensor]:
    """The instance table: mean and biased variance (N x C) of x (N x C x H x W)."""
    m, v = module.en_moments(x)
    return m, v


class Forward(NamedTuple):
    """``en_forward``'s results: Y, A (N x C) and the ratio branch's v, h, lambda."""

    y: Tensor
    a: Tensor
    vv: Tensor
    h: Tensor
    lam: Tensor


def en_forward(module: ModuleType, x: Tensor, m: Tensor, v: Tensor, args: list[Any]) -> Forward:
    """Y = A X + B with EN's coefficients from the instance table and ``layer_arguments``
    (which carry the bn member's statistics): ``exemplar_function.en_coefficients``'s math."""
    y, a, vv, h, lam = module.en_forward(x, m, v, *args)
    return Forward(y, a, vv, h, lam)


def en_backward(
    module: ModuleType,
    x: Tensor,
    grad_y: Tensor,
    m: Tensor,
    v: Tensor,
    forward: tuple[Tensor, Tensor, Tensor],
    args: list[Any],
    bn_trained: bool,
    conv_shape: torch.Size | None,
) -> tuple[Tensor, Tensor, Tensor, tuple[Tensor | None, ...]]:
    """``en_forward``'s backward from dY (``forward``: its v, h, lambda; ``args``: its arguments):
    dL/dm, dL/dv (N x C, all but the bn member's batch statistics), that member's two column
    sums (2 x C: dL/dM, dL/dS summed over the samples; zeros unless ``bn_trained``) and the
    gradients of (gamma, beta, conv, fc1 weight, fc1 bias, fc2 weight, fc2 bias), shaped as
    the parameters (conv None without it: ``conv_shape`` None)."""
    g_m, g_v, bn_sums, *grads = module.en_backward(
        x, _as(grad_y, x), m, v, *forward, bn_trained, *args
    )
    g_gamma, g_beta, g_conv, g_fc1_wt, g_fc1_b, g_fc2_w, g_fc2_b = grads
    g_conv = None if conv_shape is None else g_conv.view(conv_shape)
    return g_m, g_v, bn_sums, (g_gamma, g_beta, g_conv, g_fc1_wt.t(), g_fc1_b, g_fc2_w, g_fc2_b)


def en_input_grad(
    module: ModuleType, x: Tensor, grad_y: Tensor, a: Tensor, m: Tensor, g_m: Tensor, g_v: Tensor
) -> Tensor:
    """dL/dX = A dY + dL/dm / L + 2 dL/dv (X - m) / L in one pass (``fused_affine.input_grad``)."""
    return module.en_input_grad(x, _as(grad_y, x), a, m, g_m.contiguous(), g_v.contiguous())


def en_inference(module: ModuleType, x: Tensor, cfg: KernelSettings, p: ENTensors) -> Tensor:
    """EN(x) in eval mode, the whole layer in one call (the running statistics as bn's)."""
    return module.en_inference(x, *layer_arguments(cfg, p, x, p.running_mean, p.running_var))
