"""The public Python API (``enorm_cli.__init__``): lazy, one call per job, torch's and timm's
conventions."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from torch import nn

import enorm_cli
from enorm_cli.errors import EnormError

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # two fresh interpreters
def test_import_is_lazy_and_the_done_when_command_runs() -> None:
    """``import enorm_cli`` loads no torch; the README's one-liner converts a torchvision model
    in a fresh process."""
    lazy = "import sys, enorm_cli; assert 'torch' not in sys.modules, 'torch imported'"
    one_liner = (
        "import torchvision, enorm_cli; m = enorm_cli.convert_model(torchvision.models.resnet18())"
        "; assert any(isinstance(x, enorm_cli.ExemplarNorm2d) for x in m.modules())"
    )
    for code in (lazy, one_liner):
        done = subprocess.run(
            [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stderr


def test_every_public_name_resolves() -> None:
    for name in enorm_cli.__all__:
        assert getattr(enorm_cli, name) is not None, name
    assert set(enorm_cli.__all__) <= set(dir(enorm_cli))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        enorm_cli.nope  # noqa: B018


def test_convert_model_in_place_with_verification() -> None:
    model = timm.create_model("test_resnet", pretrained=False).train()
    out = enorm_cli.convert_model(model, verify=True, example_inputs=torch.randn(2, 3, 64, 64))
    assert out is model and model.training  # in place, mode kept
    layers = [m for m in model.modules() if isinstance(m, enorm_cli.MixedNorm2d)]
    assert layers and not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert {m.margin for m in layers} == {2.0}


def test_convert_model_takes_settings_as_keywords_or_an_object() -> None:
    sn = enorm_cli.convert_model(timm.create_model("test_resnet"), layer="sn", margin=1.0)
    assert all(
        isinstance(m, enorm_cli.SwitchableNorm2d)
        for m in sn.modules()
        if isinstance(m, enorm_cli.MixedNorm2d)
    )
    settings = enorm_cli.ENSettings(normalizers=("bn", "ln"))
    en = enorm_cli.convert_model(timm.create_model("test_resnet"), settings)
    assert {m.normalizers for m in en.modules() if isinstance(m, enorm_cli.MixedNorm2d)} == {
        ("bn", "ln")
    }
    with pytest.raises(TypeError, match="not both"):
        enorm_cli.convert_model(timm.create_model("test_resnet"), settings, margin=1.0)
    with pytest.raises(ValueError, match="normalizers"):
        enorm_cli.convert_model(timm.create_model("test_resnet"), normalizers=("bn", "xx"))


def test_a_root_norm_layer_is_replaced_and_returned() -> None:
    """As ``convert_sync_batchnorm``: a norm layer passed alone comes back replaced."""
    bn = nn.BatchNorm2d(8).eval()
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.weight.uniform_(0.5, 2)
    en = enorm_cli.convert_model(bn, verify=True)
    assert isinstance(en, enorm_cli.ExemplarNorm2d) and en is not bn
    x = torch.randn(4, 8, 5, 5)
    torch.testing.assert_close(en.eval()(x), bn(x), rtol=1e-5, atol=1e-5)


def test_nothing_to_convert_is_one_clear_error() -> None:
    with pytest.raises(EnormError, match="no BatchNorm or GroupNorm layer to convert"):
        enorm_cli.convert_model(nn.Sequential(nn.Conv2d(3, 4, 3), nn.LayerNorm(4)))


def test_param_groups_read_each_layers_margin() -> None:
    """Two parts converted with different margins (paper-style start) get the affine lr each
    margin needs; a layer built without a source, or anchored, has no source gain to restore
    (1)."""
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8)
    ).eval()
    enorm_cli.convert_model(model, margin=2.0, include="^1$", anchored=False)
    enorm_cli.convert_model(model, margin=0.5, include="^3$", anchored=False)
    model.append(enorm_cli.ExemplarNorm2d(8))
    groups = {g["name"]: g for g in enorm_cli.param_groups(model, lr=0.1, weight_decay=1e-4)}

    def share(m: float) -> float:
        return math.exp(m) / (math.exp(m) + 2)

    affine = sorted(g["lr_multiple"] for n, g in groups.items() if n.startswith("affine"))
    assert affine == pytest.approx(sorted([1.0, share(2.0) ** -2, share(0.5) ** -2]))
    assert groups["decay"]["weight_decay"] == 1e-4 and groups["no_decay"]["weight_decay"] == 0
    adam = enorm_cli.param_groups(model, lr=0.1, opt="adamw", affine_lr_scale=0.5)
    assert {g["lr_multiple"] for g in adam if g["name"].startswith("affine")} == {0.5}
    torch.optim.SGD(enorm_cli.param_groups(model, lr=0.1), lr=0.1)  # torch takes the groups


def test_bn_stats_and_sync_stats_return_the_model() -> None:
    model = enorm_cli.convert_model(timm.create_model("test_resnet"))
    assert enorm_cli.set_bn_stats(model, "renorm_frozen") is model and model.training
    layers = [m for m in model.modules() if isinstance(m, enorm_cli.MixedNorm2d)]
    assert all(m.renorm and m.frozen_stats and m.training for m in layers)
    enorm_cli.set_bn_stats(model, "running")
    assert model.training and not any(m.training for m in layers)
    assert enorm_cli.set_sync_stats(model) is model and all(m.sync_stats for m in layers)
    with pytest.raises(ValueError, match="batch, running, renorm, renorm_frozen"):
        enorm_cli.set_bn_stats(model, "frozen")


def test_save_model_and_load_model_round_trip(tmp_path: Path) -> None:
    model = enorm_cli.convert_model(timm.create_model("test_resnet", num_classes=7))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, enorm_cli.ExemplarNorm2d):
                m.ratio.fc2.weight.normal_()  # ratios that depend on the input
    path = enorm_cli.save_model(model, tmp_path / "m.safetensors", "test_resnet")
    again = enorm_cli.load_model(path)
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(again(x), model.eval()(x), rtol=0, atol=0)
    enorm_cli.save_model(again, tmp_path / "again.safetensors")  # remembers its source
    with pytest.raises(EnormError, match="force=True"):
        enorm_cli.save_model(model, path, "test_resnet")
    with pytest.raises(EnormError, match="source_model="):
        enorm_cli.save_model(model, tmp_path / "x.safetensors")
    with pytest.raises(EnormError, match="not converted by enorm"):
        enorm_cli.save_model(timm.create_model("test_resnet"), tmp_path / "y.safetensors", "x")


def test_ratio_recorder_reads_per_sample_ratios() -> None:
    model = enorm_cli.convert_model(timm.create_model("test_resnet")).eval()
    with enorm_cli.RatioRecorder(model) as recorder:
        model(torch.randn(3, 3, 64, 64))
    ratios = recorder.take()
    assert ratios.shape == (3, len(recorder.names), 3)
    torch.testing.assert_close(ratios.sum(-1), torch.ones(3, len(recorder.names)))
    summary = enorm_cli.layer_ratios(recorder.names, recorder.normalizers, ratios)
    assert summary[0].dominant == "bn"
