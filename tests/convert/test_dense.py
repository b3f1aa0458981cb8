"""Backbones for dense prediction: torchvision detection and segmentation models, timm
``features_only`` models and segmentation-models-pytorch, each converted and verified as the
same function from the CLI and from Python, then trained a step."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import invoke

import enorm_cli

DENSE = [
    pytest.param(
        "resnet18", ["features_only=true"], id="timm-features_only", marks=pytest.mark.slow
    ),
    pytest.param(
        "torchvision:deeplabv3_mobilenet_v3_large",
        [],
        id="torchvision-deeplabv3",
        marks=pytest.mark.slow,
    ),
    pytest.param(
        "torchvision:fasterrcnn_mobilenet_v3_large_320_fpn",
        [],
        id="torchvision-fasterrcnn",
        marks=pytest.mark.slow,
    ),
    pytest.param(
        "smp:Unet", ["encoder_name=tu-resnet18"], id="smp-timm-encoder", marks=pytest.mark.slow
    ),
]


@pytest.mark.parametrize(("name", "model_args"), DENSE)
def test_cli_converts_verifies_and_loads(name: str, model_args: list[str], tmp_path: Path) -> None:
    out = tmp_path / "dense.safetensors"
    flags = [arg for pair in model_args for arg in ("--model-arg", pair)]
    result = invoke("convert", name, *flags, "--no-pretrained", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "same function" in result.stdout and out.is_file()
    model = enorm_cli.load_model(out)
    assert any(isinstance(m, enorm_cli.ExemplarNorm2d) for m in model.modules())


def test_cli_refuses_a_bad_model_arg_in_one_line() -> None:
    from helpers import one_error_line

    one_error_line(
        invoke("convert", "resnet18", "--model-arg", "oops", "-o", "x.safetensors"), "KEY=VALUE"
    )
    one_error_line(
        invoke(
            "convert",
            "resnet18",
            "--model-arg",
            "no_such_kwarg=1",
            "--no-pretrained",
            "-o",
            "x.safetensors",
        ),
        "does not take these model kwargs",
    )
    one_error_line(
        invoke(
            "convert", "smp:Unet", "--num-classes", "3", "--no-pretrained", "-o", "x.safetensors"
        ),
        "not a classifier",
    )


def _step(model: torch.nn.Module, loss: torch.Tensor) -> None:
    """One SGD step on enorm's groups; every EN layer's ratio branch got a gradient."""
    optimizer = torch.optim.SGD(enorm_cli.param_groups(model, lr=0.01), lr=0.01, momentum=0.9)
    optimizer.zero_grad()
    loss.backward()
    assert torch.isfinite(loss)
    layers = [m for m in model.modules() if isinstance(m, enorm_cli.ExemplarNorm2d)]
    assert layers and all(m.ratio.fc2.weight.grad is not None for m in layers)
    optimizer.step()


def test_timm_features_only_converts_and_trains() -> None:
    import timm

    model = timm.create_model("resnet18", features_only=True).eval()
    model = enorm_cli.convert_model(model, verify=True, example_inputs=torch.randn(2, 3, 64, 64))
    enorm_cli.set_bn_stats(model, "batch")
    _step(model, sum(f.square().mean() for f in model(torch.randn(4, 3, 64, 64))))


@pytest.mark.slow
def test_torchvision_segmentation_converts_and_trains() -> None:
    from torchvision.models.segmentation import deeplabv3_mobilenet_v3_large

    model = deeplabv3_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=3)
    x = torch.randn(2, 3, 96, 96)
    model = enorm_cli.convert_model(model.eval(), verify=True, example_inputs=x)
    enorm_cli.set_bn_stats(model, "renorm_frozen")
    logits = model(x)["out"]
    _step(model, torch.nn.functional.cross_entropy(logits, torch.randint(0, 3, (2, 96, 96))))


@pytest.mark.slow
def test_torchvision_detection_with_frozen_bn_converts_and_trains() -> None:
    """A pretrained detector's backbone freezes its BatchNorm (``FrozenBatchNorm2d``): those
    layers convert like any BatchNorm and keep the detector's function."""
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.ops.misc import FrozenBatchNorm2d

    backbone = resnet_fpn_backbone(
        backbone_name="resnet18", weights=None, norm_layer=FrozenBatchNorm2d, trainable_layers=5
    )
    with torch.no_grad():  # statistics and affines other than a fresh layer's identity
        for m in backbone.modules():
            if isinstance(m, FrozenBatchNorm2d):
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
    detector = FasterRCNN(backbone, num_classes=3, min_size=128, max_size=128).eval()
    images = torch.rand(2, 3, 128, 128)
    detector = enorm_cli.convert_model(detector, verify=True, example_inputs=images)
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in detector.modules())
    enorm_cli.set_bn_stats(detector, "renorm_frozen")
    targets = [{"boxes": torch.tensor([[10.0, 10.0, 60.0, 60.0]]), "labels": torch.tensor([1])}]
    _step(detector, sum(detector(list(images), targets * 2).values()))


@pytest.mark.slow
def test_smp_with_a_timm_encoder_converts_and_trains() -> None:
    smp = pytest.importorskip("segmentation_models_pytorch")
    model = smp.Unet("tu-resnet18", encoder_weights=None, classes=2).eval()
    x = torch.randn(2, 3, 64, 64)
    model = enorm_cli.convert_model(model, verify=True, example_inputs=x)
    enorm_cli.set_bn_stats(model, "batch")
    logits = model(x)
    _step(model, torch.nn.functional.cross_entropy(logits, torch.randint(0, 2, (2, 64, 64))))
