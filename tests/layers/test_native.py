"""layers/native.py: EN's C++ kernel (training step and inference layer), used only where it
computes what the tensor-op path computes, never built in the middle of a run."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import anchor, assert_moments_match_float64

from enorm_cli.layers import ExemplarNorm2d, native
from enorm_cli.layers.statistics import FROZEN_STALE


@pytest.fixture()
def module(native_kernel):
    return native_kernel


def randomized(num_features: int, **kwargs) -> ExemplarNorm2d:
    """Every parameter and running statistic off its default, so a swapped index shows."""
    layer = ExemplarNorm2d(num_features, **kwargs)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn_like(p) * 0.3)
        layer.running_mean.normal_()
        layer.running_var.uniform_(0.5, 2.0)
        anchor(layer)
    return layer.eval()


def both_paths(layer: ExemplarNorm2d, x: torch.Tensor, monkeypatch) -> tuple[torch.Tensor, ...]:
    """EN(x) in eval through the kernel and through the tensor ops."""
    with torch.no_grad():
        monkeypatch.setenv(native.ENV, "auto")
        fast = layer(x)
        monkeypatch.setenv(native.ENV, "0")
        plain = layer(x)
    return fast, plain


SHAPES = [(4, 16, 5, 5), (3, 16, 1, 1), (1, 16, 2, 3), (2, 16, 11, 11)]
"""Maps down to 1 x 1, a batch of 1, and rows of 121 (the kernel's long-row sums: 16 partial
sums over 112 values, then a tail of 9)."""

CONFIGS = [
    {"normalizers": ("bn", "in", "ln")},
    {"normalizers": ("bn", "ln"), "activation": "relu"},
    {"normalizers": ("bn", "in", "ln", "gn"), "num_groups": 4, "use_conv": False},
    {"normalizers": ("in", "ln"), "shared_affine": True},
    {"normalizers": ("bn", "gn"), "num_groups": 2, "reduction": 2},
]


@pytest.mark.parametrize("length", [1, 25, 64, 121, 1600])
@pytest.mark.parametrize("shift", [0.0, 1e3])
def test_instance_moments_against_float64(module, length: int, shift: float) -> None:
    """en_moments on short rows (one running sum), long ones (16 partial sums and a tail) and
    rows with |mean| / std = 1e3: two passes, so the variance does not cancel."""
    torch.manual_seed(0)
    x = torch.randn(3, 5, length) * (1 + torch.rand(1, 5, 1)) + shift
    mean, var = native.en_moments(module, x.unsqueeze(-1).contiguous())
    assert_moments_match_float64(x, mean, var)


@pytest.mark.slow
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(c["normalizers"]))
@pytest.mark.parametrize("shape", SHAPES)
def test_kernel_computes_what_the_tensor_ops_compute(module, config, shape, monkeypatch) -> None:
    """Every option the kernel reads, on every shape of SHAPES."""
    torch.manual_seed(0)
    layer = randomized(16, **config)
    calls = []
    real = native.en_inference
    monkeypatch.setattr(
        native, "en_inference", lambda *a: calls.append(1) or real(*a), raising=True
    )
    x = torch.randn(*shape) * 2 + 0.5
    fast, plain = both_paths(layer, x, monkeypatch)
    assert calls, "the kernel was not used"
    # 1 x 1 maps: in's variance is 0, so A and B are 1/sqrt(eps) = 316 times larger and
    # cancel in A x + B; both paths round that differently
    tol = 1e-4 if shape[2] * shape[3] == 1 else 1e-5
    torch.testing.assert_close(fast, plain, rtol=tol, atol=tol)


@pytest.mark.slow
def test_float64_and_a_converted_model_agree(module, monkeypatch) -> None:
    """float64 to float64 precision; a converted torchvision MobileNetV2 end to end."""
    import torchvision

    from enorm_cli.config.settings import ENSettings
    from enorm_cli.convert.surgery import replace_norms

    torch.manual_seed(0)
    layer = randomized(8).double()
    x = torch.randn(2, 8, 3, 3, dtype=torch.float64)
    fast, plain = both_paths(layer, x, monkeypatch)
    assert fast.dtype == torch.float64
    torch.testing.assert_close(fast, plain, rtol=1e-12, atol=1e-12)

    model = torchvision.models.mobilenet_v2(num_classes=10)
    replace_norms(model, ENSettings())
    model.eval()
    images = torch.randn(2, 3, 32, 32)
    fast, plain = both_paths(model, images, monkeypatch)
    torch.testing.assert_close(fast, plain, rtol=1e-4, atol=1e-4)


def test_kernel_stays_out_where_the_tensor_ops_must_run(module, monkeypatch) -> None:
    """The whole-layer call is for inference only: training, autograd, bf16 and channels_last
    inputs go elsewhere."""
    monkeypatch.setenv(native.ENV, "auto")
    used = []
    monkeypatch.setattr(native, "en_inference", lambda *a: used.append(1) / 0)
    layer = randomized(8)
    x = torch.randn(2, 8, 4, 4)
    layer(x)  # grad enabled, parameters require grad
    with torch.no_grad():
        layer.train()(x)
        layer.eval()
        layer(x.to(torch.bfloat16))
        layer(x.to(memory_format=torch.channels_last))
    assert not used


def test_never_builds_in_a_run_and_can_be_switched_off(tmp_path, monkeypatch) -> None:
    """Without a build in $ENORM_HOME the layer takes its tensor ops at once (no compile);
    ``ENORM_NATIVE=0`` switches a build off."""
    monkeypatch.setenv("ENORM_HOME", str(tmp_path))
    monkeypatch.setattr(native, "_loaded", {})
    monkeypatch.setattr(native, "build", lambda: pytest.fail("built during a run"))
    assert native.kernel() is None
    assert not (tmp_path / "native").exists()
    monkeypatch.setattr(native, "_loaded", {"module": object()})
    monkeypatch.setenv(native.ENV, "0")
    assert native.kernel() is None


def test_build_name_changes_with_the_source_and_flags(monkeypatch) -> None:
    """An upgraded source or other flags build anew rather than load a stale library."""
    name = native.build_name()
    monkeypatch.setattr(native, "FLAGS", (*native.FLAGS, "-DENORM_OTHER"))
    assert native.build_name() != name and native.build_name().startswith("enorm_native_")


def test_a_failed_build_is_one_line(monkeypatch) -> None:
    """No compiler: ``enorm build-kernel`` says so in one line, names the fix and exits 1."""
    from typer.testing import CliRunner

    from enorm_cli.cli.main import app

    def fail() -> None:
        raise RuntimeError("Error building extension 'enorm_native'\nmore lines")

    monkeypatch.setattr(native, "build", fail)
    result = CliRunner().invoke(app, ["build-kernel"])
    assert result.exit_code == 1
    err = result.stderr
    assert err.count("\n") == 1 and "Error building extension" in err and "tensor ops" in err
    assert "Traceback" not in result.output


def train_step(layer: ExemplarNorm2d, x: torch.Tensor, env: str, monkeypatch) -> tuple:
    """One training forward and backward with ``ENORM_NATIVE=env``: y, the input gradient,
    every parameter's gradient, the running statistics and whether the kernel ran."""
    monkeypatch.setenv(native.ENV, env)
    layer.zero_grad(set_to_none=True)
    xi = x.clone().requires_grad_()
    y = layer(xi)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    grads = [p.grad for p in layer.parameters()]
    stats = (layer.running_mean.clone(), layer.running_var.clone())
    return y.detach(), xi.grad, grads, stats, y.grad_fn is not None and y.grad_fn.kernel is not None


def assert_steps_agree(fast: tuple, plain: tuple, tol: float) -> None:
    y1, gx1, gp1, st1, used = fast
    y2, gx2, gp2, st2, unused = plain
    assert used and not unused, "the kernel ran where it should not, or not where it should"
    torch.testing.assert_close(y1, y2, rtol=tol, atol=tol)
    torch.testing.assert_close(gx1, gx2, rtol=10 * tol, atol=tol)
    for g1, g2 in zip(gp1, gp2):  # sums in another order: tolerance scaled to the gradient
        scale = max(float(g2.abs().max()), 1e-2)  # W sums h - c, near 0 at the centre: rounding
        torch.testing.assert_close(g1, g2, rtol=10 * tol, atol=10 * tol * scale)
    for s1, s2 in zip(st1, st2):
        torch.testing.assert_close(s1, s2, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(c["normalizers"]))
@pytest.mark.parametrize("shape", SHAPES)
def test_training_step_computes_what_the_tensor_ops_compute(
    module, config, shape, monkeypatch
) -> None:
    """Forward, input and parameter gradients and running statistics of a training step, every
    option the kernel reads, on every shape of SHAPES."""
    torch.manual_seed(0)
    layer = randomized(16, **config).train()
    twin = copy.deepcopy(layer)
    x = torch.randn(*shape) * 2 + 0.5
    # 1 x 1 maps: in's variance is 0, so A and B are 1/sqrt(eps) = 316 times larger (above)
    tol = 1e-4 if shape[2] * shape[3] == 1 else 1e-5
    fast = train_step(layer, x, "auto", monkeypatch)
    assert_steps_agree(fast, train_step(twin, x, "0", monkeypatch), tol)


@pytest.mark.parametrize("regime", ["renorm", "frozen", "stale", "eval"])
def test_every_bn_regime_trains_as_the_tensor_ops_do(module, regime, monkeypatch) -> None:
    """Batch renormalization, frozen statistics (at 2 values per channel, where the backward
    blends in the frozen statistics' gradient), a tripped guard, and eval mode with autograd
    (the running statistics as constants): the bn member's statistics and backward are the
    tensor ops' on both paths, the rest the kernel's."""
    torch.manual_seed(0)
    layer = randomized(16).train()
    x = torch.randn(2, 16, 1, 1) if regime == "frozen" else torch.randn(4, 16, 3, 3) * 2 + 0.5
    layer.renorm = regime != "eval"
    layer.frozen_stats = regime in ("frozen", "stale")
    if regime == "stale":
        layer.frozen_state.fill_(FROZEN_STALE)
    layer.train(regime != "eval")
    twin = copy.deepcopy(layer)
    tol = 1e-4 if regime == "frozen" else 1e-5
    fast = train_step(layer, x, "auto", monkeypatch)
    assert_steps_agree(fast, train_step(twin, x, "0", monkeypatch), tol)


def test_float64_training_step_agrees_to_float64_precision(module, monkeypatch) -> None:
    torch.manual_seed(0)
    layer = randomized(8, normalizers=("bn", "in", "ln", "gn"), num_groups=2).double().train()
    twin = copy.deepcopy(layer)
    x = torch.randn(3, 8, 4, 4, dtype=torch.float64)
    fast = train_step(layer, x, "auto", monkeypatch)
    assert_steps_agree(fast, train_step(twin, x, "0", monkeypatch), 1e-12)


def test_training_is_deterministic(module, monkeypatch) -> None:
    """Per-task gradient sums added in order: the same step twice is bit-identical."""
    torch.manual_seed(0)
    layer = randomized(64).train()
    twin = copy.deepcopy(layer)  # a step moves the centred branch's centre: start both alike
    x = torch.randn(32, 64, 4, 4)
    first = train_step(layer, x, "auto", monkeypatch)
    second = train_step(twin, x, "auto", monkeypatch)
    assert torch.equal(first[1], second[1])
    assert all(torch.equal(a, b) for a, b in zip(first[2], second[2]))


def test_training_stays_out_where_the_tensor_ops_must_run(module, monkeypatch) -> None:
    """channels_last inputs and bf16 ones (a conv's output under bf16 autocast) train through
    the tensor ops."""
    monkeypatch.setenv(native.ENV, "auto")
    layer = randomized(8).train()
    x = torch.randn(2, 8, 4, 4)
    for inputs, autocast in (
        (x.to(memory_format=torch.channels_last), False),
        (x.to(torch.bfloat16), True),
    ):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = layer(inputs.requires_grad_())
        assert y.grad_fn.kernel is None
