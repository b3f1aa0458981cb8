"""The instance-statistics lever: torch.var_mean vs enorm's two-pass autograd.Function.

    python benchmarks/instance_stats_lever.py

Milliseconds per call (20 calls after a warm-up, inference mode) on the feature shapes
of MobileNetV2 at 32 px and ResNet-50 at 160 px, and the whole EN layer for reference.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from enorm_cli.layers import ExemplarNorm2d
from enorm_cli.layers.statistics import instance_stats

SHAPES = [(64, 32, 16, 16), (64, 144, 8, 8), (64, 576, 2, 2), (64, 960, 1, 1), (8, 256, 40, 40)]


def ms(fn: Callable[[], object], n: int = 20) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n * 1e3


def main() -> None:
    print(
        "| N x C x H x W | torch.var_mean (H, W) | enorm instance_stats | EN layer | BatchNorm2d |"
    )
    print("|---|---|---|---|---|")
    for shape in SHAPES:
        x = torch.randn(*shape)
        layer, bn = ExemplarNorm2d(shape[1]).eval(), torch.nn.BatchNorm2d(shape[1]).eval()
        with torch.inference_mode():
            cells = [
                ms(lambda: torch.var_mean(x, dim=(2, 3), correction=0)),
                ms(lambda: instance_stats(x)),
                ms(lambda: layer(x)),
                ms(lambda: bn(x)),
            ]
        print(f"| {'x'.join(map(str, shape))} | " + " | ".join(f"{c:.2f}" for c in cells) + " |")


if __name__ == "__main__":
    main()
