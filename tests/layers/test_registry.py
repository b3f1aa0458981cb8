"""Mixed layers by name, and the interface every one of them has (``MixedNorm2d``)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from enorm_cli.layers import (
    NORM_LAYERS,
    ExemplarNorm2d,
    ExemplarNormAct2d,
    MixedNorm2d,
    SourceNorm,
    SwitchableNorm2d,
    SwitchableNormAct2d,
    check_norm_layer,
    get_norm_layer,
)


def test_layers_by_name_and_their_norm_act_variants() -> None:
    assert NORM_LAYERS == ("en", "sn")
    assert (
        get_norm_layer("en") is ExemplarNorm2d
        and get_norm_layer("en", act=True) is ExemplarNormAct2d
    )
    assert (
        get_norm_layer("sn") is SwitchableNorm2d
        and get_norm_layer("sn", act=True) is SwitchableNormAct2d
    )
    assert all(get_norm_layer(name).kind == name for name in NORM_LAYERS)
    with pytest.raises(ValueError, match="one of en, sn"):
        get_norm_layer("gn")
    with pytest.raises(ValueError, match="'bn'"):
        check_norm_layer("bn")


def _source(
    normalizer: str = "bn", dtype: torch.dtype = torch.float32, act: bool = False
) -> SourceNorm:
    g = torch.Generator().manual_seed(0)
    c = 16
    return SourceNorm(
        normalizer,
        c,
        1e-5,
        torch.rand(c, generator=g, dtype=dtype) + 0.5,
        torch.randn(c, generator=g, dtype=dtype),
        running_mean=torch.randn(c, generator=g, dtype=dtype),
        running_var=torch.rand(c, generator=g, dtype=dtype) + 0.5,
        num_groups=4,
        act=nn.ReLU() if act else None,
    )


@pytest.mark.parametrize("name", NORM_LAYERS)
def test_from_source_keeps_dtype_running_stats_and_the_tail(name: str) -> None:
    src = _source(dtype=torch.float64, act=True)
    layer = get_norm_layer(name, act=True).from_source(src, ("in", "ln"), margin=2.0)
    assert layer.normalizers == ("in", "ln", "bn")  # the source's normalizer joins the set
    assert all(p.dtype == torch.float64 for p in layer.parameters())
    assert layer.num_batches_tracked.dtype == torch.long
    assert torch.equal(layer.running_mean, src.running_mean) and isinstance(layer.act, nn.ReLU)


def test_en_from_source_is_the_source_function() -> None:
    src = _source()
    layer = ExemplarNorm2d.from_source(src, ("bn", "in", "ln"), margin=2.0).eval()
    bn = nn.BatchNorm2d(16).eval()
    with torch.no_grad():
        bn.weight.copy_(src.weight)
        bn.bias.copy_(src.bias)
        bn.running_mean.copy_(src.running_mean)
        bn.running_var.copy_(src.running_var)
    x = torch.randn(4, 16, 5, 5)
    torch.testing.assert_close(layer(x), bn(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", NORM_LAYERS)
def test_prior_ratio_logits_read_from_tensors_are_the_ratios_forward_uses(name: str) -> None:
    layer = get_norm_layer(name).from_source(_source(), ("bn", "in", "ln"), margin=1.5).eval()
    state = layer.state_dict()
    logits, exact = type(layer).prior_ratio_logits(state.__getitem__)
    assert exact
    lam = layer.ratios(torch.randn(3, 16, 4, 4))
    torch.testing.assert_close(lam, torch.softmax(logits, 0).expand(3, -1))
    assert lam[0, 0].item() == pytest.approx(math.exp(1.5) / (math.exp(1.5) + 2), rel=1e-6)
    if name == "en":  # once FC2's weight moves, the bias alone is no longer the answer
        with torch.no_grad():
            layer.ratio.fc2.weight.add_(0.1)
        assert not type(layer).prior_ratio_logits(layer.state_dict().__getitem__)[1]


@pytest.mark.parametrize("name", NORM_LAYERS)
def test_ratio_sample_hidden_and_affine_parameters_cover_the_layer(name: str) -> None:
    layer: MixedNorm2d = get_norm_layer(name)(16)
    groups = [
        layer.ratio_parameters(),
        layer.sample_parameters(),
        layer.hidden_parameters(),
        layer.affine_parameters(),
    ]
    ids = [{id(p) for p in group} for group in groups]
    assert sum(len(i) for i in ids) == len(set().union(*ids))  # disjoint
    assert set().union(*ids) == {id(p) for p in layer.parameters()}


@pytest.mark.parametrize("name", NORM_LAYERS)
def test_device_dtype_and_reset_parameters(name: str) -> None:
    cls = get_norm_layer(name)
    meta = cls(16, device="meta", dtype=torch.float64)
    assert all(t.device.type == "meta" for t in [*meta.parameters(), *meta.buffers()])
    assert all(p.dtype == torch.float64 for p in meta.parameters())
    torch.manual_seed(3)
    fresh = cls(16)
    layer = cls(16)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(1.0)
    layer.running_mean.add_(1.0)
    layer.num_batches_tracked.add_(5)
    torch.manual_seed(3)
    layer.reset_parameters()
    for (key, a), b in zip(layer.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), key


@pytest.mark.parametrize("shared", [False, True], ids=["per-normalizer", "shared-affine"])
def test_anchored_start_is_exact_and_every_normalizer_carries_the_source_gain(
    shared: bool,
) -> None:
    """Anchored: every gamma row is the source's and the mixing weights lambda + o are
    one-hot on the source, so even one shared affine pair starts exact."""
    src = _source()
    layer = ExemplarNorm2d.from_source(
        src, ("bn", "in", "ln"), margin=2.0, shared_affine=shared, anchored=True
    )
    assert layer.anchored is True
    assert torch.equal(layer.weight, src.gamma().expand_as(layer.weight))
    prior = torch.softmax(torch.tensor([2.0, 0.0, 0.0]), 0)
    torch.testing.assert_close(layer.mix_offset, torch.tensor([1.0, 0.0, 0.0]) - prior)
    assert layer.source_gain_share() == 1.0
    bn = nn.BatchNorm2d(16).eval()
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(bn, name).copy_(getattr(src, name))
    x = torch.randn(4, 16, 5, 5)
    torch.testing.assert_close(layer.eval()(x), bn(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("anchored", [True, False])
def test_only_the_anchored_start_lets_the_ratios_tell_in_from_ln(anchored: bool) -> None:
    """The paper-style start sets IN's and LN's gammas to 0: both output beta, so the loss
    pulls their ratios alike, whatever the input. Anchored, each outputs its own normalized
    feature from the first step, and the two ratios' gradients differ."""
    torch.manual_seed(0)
    layer = ExemplarNorm2d.from_source(_source(), ("bn", "in", "ln"), 2.0, anchored=anchored)
    x = torch.randn(6, 16, 5, 5) * torch.rand(6, 1, 1, 1).add(0.5) + torch.randn(6, 16, 1, 1)
    (layer(x) * torch.randn(6, 16, 5, 5)).sum().backward()
    g_in, g_ln = layer.ratio.fc2.bias.grad[1:]
    assert torch.isclose(g_in, g_ln, rtol=1e-4, atol=1e-6) != anchored


def test_auto_anchors_untrained_sources_only() -> None:
    """``anchored="auto"`` (the default): a source at its initial values (a model built for
    training from scratch) has no trained function to keep and starts anchored; a trained one
    starts paper-style, its features in place. GroupNorm, without running statistics, is judged
    by its affine."""
    trained = ExemplarNorm2d.from_source(_source(), ("bn", "in", "ln"), 2.0)
    assert trained.anchored is False and not trained.mix_offset.any()
    fresh_bn = nn.BatchNorm2d(16)
    fresh = ExemplarNorm2d.from_source(
        SourceNorm(
            "bn",
            16,
            1e-5,
            fresh_bn.weight,
            fresh_bn.bias,
            0.1,
            fresh_bn.running_mean,
            fresh_bn.running_var,
        ),
        ("bn", "in", "ln"),
        2.0,
    )
    assert fresh.anchored is True and fresh.mix_offset.any()
    for gamma, beta, untrained in ((1.0, 0.0, True), (0.0, 0.0, True), (1.0, 0.5, False)):
        src = SourceNorm("gn", 16, 1e-5, torch.full((16,), gamma), torch.full((16,), beta))
        assert src.untrained is untrained
    with pytest.raises(ValueError, match="true, false or auto"):
        ExemplarNorm2d(16, anchored="maybe")
