"""benchmarks/layer_levers.py: the X-passes floor makes the fast path's passes, no more."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch

from enorm_cli.layers import ExemplarNorm2d

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import layer_levers


def test_x_passes_reads_and_writes_x_as_the_fast_path_does() -> None:
    """Forward: X + its instance mean (A = 1, B = mean); backward: dX = dY + alpha X + beta
    with alpha = 2 sum(dY X) / L and beta = sum(dY) / L - alpha mean (``input_grad`` fed the
    two row sums as if they were the coefficient math's gradients)."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    layer = layer_levers.XPasses().train()
    y = layer(x)
    mean = x.detach().mean((2, 3), keepdim=True)
    torch.testing.assert_close(y, x.detach() + mean)
    g = torch.randn_like(y)
    y.backward(g)
    alpha = 2 * (g * x.detach()).sum((2, 3), keepdim=True) / 16
    beta = g.sum((2, 3), keepdim=True) / 16 - alpha * mean
    torch.testing.assert_close(x.grad, g + alpha * x.detach() + beta)


def test_table_has_a_row_per_mode_with_the_floor(capsys) -> None:
    """One model, one repetition: train and eval rows, every variant timed (> 0 ms)."""
    layer_levers.MODELS["tiny"] = (2, 8)
    try:
        totals = layer_levers.bench("tiny", reps=1, model_name="test_efficientnet")
    finally:
        del layer_levers.MODELS["tiny"]
    assert set(totals) == {"train", "eval"}
    for mode in totals.values():
        assert set(mode) == set(layer_levers.VARIANTS) and all(t > 0 for t in mode.values())


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("c++") is None, reason="the C++ lever needs a compiler")
def test_native_coefficients_equal_the_fast_path_at_inference() -> None:
    """The C++ coefficient kernel (compiled by torch's JIT loader) computes what the fast path
    does, with every parameter randomized, with and without the grouped conv; so does the
    whole layer as one call."""
    native = layer_levers.load_native()
    torch.manual_seed(0)
    for use_conv in (True, False):
        lever = layer_levers.NativeEval(12, native)
        lever.layer = ExemplarNorm2d(
            12, normalizers=("bn", "in", "ln", "gn"), use_conv=use_conv, num_groups=3
        )
        with torch.no_grad():
            for p in lever.layer.parameters():
                p.add_(torch.randn_like(p) * 0.3)
            lever.layer.running_var.uniform_(0.5, 2.0)
        lever.layer.eval()
        x = torch.randn(5, 12, 3, 3)
        whole = layer_levers.NativeLayer(12, native)
        whole.layer = lever.layer
        with torch.inference_mode():
            torch.testing.assert_close(lever(x), lever.layer(x), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(whole(x), lever.layer(x), rtol=1e-5, atol=1e-5)
