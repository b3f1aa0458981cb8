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
  nothing: the floor that any kernel for that math (a C++ op, a compiled region) could reach.

Milliseconds summed over the model's layers (medians per layer), and the EN minus BN
difference: the cost EN adds per step on top of the rest of the network.

    python benchmarks/layer_levers.py     # mobilenetv2_100 at 32 px, resnet50 at 160 px
    python benchmarks/layer_levers.py --reps 15
"""

from __future__ import annotations

import argparse
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
from enorm_cli.layers.base import MixedNorm2d
from enorm_cli.layers.fused_affine import affine_apply, affine_grads, input_grad, wide
from enorm_cli.layers.statistics import moments

MODELS = {"mobilenetv2_100": (64, 32), "resnet50": (8, 160)}
VARIANTS = ("bn", "autograd", "two_pass", "fast", "x_passes")


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
    try:
        if grad is None:
            with torch.inference_mode():
                forward(x)
        else:
            forward(x).backward(grad)
    finally:
        stats_module.ONE_PASS_CONDITION = condition


def bench(name: str, reps: int, model_name: str | None = None) -> dict[str, dict[str, float]]:
    """ms per mode and variant, summed over the norm layers of timm's ``model_name`` (default
    ``name``) at ``MODELS[name]``'s batch and size."""
    batch, size = MODELS[name]
    totals = {mode: dict.fromkeys(VARIANTS, 0.0) for mode in ("train", "eval")}
    for shape, count in norm_input_shapes(model_name or name, batch, size).items():
        c = shape[1]
        layers = {"bn": nn.BatchNorm2d(c), "x_passes": XPasses()} | {
            v: ExemplarNorm2d(c) for v in VARIANTS[1:4]
        }
        x = torch.randn(*shape, requires_grad=True)
        grad = torch.randn(*shape)
        for mode in ("train", "eval"):
            times: dict[str, list[float]] = {v: [] for v in VARIANTS}
            for v in VARIANTS:  # warm-up
                layers[v].train(mode == "train")
                run_variant(v, layers[v], x, grad if mode == "train" else None)
            for _ in range(reps):  # interleaved
                for v in VARIANTS:
                    times[v].append(
                        elapsed_ms(
                            lambda v=v: run_variant(
                                v, layers[v], x, grad if mode == "train" else None
                            )
                        )
                    )
            for v in VARIANTS:
                totals[mode][v] += count * statistics.median(times[v])
    return totals


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--reps", type=int, default=9)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    print(
        "| model | mode | BN | EN autograd | EN fast, two-pass stats | EN fast | X passes only "
        "| EN - BN: autograd -> fast -> X passes only |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name in args.models:
        for mode, t in bench(name, args.reps).items():
            batch, size = MODELS[name]
            print(
                f"| {name} b{batch} {size}px | {mode} | {t['bn']:.1f} | {t['autograd']:.1f} | "
                f"{t['two_pass']:.1f} | "
                f"{t['fast']:.1f} | {t['x_passes']:.1f} | {t['autograd'] - t['bn']:.1f} -> "
                f"{t['fast'] - t['bn']:.1f} -> {t['x_passes'] - t['bn']:.1f} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
