"""ExemplarNorm2d against a float64 reference written from the paper's equations."""

from __future__ import annotations

import pytest
import torch
from helpers import anchor, assert_paths_agree, frozen_layer
from reference import en_reference
from torch import nn
from torch.func import functional_call

from enorm_cli.layers import ExemplarNorm2d
from enorm_cli.layers.statistics import (
    FROZEN_GRADIENT_SHARE,
    FROZEN_STALE,
    batch_stats,
    frozen_gradient_share,
    instance_stats,
    renormalized_stats,
)

CONFIGS = {
    "bn-in-ln": {},
    "with-gn": {"normalizers": ("bn", "in", "ln", "gn"), "num_groups": 8},
    "gn-ln": {"normalizers": ("gn", "ln"), "num_groups": 4},
    "bn-only": {"normalizers": ("bn",)},
    "shared-affine": {"shared_affine": True},
    "relu": {"activation": "relu"},
    "no-conv": {"use_conv": False},
    "odd-width": {"num_features": 30, "reduction": 16},
}


def make_layer(num_features: int = 32, reduction: int = 4, **kwargs) -> ExemplarNorm2d:
    """A layer with every parameter randomized, so a swapped index or a lost term shows."""
    layer = ExemplarNorm2d(num_features, reduction=reduction, **kwargs)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            p.copy_(torch.randn_like(p) * (0.5 if name in ("weight", "bias") else 0.3))
            if name == "weight":
                p.add_(1.0)
        anchor(layer)
    return layer


def batch(
    n: int = 6, c: int = 32, hw: int = 5, shift: float = 0.0, scale: float = 1.0
) -> torch.Tensor:
    """Channels and samples with different means and scales, as real features have."""
    chan = torch.randn(1, c, 1, 1)
    samp = torch.randn(n, 1, 1, 1) * 0.5
    return (torch.randn(n, c, hw, hw) * scale * (1 + chan.abs()) + chan + samp + shift).float()


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_matches_float64_reference(config: str, mode: str) -> None:
    kwargs = dict(CONFIGS[config])
    layer = make_layer(**kwargs)
    c = layer.num_features
    for _ in range(3):  # non-trivial running statistics for eval mode
        layer(batch(c=c))
    layer.train(mode == "train")
    x = batch(c=c)
    expected, expected_lam = en_reference(layer, x)
    y = layer(x)
    torch.testing.assert_close(y.double(), expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(layer.ratios(x).double(), expected_lam, rtol=1e-5, atol=1e-5)


def test_ratios_sum_to_one_per_sample_and_are_what_forward_used() -> None:
    layer = ExemplarNorm2d(32, reduction=4)  # plain random init, nothing tuned
    x = batch()
    before = (
        layer.running_mean.clone(),
        layer.running_var.clone(),
        layer.num_batches_tracked.clone(),
    )
    lam = layer.ratios(x)
    assert lam.shape == (6, 3)
    torch.testing.assert_close(lam.sum(1), torch.ones(6))
    assert (lam - lam[:1]).abs().amax() > 1e-5, "ratios must differ across samples"
    torch.testing.assert_close(layer.running_mean, before[0], rtol=0, atol=0)
    torch.testing.assert_close(layer.running_var, before[1], rtol=0, atol=0)
    assert layer.num_batches_tracked == before[2]
    for mode in (True, False):
        layer.train(mode)
        lam = layer.ratios(x).detach()
        y_from_lam, _ = en_reference(layer, x, lam=lam)
        torch.testing.assert_close(layer(x).double(), y_from_lam, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("momentum", [0.1, 0.5, None])
def test_running_stats_equal_batchnorm(momentum: float | None) -> None:
    layer = ExemplarNorm2d(16, momentum=momentum)
    bn = nn.BatchNorm2d(16, momentum=momentum)
    for step in range(5):
        x = batch(n=4 + step, c=16, shift=step)
        layer(x)
        bn(x)
    torch.testing.assert_close(layer.running_mean, bn.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.running_var, bn.running_var, rtol=1e-5, atol=1e-6)
    assert layer.num_batches_tracked == bn.num_batches_tracked


def test_bn_only_with_unit_ratio_is_batchnorm() -> None:
    layer = ExemplarNorm2d(16, normalizers=("bn",))
    bn = nn.BatchNorm2d(16)
    with torch.no_grad():
        bn.weight.normal_()
        bn.bias.normal_()
        layer.weight.copy_(bn.weight.unsqueeze(0))
        layer.bias.copy_(bn.bias.unsqueeze(0))
    x = batch(c=16)
    torch.testing.assert_close(layer(x), bn(x), rtol=1e-5, atol=1e-5)
    layer.eval()
    bn.eval()
    torch.testing.assert_close(layer(x), bn(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize(
    "config",
    [
        "bn-in-ln",
        "gn-ln",
        # the other settings change one term each; the fast tier keeps the two above
        *(
            pytest.param(c, marks=pytest.mark.slow)
            for c in ("with-gn", "no-conv", "shared-affine", "relu")
        ),
    ],
)
def test_gradcheck_reaches_every_parameter(config: str, mode: str, en_backend: str) -> None:
    """The hand-written backwards (the C++ kernel's and the tensor ops') against finite
    differences."""
    kwargs = dict(CONFIGS[config])
    kwargs.setdefault("num_features", 8)
    kwargs["num_groups"] = 2 if "num_groups" in kwargs else 32
    layer = make_layer(reduction=2, **kwargs).double()
    layer(batch(n=3, c=8, hw=3).double())  # running statistics that are not 0 and 1
    # each training forward moves the centred branch's centre (keeping the function at the
    # parameters it ran with); the gradient is checked at a fixed centre
    layer.ratio.track_hidden = lambda hidden: None
    layer.train(mode == "train")
    names = [n for n, _ in layer.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for _, p in layer.named_parameters())
    x = batch(n=3, c=8, hw=3).double().requires_grad_()

    def fn(x: torch.Tensor, *ps: torch.Tensor) -> torch.Tensor:
        return functional_call(layer, dict(zip(names, ps)), (x,))

    assert torch.autograd.gradcheck(fn, (x, *params), eps=1e-6, atol=1e-5)
    out = fn(x, *params)
    grads = torch.autograd.grad((out * torch.randn_like(out)).sum(), params)
    for name, g in zip(names, grads):
        assert g.abs().sum() > 0, f"no gradient reaches {name}"


@pytest.mark.parametrize("shape", [(1, 16, 1, 1), (1, 16, 4, 4), (5, 16, 1, 1)])
@pytest.mark.parametrize("normalizers", [("bn", "in", "ln"), ("bn", "in", "ln", "gn")])
def test_batch_of_one_and_1x1_maps_are_finite(shape: tuple[int, ...], normalizers) -> None:
    layer = ExemplarNorm2d(16, normalizers=normalizers, num_groups=4)
    x = torch.randn(shape, requires_grad=True)
    y = layer(x)
    (y * torch.randn_like(y)).sum().backward()
    assert torch.isfinite(y).all()
    assert torch.isfinite(x.grad).all()
    for name, p in layer.named_parameters():
        assert torch.isfinite(p.grad).all(), name
    assert torch.isfinite(layer.running_var).all()
    layer.eval()
    assert torch.isfinite(layer(x)).all()


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("config", ["bn-in-ln", "with-gn"])
def test_large_mean_over_std_stays_accurate(config: str, mode: str) -> None:
    layer = make_layer(momentum=None, **CONFIGS[config])
    for _ in range(3):
        layer(batch(shift=1e3))
    layer.train(mode == "train")
    x = batch(shift=1e3)  # |mean| / std ~ 1e3
    expected, _ = en_reference(layer, x)
    y = layer(x).double()
    rel = (y - expected).abs().max() / expected.abs().max()
    assert rel < 1e-3, f"relative error {rel:.2e}"


def test_state_dict_round_trip() -> None:
    layer = make_layer(normalizers=("bn", "in", "ln", "gn"), num_groups=8)
    layer(batch())
    clone = ExemplarNorm2d(32, reduction=4, normalizers=("bn", "in", "ln", "gn"), num_groups=8)
    clone.load_state_dict(layer.state_dict(), strict=True)
    layer.eval()
    clone.eval()
    x = batch()
    torch.testing.assert_close(clone(x), layer(x), rtol=0, atol=0)
    keys = set(layer.state_dict())
    assert {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"} <= keys


def test_logit_scale_is_state() -> None:
    """The scale changes the function, so the state dict carries it (safetensors too)."""
    layer = make_layer()
    with torch.no_grad():
        layer.ratio.fc2.weight.normal_()  # ratios that depend on the input, so s matters
    layer.ratio.logit_scale = 0.37
    layer.eval()
    state = layer.state_dict()
    assert float(state["ratio._extra_state"]) == 0.37
    other = ExemplarNorm2d(32, reduction=4).eval()  # built with the default s
    other.load_state_dict(state, strict=True)
    assert other.logit_scale == 0.37
    x = batch()
    torch.testing.assert_close(other(x), layer(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="logit_scale must be positive"):
        other.ratio.set_extra_state(torch.tensor(0.0))


def test_a_version_1_state_dict_loads_as_the_same_function() -> None:
    """Version 1 did not save s: its layers used the one they were built with, and a plain
    ``load_state_dict`` of such a dict (torch's metadata says version 1, or none at all, as
    in a safetensors file) keeps it, strictly."""
    old = ExemplarNorm2d(32, reduction=4, logit_scale=0.5)
    with torch.no_grad():
        old.ratio.fc2.weight.normal_()
    old.eval()
    state = old.state_dict()
    del state["ratio._extra_state"]
    state._metadata[""]["version"] = 1
    plain = dict(state)  # no metadata
    for old_state in (state, plain):
        new = ExemplarNorm2d(32, reduction=4, logit_scale=0.5).eval()
        new.load_state_dict(old_state, strict=True)
        x = batch()
        torch.testing.assert_close(new(x), old(x), rtol=0, atol=0)
    current = old.state_dict()
    del current["ratio._extra_state"]
    with pytest.raises(RuntimeError, match="_extra_state"):  # version 2 must carry it
        ExemplarNorm2d(32, reduction=4).load_state_dict(current, strict=True)


def test_module_contract() -> None:
    layer = ExemplarNorm2d(64)
    assert layer.normalizers == ("bn", "in", "ln")
    assert layer.weight.shape == (3, 64) and layer.bias.shape == (3, 64)
    assert layer.running_mean.shape == (64,) and layer.running_var.shape == (64,)
    shared = ExemplarNorm2d(64, shared_affine=True)
    assert shared.weight.shape == (1, 64)
    text = repr(layer)
    for part in ("64", "('bn', 'in', 'ln')", "reduction=16", "pi=50"):
        assert part in text
    with pytest.raises(ValueError, match="unknown normalizer"):
        ExemplarNorm2d(64, normalizers=("bn", "xx"))
    with pytest.raises(ValueError, match="activation"):
        ExemplarNorm2d(64, activation="gelu")
    with pytest.raises(ValueError, match="must divide"):
        ExemplarNorm2d(30, normalizers=("gn",), num_groups=4)
    with pytest.raises(ValueError, match="4D"):
        layer(torch.randn(2, 64))


def test_parameter_count_matches_docstring_formula() -> None:
    c, k, pi = 64, 3, 50
    layer = ExemplarNorm2d(c, pi=pi, reduction=16)
    formula = 2 * k * c + c + (k * k * pi * k + pi * k) + (pi * k * k + k)
    assert formula == 2401
    assert sum(p.numel() for p in layer.parameters()) == formula
    no_conv = ExemplarNorm2d(c, pi=pi, use_conv=False)
    assert sum(p.numel() for p in no_conv.parameters()) == formula - c
    shared = ExemplarNorm2d(c, pi=pi, shared_affine=True)
    assert sum(p.numel() for p in shared.parameters()) == formula - 2 * (k - 1) * c


@pytest.mark.parametrize(
    "num_features, reduction, groups",
    [(64, 16, 4), (30, 16, 1), (96, 16, 6), (40, 16, 2), (1, 16, 1)],
)
def test_odd_widths_pick_a_dividing_group_count(
    num_features: int, reduction: int, groups: int
) -> None:
    layer = ExemplarNorm2d(num_features, reduction=reduction)
    assert layer.ratio.groups == groups
    assert torch.isfinite(layer(torch.randn(2, num_features, 3, 3))).all()


def test_bf16_autocast_forward_is_finite() -> None:
    layer = ExemplarNorm2d(32, reduction=4)
    x = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x.bfloat16())
    assert y.dtype == torch.bfloat16
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.float(), layer(x), rtol=0.05, atol=0.05)


def _small_net(norm: nn.Module) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        norm,
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 5),
    )


@pytest.mark.slow
@pytest.mark.parametrize("layer", ["en", "sn"])
def test_torch_compile_matches_eager(layer: str) -> None:
    """Forward in both modes and a train step's gradients, compiled and eager."""
    from enorm_cli.layers import SwitchableNorm2d

    torch.manual_seed(0)
    net = _small_net(ExemplarNorm2d(16, reduction=4) if layer == "en" else SwitchableNorm2d(16))
    x = torch.randn(4, 3, 8, 8)
    try:
        compiled = torch.compile(net)
        net.eval()
        got = compiled(x)
    except Exception as exc:  # no C++ toolchain for inductor, for one
        pytest.skip(f"torch.compile unavailable here: {type(exc).__name__}: {exc}".splitlines()[0])
    torch.testing.assert_close(got, net(x), rtol=1e-4, atol=1e-5)
    net.train()
    grads = []
    for run in (compiled, net):
        net.zero_grad()
        out = run(x)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads.append([p.grad.clone() for p in net.parameters()])
    for g_compiled, g_eager in zip(*grads):
        torch.testing.assert_close(g_compiled, g_eager, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_fast_path_equals_autograd_path(config: str, mode: str, en_backend: str) -> None:
    """The one-node forward/backward, through the C++ kernel and through tensor ops, equals
    autograd of the same math."""
    from enorm_cli.layers import fused_en

    def plain_forward(t: torch.Tensor) -> torch.Tensor:
        with fused_en(False):
            return plain(t)

    fast = make_layer(**CONFIGS[config])
    plain = make_layer(**CONFIGS[config])
    plain.load_state_dict(fast.state_dict())
    c = fast.num_features
    for layer in (fast, plain):
        layer.train(mode == "train")
    x = batch(c=c)
    outputs = []
    for layer, run in ((fast, fast.forward), (plain, plain_forward)):
        xi = x.clone().requires_grad_()
        y = run(xi)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        outputs.append(
            (y, xi.grad, [p.grad for p in layer.parameters()], layer.running_mean.clone())
        )
    (y1, gx1, gp1, rm1), (y2, gx2, gp2, rm2) = outputs
    torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx1, gx2, rtol=1e-4, atol=1e-5)
    for g1, g2 in zip(
        gp1, gp2
    ):  # float32 sums in a different order: tolerance scaled to the gradient
        torch.testing.assert_close(g1, g2, rtol=1e-3, atol=1e-4 * float(g2.abs().max()))
    torch.testing.assert_close(rm1, rm2)


def test_renorm_trains_on_the_eval_function_and_records_batch_statistics() -> None:
    """bn_stats=renorm: at batch 4 on 1x1 maps (MobileNetV2's last layers at 32 px) the
    training output of the bn member is the eval output (the running statistics), not the
    batch's 4 values pushed to mean 0 and variance 1; the running statistics still record
    the batch's, as BatchNorm's do."""
    layer, plain = ExemplarNorm2d(16, normalizers=("bn",)), ExemplarNorm2d(16, normalizers=("bn",))
    warm = batch(n=64, c=16, hw=1)
    for lay in (layer, plain):
        lay(warm)
    x = batch(n=4, c=16, hw=1)
    # Channels whose 4-sample variance is over 3x off the running one are clipped (r_max 3)
    stats = instance_stats(x)
    _, _, rd = renormalized_stats(
        *batch_stats(stats.mean, stats.var), plain.running_mean, plain.running_var, layer.eps
    )
    layer.renorm = True
    y_eval = layer.eval()(x)
    y_train = layer.train()(x)
    y_batch = plain(x)
    inside = (rd[0] > 1 / 3) & (rd[0] < 3) & (rd[1].abs() < 5)
    assert inside.sum() >= 12
    torch.testing.assert_close(y_train[:, inside], y_eval[:, inside], rtol=1e-4, atol=1e-4)
    assert (y_batch - y_eval).abs().amax() > 0.3
    torch.testing.assert_close(layer.running_mean, plain.running_mean)
    torch.testing.assert_close(layer.running_var, plain.running_var)


@pytest.mark.parametrize("fused", [True, False])
def test_renorm_frozen_trains_on_the_source_function_where_the_clips_would_bite(
    fused: bool,
) -> None:
    """bn_stats=renorm_frozen at batch 4 on 1 x 1 maps, 4 values per channel whose spread is a
    fifth of the source's (as on MobileNetV2's last layers, where up to 84% of the channels are
    beyond Ioffe's r_max = 3): training computes the eval (source) function in every channel,
    unclipped, and leaves the running statistics as they are."""
    from enorm_cli.layers import fused_en

    torch.manual_seed(0)
    layer = frozen_layer(normalizers=("bn", "ln"), gains=True)
    x = torch.randn(4, 16, 1, 1).requires_grad_()
    stats = instance_stats(x.detach())
    _, var = batch_stats(stats.mean, stats.var)
    assert (((var + layer.eps) / (25.0 + layer.eps)).sqrt() < 1 / 3).float().mean() > 0.6
    with fused_en(fused):
        y_eval = layer.eval()(x).detach()
        y = layer.train()(x)
        g = torch.linspace(-1, 1, y.numel()).view_as(y)
        (y * g).sum().backward()
    torch.testing.assert_close(y.detach(), y_eval, rtol=1e-5, atol=1e-5)
    assert (layer.running_var == 25.0).all()  # frozen: never updated


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("n", [2, 4])
def test_renorm_frozen_backward_is_batchnorms_at_the_source_scale(
    fused: bool, n: int, en_backend: str
) -> None:
    """The bn member's input gradient in renorm_frozen on 1 x 1 maps (n values per channel):
    BatchNorm's projection at the source's scale, with the batch statistics' part scaled by
    w = 1 - ``frozen_gradient_share`` at n values: ``gamma / sigma_run (g - w (mean g + xhat
    mean(g xhat)))`` with the batch's xhat. At 2 values w = 1 - ``FROZEN_GRADIENT_SHARE``,
    where w = 1 would leave nothing (the projection of 2 values); at 4, BatchNorm's own. Once
    the guard has tripped, BatchNorm's gradient whole (w = 1, the batch's scale)."""
    from enorm_cli.layers import fused_en

    torch.manual_seed(0)
    x = torch.randn(n, 16, 1, 1)
    g = torch.linspace(-1, 1, x.numel()).view_as(x)
    stats = instance_stats(x)
    mean, var = batch_stats(stats.mean, stats.var)
    xhat = (x - mean.view(1, -1, 1, 1)) / (var.view(1, -1, 1, 1) + 1e-5).sqrt()
    projected = g.mean(0, keepdim=True) + xhat * (g * xhat).mean(0, keepdim=True)
    w = 1 - frozen_gradient_share(n, 1, synced=False)
    assert w == (1 - FROZEN_GRADIENT_SHARE if n == 2 else 1.0)
    for stale in (False, True):
        layer = frozen_layer(normalizers=("bn",), gains=True)
        if stale:
            layer.frozen_state.fill_(FROZEN_STALE)
        xb = x.clone().requires_grad_()
        with fused_en(fused):
            (layer.train()(xb) * g).sum().backward()
        gamma = layer.weight[0].view(1, -1, 1, 1)
        if stale:
            sigma = (var.view(1, -1, 1, 1) + layer.eps).sqrt()
            expected = gamma / sigma * (g - projected)
        else:
            expected = gamma / (25.0 + layer.eps) ** 0.5 * (g - w * projected)
        # atol: at 2 values BatchNorm's gradient is float noise around 0 (stale)
        torch.testing.assert_close(xb.grad, expected, rtol=1e-4, atol=5e-5)
    if n == 2:  # the batch's part leaves (almost: eps) nothing; the share keeps a gradient
        assert (g - projected).abs().mean() < 0.01 * g.abs().mean()


@pytest.mark.parametrize("fused", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_renorm_gradcheck(fused: bool, en_backend: str) -> None:
    """Gradients of the renormalized bn member, both paths, against finite differences (every
    r and d at its clip, where they are constants, so finite differences see what autograd
    treats as constant)."""
    from enorm_cli.layers import fused_en

    layer = make_layer(num_features=8, reduction=2).double()
    with torch.no_grad():
        layer.running_mean.add_(1e4)
        layer.running_var.mul_(1e4)
    layer.renorm = True
    names = [n for n, _ in layer.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for _, p in layer.named_parameters())
    x = batch(n=3, c=8, hw=3).double().requires_grad_()
    running = layer.running_mean.clone(), layer.running_var.clone()

    def fn(x: torch.Tensor, *ps: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():  # each call from the same running statistics
            layer.running_mean.copy_(running[0])
            layer.running_var.copy_(running[1])
        return functional_call(layer, dict(zip(names, ps)), (x,))

    with fused_en(fused):
        assert torch.autograd.gradcheck(fn, (x, *params), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("frozen", [False, True])
def test_renorm_fast_path_equals_autograd_path(frozen: bool, en_backend: str) -> None:
    """Inside the clips too (r, d vary with the batch), and unclipped against frozen
    statistics at 2 values per channel (batch 2, 1 x 1 maps), where the backward blends in
    the frozen statistics' gradient: the one-node backward equals autograd."""
    from enorm_cli.layers import fused_en

    fast, plain = make_layer(), make_layer()
    fast(batch(shift=0.5))
    plain.load_state_dict(fast.state_dict())
    x = batch(n=2, hw=1) if frozen else batch()
    results = []
    for layer, fused in ((fast, True), (plain, False)):
        layer.renorm, layer.frozen_stats = True, frozen
        xi = x.clone().requires_grad_()
        with fused_en(fused):
            y = layer(xi)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        results.append((y, xi.grad, [p.grad for p in layer.parameters()], layer.running_var))
    # 1 x 1 maps: in's variance is 0, so its A and B are 1/sqrt(eps) = 316 times larger and
    # cancel in A x + B; the paths round that differently (the gammas' gradients too, with
    # a mixing offset that weights in by up to 1)
    assert_paths_agree(results, tol=1e-4 if frozen else 1e-5)


def test_centered_branch_follows_the_mean_of_h_and_keeps_the_function() -> None:
    """The first training batch sets the centre to its mean of h; each later one moves it and
    the bias shift with it, so the layer computes the same function however many forwards
    ran (the next gradient of FC2's weight is what changes)."""
    torch.manual_seed(0)
    layer = make_layer()
    x = batch()
    assert layer.centered and not layer.ratio.hidden_ready
    first = layer(x)
    saved = layer._math(instance_stats(x))[3]
    torch.testing.assert_close(layer.ratio.hidden_mean, saved[5].mean(0))
    centre = layer.ratio.hidden_mean.clone()
    other = batch(shift=3.0)
    layer(other)  # moves the centre towards another batch's mean
    assert not torch.allclose(layer.ratio.hidden_mean, centre)
    torch.testing.assert_close(layer(x), first, rtol=1e-5, atol=1e-5)
    layer.eval()
    with torch.no_grad():
        before = layer.ratio.hidden_mean.clone()
        layer(other)
    assert torch.equal(layer.ratio.hidden_mean, before)  # inference leaves it


def test_frozen_statistics_training_centres_the_branch_too() -> None:
    """``bn_stats: running`` trains with the layers in eval mode: the centre follows there too,
    or FC2's fast per-sample rate would act on uncentered h."""
    layer = make_layer().eval()
    x = batch()
    y = layer(x)
    assert layer.ratio.hidden_ready
    y.sum().backward()
    assert layer.ratio.fc2.weight.grad is not None


def test_an_uncentered_state_loads_as_the_function_it_was() -> None:
    """A state dict from before the centered branch (no ``ratio.hidden_mean``) makes the layer
    uncentered: the same output, no per-sample group."""
    torch.manual_seed(0)
    old = make_layer(centered=False)
    with torch.no_grad():
        old.ratio.fc2.weight.normal_()
    old.eval()
    new = make_layer()
    new.load_state_dict(old.state_dict())
    new.eval()
    x = batch()
    assert not new.centered and not new.sample_parameters()
    torch.testing.assert_close(new(x), old(x))


def test_a_state_from_before_the_anchored_start_loads_as_the_function_it_was() -> None:
    """A state dict without ``mix_offset`` mixed with the ratios alone: it loads with offset 0
    and the layer counts as not anchored (its gain stays in the source row)."""
    old = make_layer(anchored=False)
    with torch.no_grad():
        old.mix_offset.zero_()
    state = {k: v for k, v in old.state_dict().items() if k != "mix_offset"}
    new = make_layer()
    assert new.mix_offset.any()
    new.load_state_dict(state)
    assert not new.anchored and not new.mix_offset.any()
    x = batch()
    torch.testing.assert_close(new.eval()(x), old.eval()(x))
