"""EN's inference layer as one C++ call on CPU: built once, loaded when built, else skipped.

The tensor-op path (``exemplar_function.exemplar_norm``) defines EN and stays the fallback.
At inference on CPU it is some 30 small ops per layer plus separate passes over X; the
kernel (``csrc/en_inference.cpp``) does the same in one call: about 2x faster layers on
MobileNetV2 and ResNet-50 (docs/performance.md). Like other PyTorch C++ extensions it is
compiled on the user's machine by torch's JIT loader (a C++ compiler, about a minute), once:

    python -m enorm_cli.build_native          # build (scripts/setup_env.sh does it too)

``ENORM_NATIVE``: ``auto`` (the default) uses the kernel when it is built and never builds
in the middle of a run; ``0`` never uses it. The build lives in ``$ENORM_HOME/native/``
under a name that hashes the source, the flags and torch's version, so an upgrade builds
anew instead of loading a stale one.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

SOURCE = Path(__file__).with_name("csrc") / "en_inference.cpp"
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
"""Normalizer codes of the kernel's ``en_inference``."""

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


def eligible(x: Tensor) -> bool:
    """Where the kernel may replace the tensor-op path at inference: a contiguous float32 or
    float64 CPU tensor, in eager mode (tracing, scripting, compiling and exporting see the
    tensor-op graph)."""
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64):
        return False
    if not x.is_contiguous():
        return False
    return not (
        torch.compiler.is_compiling()
        or torch.jit.is_tracing()
        or torch.jit.is_scripting()
        or torch.onnx.is_in_onnx_export()
    )


def conv_arguments(conv: Tensor | None, channels: int, like: Tensor) -> tuple[Tensor, int]:
    """The ratio branch's grouped conv as the kernel takes it: its C weights (none without
    the conv) and its groups (C without the conv: z is xhat itself)."""
    if conv is None:
        return like.new_empty(0), channels
    return conv.reshape(-1), conv.shape[0]


def en_inference(module: Any, x: Tensor, layer: Any) -> Tensor:
    """EN(x) in eval mode through the kernel; ``layer`` an ``ExemplarNorm2d``."""
    branch = layer.ratio
    conv, groups = conv_arguments(
        None if branch.conv is None else branch.conv.weight, x.shape[1], x
    )

    def same(t: Tensor) -> Tensor:
        return t.to(x.dtype).contiguous()

    y = module.en_inference(
        x.flatten(2),
        same(layer.running_mean),
        same(layer.running_var),
        [CODES[name] for name in layer.normalizers],
        layer.num_groups,
        same(layer.weight),
        same(layer.bias),
        same(conv),
        groups,
        same(branch.fc1.weight),
        same(branch.fc1.bias),
        same(branch.fc2.weight),
        same(branch.fc2.bias),
        layer.eps,
        layer.activation == "relu",
        layer.logit_scale,
        layer.shared_affine,
    )
    return y.view_as(x)


def main() -> int:
    """Build the kernel and say where; a missing compiler is one line, not a traceback."""
    try:
        build()
    except Exception as error:  # the loader raises RuntimeError, OSError, CalledProcessError
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"enorm native kernel: not built ({first}); EN keeps its tensor ops", file=sys.stderr)
        return 1
    print(f"enorm native kernel: built in {build_dir()}")
    return 0
