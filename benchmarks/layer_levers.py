"""EN's layer-level levers, summed over every norm layer of a real model, interleaved.

For each norm layer of the model (its input shape, seen once through forward hooks),
one forward + backward (train) and one forward (eval, inference mode) of:

- ``bn``: ``nn.BatchNorm2d`` (the original layer);
- ``autograd``: EN as plain autograd code over one fused ``A * X + B`` node
  (``fused_affine.py``; the path synced statistics take);
- ``two_pass``: the one-node fast path (``exemplar_function.py``) with the two-pass
  statistics forced (the one-pass condition disabled);
- ``fast``: the fast path as shipped (one-pass statistics where they are exact enough);
- ``x_passes``: only the passes over X the fast path makes (statistics, ``A X + B``, and in
  backward ``sum(dY X)``, ``sum(dY)``, dX) with the per-sample coefficient math costing
  nothing: the floor that any kernel for that math (a C++ op, a compiled region) could reach;
- ``native`` (``--native``): the layer as enorm runs it on CPU once its C++ kernel is built
  (``enorm_cli/layers/native.py``, ``csrc/en_layer.cpp``; torch's JIT extension loader, a
  compiler needed): in training the per-sample math as one C++ call forward and one backward
  around the same passes over X, at inference the whole layer as one call.

Milliseconds summed over the model's layers (medians per layer), and the EN minus BN
difference: the cost EN adds per step on top of the rest of the network.

    python benchmarks/layer_levers.py     # mobilenetv2_100 at 32 px, resnet50 at 160 px
    python benchmarks/layer_levers.py --reps 15
    python benchmarks/layer_levers.py --native
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import enorm_cli.layers.statistics as stats_module
from enorm_cli.layers import ExemplarNorm2d
from enorm_cli.layers import native as native_module
from enorm_cli.layers.base import MixedNorm2d
from enorm_cli.layers.fused_affine import affine_apply, affine_grads, input_grad, wide
from enorm_cli.layers.statistics import moments

MODELS = {"mobilenetv2_100": (64, 32), "resnet50": (8, 160)}
VARIANTS = ("bn", "autograd", "two_pass", "fast", "x_passes")
NATIVE = "native"


def load_native() -> Any:
    """enorm's C++ kernel (``enorm_cli/layers/native.py``), built if missing."""
    return native_module.build()


class _XPasses(torch.autograd.Function):
    """The fast path's passes over X, with A = 1 and B = the instance mean standing in for
    the coefficients (whose math is skipped)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, training: bool) -> torch.Tensor:
        m, _ = moments(wide(x).flatten(2), one_pass=training)
        a = torch.ones_like(m)
        ctx.save_for_backward(x, a, m)
        return affine_apply(x, a, m)

    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor) -> tuple[torch.Tensor, None]:
        x, a, m = ctx.saved_tensors
        xw, gw, da, db = affine_grads(x, grad_y)
        return input_grad(x, xw, gw, a, m, db, da), None


class XPasses(nn.Module):
    """``_XPasses`` as a layer."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _XPasses.apply(x, self.training)


def norm_input_shapes(name: str, batch: int, size: int) -> Counter[tuple[int, ...]]:
    """How many norm layers see each input shape in one forward of the timm model."""
    import timm

    model = timm.create_model(name)
    seen: list[tuple[int, ...]] = []
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape)))
    with torch.no_grad():
        model(torch.randn(batch, 3, size, size))
    return Counter(seen)


def elapsed_ms(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def run_variant(variant: str, layer: nn.Module, x: torch.Tensor, grad: torch.Tensor | None) -> None:
    forward = (lambda t: MixedNorm2d.forward(layer, t)) if variant == "autograd" else layer
    condition = stats_module.ONE_PASS_CONDITION
    if variant == "two_pass":
        stats_module.ONE_PASS_CONDITION = -1.0  # every row fails the check: two passes
    previous = os.environ.get(native_module.ENV)
    os.environ[native_module.ENV] = "auto" if variant == NATIVE else "0"  # tensor ops but there
    try:
        if grad is None:
            with torch.inference_mode():
                forward(x)
        else:
            forward(x).backward(grad)
    finally:
        stats_module.ONE_PASS_CONDITION = condition
        if previous is None:
            del os.environ[native_module.ENV]
        else:
            os.environ[native_module.ENV] = previous


def bench(
    name: str, reps: int, model_name: str | None = None, native: bool = False
) -> dict[str, dict[str, float]]:
    """ms per mode and variant, summed over the norm layers of timm's ``model_name`` (default
    ``name``) at ``MODELS[name]``'s batch and size; with ``native`` (after ``load_native()``)
    the ``native`` variant too."""
    batch, size = MODELS[name]
    variants = (*VARIANTS, NATIVE) if native else VARIANTS
    totals = {mode: dict.fromkeys(variants, 0.0) for mode in ("train", "eval")}
    for shape, count in norm_input_shapes(model_name or name, batch, size).items():
        c = shape[1]
        layers = {"bn": nn.BatchNorm2d(c), "x_passes": XPasses()} | {
            v: ExemplarNorm2d(c) for v in (*VARIANTS[1:4], *variants[len(VARIANTS) :])
        }
        x = torch.randn(*shape, requires_grad=True)
        grad = torch.randn(*shape)
        for mode in ("train", "eval"):
            times: dict[str, list[float]] = {v: [] for v in variants}
            for v in variants:  # warm-up
                layers[v].train(mode == "train")
                run_variant(v, layers[v], x, grad if mode == "train" else None)
            for _ in range(reps):  # interleaved
                for v in variants:
                    times[v].append(
                        elapsed_ms(
                            lambda v=v: run_variant(
                                v, layers[v], x, grad if mode == "train" else None
                            )
                        )
                    )
            for v in variants:
                totals[mode][v] += count * statistics.median(times[v])
    return totals


COLUMNS = {
    "bn": "BN",
    "autograd": "EN autograd",
    "two_pass": "EN fast, two-pass stats",
    "fast": "EN fast",
    "native": "EN, C++ kernel",
    "x_passes": "X passes only",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--native", action="store_true", help="also EN with its C++ kernel")
    parser.add_argument("--json", type=Path, help="write the sums (ms) here too")
    args = parser.parse_args(argv)
    if args.native:
        load_native()
    torch.manual_seed(0)
    names = [v for v in COLUMNS if args.native or v != NATIVE]
    print("| model | mode | " + " | ".join(COLUMNS[v] for v in names) + " | EN - BN: fast |")
    print("|---|---|" + "---|" * (len(names) + 1))
    rows = []
    for name in args.models:
        batch, size = MODELS[name]
        for mode, t in bench(name, args.reps, native=args.native).items():
            rows.append({"model": name, "batch": batch, "size": size, "mode": mode, "ms": t})
            cells = " | ".join(f"{t[v]:.1f}" for v in names)
            print(f"| {name} b{batch} {size}px | {mode} | {cells} | {t['fast'] - t['bn']:.1f} |")
    if args.json:
        args.json.write_text(json.dumps({"reps": args.reps, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
