"""layers/native.py: EN's inference layer as one C++ call, used only where it computes what
the tensor-op path computes, never built in the middle of a run."""

from __future__ import annotations

import shutil

import pytest
import torch

from enorm_cli.layers import ExemplarNorm2d, native

needs_compiler = pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler")


@pytest.fixture(scope="module")
def module():
    """The kernel, built once (scripts/setup_env.sh has usually built it already)."""
    return native.build()


def randomized(num_features: int, **kwargs) -> ExemplarNorm2d:
    """Every parameter and running statistic off its default, so a swapped index shows."""
    layer = ExemplarNorm2d(num_features, **kwargs)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn_like(p) * 0.3)
        layer.running_mean.normal_()
        layer.running_var.uniform_(0.5, 2.0)
    return layer.eval()


def both_paths(layer: ExemplarNorm2d, x: torch.Tensor, monkeypatch) -> tuple[torch.Tensor, ...]:
    """EN(x) in eval through the kernel and through the tensor ops."""
    with torch.no_grad():
        monkeypatch.setenv(native.ENV, "auto")
        fast = layer(x)
        monkeypatch.setenv(native.ENV, "0")
        plain = layer(x)
    return fast, plain


CONFIGS = [
    {"normalizers": ("bn", "in", "ln")},
    {"normalizers": ("bn", "ln"), "activation": "relu"},
    {"normalizers": ("bn", "in", "ln", "gn"), "num_groups": 4, "use_conv": False},
    {"normalizers": ("in", "ln"), "shared_affine": True},
    {"normalizers": ("bn", "gn"), "num_groups": 2, "reduction": 2},
]


@needs_compiler
@pytest.mark.slow
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(c["normalizers"]))
@pytest.mark.parametrize("shape", [(4, 16, 5, 5), (3, 16, 1, 1), (1, 16, 2, 3)])
def test_kernel_computes_what_the_tensor_ops_compute(module, config, shape, monkeypatch) -> None:
    """Every option the kernel reads, on maps down to 1 x 1 and a batch of 1."""
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


@needs_compiler
@pytest.mark.slow
def test_float64_and_a_converted_model_agree(module, monkeypatch) -> None:
    """float64 to float64 precision; a converted torchvision MobileNetV2 end to end."""
    import torchvision

    from enorm_cli.settings import ENSettings
    from enorm_cli.surgery import convert_model

    torch.manual_seed(0)
    layer = randomized(8).double()
    x = torch.randn(2, 8, 3, 3, dtype=torch.float64)
    fast, plain = both_paths(layer, x, monkeypatch)
    assert fast.dtype == torch.float64
    torch.testing.assert_close(fast, plain, rtol=1e-12, atol=1e-12)

    model = torchvision.models.mobilenet_v2(num_classes=10)
    convert_model(model, ENSettings())
    model.eval()
    images = torch.randn(2, 3, 32, 32)
    fast, plain = both_paths(model, images, monkeypatch)
    torch.testing.assert_close(fast, plain, rtol=1e-4, atol=1e-4)


@needs_compiler
def test_kernel_stays_out_where_the_tensor_ops_must_run(module, monkeypatch) -> None:
    """Training, autograd, bf16 and channels_last inputs take the tensor-op path."""
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


def test_a_failed_build_is_one_line(monkeypatch, capsys) -> None:
    """No compiler: ``python -m enorm_cli.build_native`` says so in one line and exits 1."""

    def fail() -> None:
        raise RuntimeError("Error building extension 'enorm_native'\nmore lines")

    monkeypatch.setattr(native, "build", fail)
    assert native.main() == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Error building extension" in err and "tensor ops" in err
