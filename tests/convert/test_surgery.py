"""Surgery on real timm and torchvision models: same function in eval, trainable in train."""

from __future__ import annotations

import copy
import math

import pytest
import timm
import torch
import torchvision
from helpers import max_relative_delta, randomize_norms
from timm.layers import GroupNorm1Act
from torch import nn

from enorm_cli.config.settings import ENSettings
from enorm_cli.convert.surgery import replace_norms
from enorm_cli.layers import ExemplarNorm2d, ExemplarNormAct2d, SwitchableNormAct2d

TINY = ["test_resnet", "test_efficientnet", "test_efficientnet_gn", "test_byobnet"]
FULL = ["resnet50", "efficientnet_b0", "resnet50_gn"]  # BatchNorm2d, BatchNormAct2d, GroupNorm


def convert_and_compare(
    model: nn.Module, settings: ENSettings, size: int, n: int = 4
) -> tuple[nn.Module, float]:
    source = randomize_norms(model).eval()
    converted = copy.deepcopy(source)
    report = replace_norms(converted, settings)
    assert report.converted, "nothing converted"
    x = torch.randn(n, 3, size, size)
    with torch.no_grad():
        delta = max_relative_delta(source(x), converted.eval()(x))
    return converted, delta


@pytest.mark.parametrize("name", TINY)
def test_tiny_timm_models_keep_their_function(name: str) -> None:
    converted, delta = convert_and_compare(timm.create_model(name), ENSettings(), 64)
    assert delta < 1e-4
    assert not any(
        type(m) in (nn.BatchNorm2d, nn.GroupNorm)
        or "BatchNormAct" in type(m).__name__
        or "GroupNormAct" in type(m).__name__
        for m in converted.modules()
    )


@pytest.mark.slow
@pytest.mark.parametrize("name", FULL)
def test_full_size_models_keep_their_function(name: str) -> None:
    _, delta = convert_and_compare(timm.create_model(name), ENSettings(), 160, n=2)
    assert delta < 1e-4


def test_torchvision_frozen_batchnorm_and_syncbn() -> None:
    frozen = torchvision.models.resnet18(
        norm_layer=torchvision.ops.FrozenBatchNorm2d, num_classes=10
    )
    _, delta = convert_and_compare(frozen, ENSettings(), 64)
    assert delta < 1e-4
    sync = nn.SyncBatchNorm.convert_sync_batchnorm(timm.create_model("test_resnet"))
    _, delta = convert_and_compare(sync, ENSettings(), 64)
    assert delta < 1e-4


def test_group_norm_variants_pick_their_normalizer() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3),
        nn.GroupNorm(4, 16),  # gn
        nn.Conv2d(16, 16, 3),
        GroupNorm1Act(16),  # ln, act kept
        nn.Conv2d(16, 8, 3),
        nn.GroupNorm(8, 8),  # in
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 3),
    )
    converted, delta = convert_and_compare(model, ENSettings(normalizers=("bn",)), 16)
    assert delta < 1e-4
    assert converted[1].normalizers == ("bn", "gn") and converted[1].num_groups == 4
    assert converted[3].normalizers == ("bn", "ln") and isinstance(converted[3], ExemplarNormAct2d)
    assert isinstance(converted[3].act, nn.ReLU)
    assert converted[5].normalizers == ("bn", "in")


def test_batchnorm_act_keeps_activation_and_ratio_prior() -> None:
    model = timm.create_model("test_efficientnet")
    settings = ENSettings(margin=1.5)
    report = replace_norms(model, settings)
    layer = model.get_submodule(report.converted[0].name)
    assert isinstance(layer, ExemplarNormAct2d) and not isinstance(layer.act, nn.Identity)
    lam = layer.ratios(torch.randn(2, layer.num_features, 8, 8))
    expected = torch.exp(torch.tensor(1.5)) / (torch.exp(torch.tensor(1.5)) + 2)
    torch.testing.assert_close(lam[:, 0], expected.expand(2))


def test_train_mode_reaches_every_en_parameter() -> None:
    model = randomize_norms(timm.create_model("test_efficientnet", num_classes=5))
    replace_norms(model, ENSettings())
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 2, 3])
    en_params = {
        f"{mod_name}.{name}": p
        for mod_name, mod in model.named_modules()
        if isinstance(mod, ExemplarNorm2d)
        for name, p in mod.named_parameters()
        if not name.startswith(("act.", "drop."))
    }
    assert en_params
    at_once = ("weight", "bias", "ratio.fc2.weight", "ratio.fc2.bias")
    for step in range(2):  # fc2 starts at zero: conv and fc1 learn from the second step on
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        if step == 0:
            for name, p in en_params.items():
                if name.endswith(tuple("." + a for a in at_once)) and (
                    ".ratio." not in name or "fc2" in name
                ):
                    assert p.grad is not None and p.grad.abs().sum() > 0, name
            opt.step()
    missing = [n for n, p in en_params.items() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing, f"no gradient reaches {missing[:5]}"


def test_include_exclude_and_skipped_layers() -> None:
    model = timm.create_model("test_resnet")
    report = replace_norms(model, ENSettings(include=r"^layer1\.", exclude=r"downsample"))
    assert report.converted and all(c.name.startswith("layer1.") for c in report.converted)
    assert all("downsample" not in c.name for c in report.converted)
    reasons = {reason for _, _, reason in report.skipped}
    assert reasons == {"not selected by include/exclude"}
    convnext = timm.create_model("test_convnext")
    report = replace_norms(convnext, ENSettings())
    assert not report.converted
    assert {t for _, t, _ in report.skipped} >= {"LayerNorm2d", "LayerNorm"}


def test_shared_module_is_converted_once_and_stays_shared() -> None:
    bn = nn.BatchNorm2d(4)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), bn, nn.Conv2d(4, 4, 1), bn)
    report = replace_norms(model, ENSettings())
    assert len(report.converted) == 2
    assert model[1] is model[3] and isinstance(model[1], ExemplarNorm2d)


@pytest.mark.parametrize(
    "settings",
    [ENSettings(layer="sn"), ENSettings(shared_affine=True, anchored=False)],
    ids=["sn", "shared"],
)
def test_sn_and_shared_affine_start_near_the_source(settings: ENSettings) -> None:
    """Not exact by design (mixed statistics), but the source normalizer dominates and all is
    finite."""
    from enorm_cli.layers import SwitchableNorm2d

    converted, delta = convert_and_compare(timm.create_model("test_efficientnet"), settings, 64)
    assert 0 < delta < 10 and math.isfinite(delta)
    layers = [m for m in converted.modules() if isinstance(m, (SwitchableNorm2d, ExemplarNorm2d))]
    assert layers and all(
        isinstance(m, SwitchableNorm2d) == (settings.layer == "sn") for m in layers
    )
    assert any(isinstance(m, (SwitchableNormAct2d, ExemplarNormAct2d)) for m in layers)
    lam = layers[0].ratios(torch.randn(2, layers[0].num_features, 4, 4))
    torch.testing.assert_close(lam[:, 0], torch.full((2,), math.exp(2) / (math.exp(2) + 2)))
    assert settings.exact is False and ENSettings().exact is True
