"""benchmarks/layer_levers.py: the X-passes floor makes the fast path's passes, no more."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import layer_levers
import torch


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


def test_native_variant_is_timed_in_both_modes(native_kernel, monkeypatch) -> None:
    """With the kernel built, the ``native`` column is the layer as shipped, train and eval."""
    monkeypatch.setitem(layer_levers.MODELS, "tiny", (2, 8))
    totals = layer_levers.bench("tiny", reps=1, model_name="test_efficientnet", native=True)
    assert all(totals[mode][layer_levers.NATIVE] > 0 for mode in ("train", "eval"))
