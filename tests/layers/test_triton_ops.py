"""EN's passes over X as Triton kernels, run by Triton's interpreter on CPU tensors
(``TRITON_INTERPRET=1``) and checked against the tensor ops that define them."""

from __future__ import annotations

import pytest
import torch

from enorm_cli.layers import fused_affine, triton_ops
from enorm_cli.layers.statistics import moments

pytest.importorskip("triton", reason="Triton is not installed: the kernels cannot be checked")


if not triton_ops.interpreted():
    pytest.skip(
        "TRITON_INTERPRET is off (tests/conftest.py turns it on before triton loads)",
        allow_module_level=True,
    )


LAYOUTS = {
    "nchw": lambda t: t.contiguous(),
    "nhwc": lambda t: t.contiguous(memory_format=torch.channels_last),
}
SHAPES = [
    (2, 3, 5, 7),  # odd sizes
    (3, 20, 1, 1),  # 1x1 maps
    pytest.param((2, 17, 31, 23), marks=pytest.mark.slow),  # rows in several chunks
]


def tolerance(dtype: torch.dtype) -> dict[str, float]:
    return {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("shape", SHAPES)
def test_moments_match_the_tensor_ops_even_far_from_zero(shape, layout) -> None:
    """Shifted sums: a mean of 1e3 over a std of 1 loses nothing (float64 as the reference)."""
    x = LAYOUTS[layout](torch.randn(shape) + 1e3 * torch.rand(shape[0], shape[1], 1, 1))
    assert triton_ops.eligible(x)
    mean, var = triton_ops.moments(x)
    m64, v64 = moments(x.double().flatten(2))
    torch.testing.assert_close(mean.double(), m64, rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(var.double(), v64, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize(
    "dtype",
    [
        torch.float32,
        pytest.param(torch.bfloat16, marks=pytest.mark.slow),
        pytest.param(torch.float16, marks=pytest.mark.slow),
    ],
)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_affine_and_backward_passes_match(layout, dtype) -> None:
    n, c, h, w = 2, 19, 9, 11
    x = LAYOUTS[layout](torch.randn(n, c, h, w)).to(dtype)
    dy = LAYOUTS[layout](torch.randn(n, c, h, w)).to(dtype)
    a, b, alpha, beta = (torch.randn(n, c) for _ in range(4))
    y = triton_ops.affine_apply(x, a, b)
    assert y.dtype == dtype and y.stride() == x.stride()
    torch.testing.assert_close(y, fused_affine.affine_apply(x, a, b), **tolerance(dtype))
    g_a, g_b = triton_ops.grad_sums(x, dy)
    _, _, ref_a, ref_b = fused_affine.affine_grads(x, dy)
    torch.testing.assert_close(g_a, ref_a, **tolerance(dtype))
    torch.testing.assert_close(g_b, ref_b, **tolerance(dtype))
    gx = triton_ops.input_grad(x, dy, a, alpha, beta)
    ref = a.view(n, c, 1, 1) * dy.float() + alpha.view(n, c, 1, 1) * x.float()
    torch.testing.assert_close(gx.float(), ref + beta.view(n, c, 1, 1), **tolerance(dtype))


def test_a_dy_in_another_layout_is_read_right() -> None:
    x = torch.randn(2, 5, 6, 6).contiguous(memory_format=torch.channels_last)
    dy = torch.randn(2, 5, 6, 6)  # NCHW, as autograd may hand it over
    g_a, g_b = triton_ops.grad_sums(x, dy)
    torch.testing.assert_close(g_a, (dy * x).sum((2, 3)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_b, dy.sum((2, 3)), rtol=1e-5, atol=1e-5)


def test_what_the_kernels_refuse() -> None:
    assert not triton_ops.eligible(torch.randn(2, 3, 4))  # not N x C x H x W
    assert not triton_ops.eligible(torch.randn(2, 3, 4, 4, dtype=torch.float64))
    assert not triton_ops.eligible(torch.randn(2, 3, 4, 4).transpose(2, 3))  # neither layout


def _step(layer, x: torch.Tensor, triton: bool, monkeypatch) -> tuple:
    """One training forward and backward on the tensor ops' passes or Triton's."""
    from enorm_cli.layers import native, runtime

    monkeypatch.setenv(native.ENV, "0")
    monkeypatch.setenv(runtime.TRITON_ENV, "1" if triton else "0")
    layer.zero_grad(set_to_none=True)
    xi = x.detach().clone().requires_grad_()
    y = layer(xi)
    (y.float() * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    grads = [p.grad.clone() for p in layer.parameters()]
    return y.detach(), xi.grad, grads, layer.running_mean.clone(), layer.running_var.clone()


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize(
    ("normalizers", "mode"),
    [
        (("bn", "in", "ln"), "batch"),
        pytest.param(("bn", "in", "ln", "gn"), "renorm", marks=pytest.mark.slow),
        pytest.param(("bn", "ln"), "renorm_frozen", marks=pytest.mark.slow),
        pytest.param(("bn", "in", "ln"), "eval", marks=pytest.mark.slow),
    ],
)
def test_the_node_on_triton_passes_equals_the_tensor_ops(
    normalizers, mode, layout, monkeypatch
) -> None:
    """EN's whole training step (forward, backward, running statistics) with ``ENORM_TRITON=1``
    against the tensor ops, every bn statistics mode."""
    import copy

    from torch import nn

    import enorm_cli

    torch.manual_seed(0)
    bn = nn.BatchNorm2d(32).eval()  # gn: 32 groups
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2)
    layer = enorm_cli.convert_model(bn, normalizers=normalizers, margin=1.0)
    with torch.no_grad():
        layer.ratio.fc2.weight.normal_(0, 0.5)  # input-dependent ratios
        layer.weight.uniform_(0.5, 1.5)
    if mode == "eval":
        layer.eval()
    else:
        enorm_cli.set_bn_stats(layer, mode)
    x = LAYOUTS[layout](torch.randn(4, 32, 6, 5) * 2 + 1)
    fast = _step(copy.deepcopy(layer), x, True, monkeypatch)
    plain = _step(copy.deepcopy(layer), x, False, monkeypatch)
    for got, want in zip(fast, plain):
        if isinstance(got, list):
            for g, w in zip(got, want):
                torch.testing.assert_close(g, w, rtol=1e-3, atol=1e-4)  # summation order
        else:
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert fast[0].stride() == x.stride()  # the output keeps the input's layout
