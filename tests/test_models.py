"""Model names, checkpoint reading and pretrained weights offline."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from enorm_cli.errors import EnormError
from enorm_cli.models import (
    build_model,
    create_source_model,
    num_classes_of,
    parse_model_name,
    read_state_dict,
    set_num_classes,
)


def test_parse_model_names() -> None:
    assert parse_model_name("resnet50").namespace == "timm"
    assert parse_model_name("timm:resnet50.a1_in1k").arch == "resnet50.a1_in1k"
    name = parse_model_name("torchvision:mobilenet_v2")
    assert (name.namespace, name.arch, name.full) == (
        "torchvision",
        "mobilenet_v2",
        "torchvision:mobilenet_v2",
    )
    with pytest.raises(EnormError, match="did you mean resnet50"):
        parse_model_name("resnet5")
    with pytest.raises(EnormError, match="torchvision:mobilenet_v2"):
        parse_model_name("torchvision:mobilenet_v")


def test_pretrained_offline_fails_fast_with_the_fix() -> None:
    start = time.perf_counter()
    with pytest.raises(EnormError, match=r"--checkpoint FILE .* --no-pretrained"):
        build_model(parse_model_name("test_resnet"), pretrained=True)
    assert time.perf_counter() - start < 10


def test_state_dict_wrappers_and_prefixes(tmp_path: Path) -> None:
    model = build_model(parse_model_name("test_resnet"))
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "ckpt.pth")
    loaded = read_state_dict(tmp_path / "ckpt.pth")
    assert set(loaded) == set(model.state_dict())


@pytest.mark.parametrize(
    "content, match",
    [
        (b"not a checkpoint", "cannot be read as weights"),
        ("list", "not a state dict"),
    ],
)
def test_unreadable_checkpoints(tmp_path: Path, content, match: str) -> None:
    path = tmp_path / "bad.pth"
    if content == "list":
        torch.save([torch.zeros(1)], path)
    else:
        path.write_bytes(content)
    with pytest.raises(EnormError, match=match):
        read_state_dict(path)


def test_mismatched_checkpoint_names_counts_and_keys(tmp_path: Path) -> None:
    other = build_model(parse_model_name("test_efficientnet"))
    torch.save(other.state_dict(), tmp_path / "eff.pth")
    with pytest.raises(EnormError, match=r"does not fit .*\d+ missing: .*\d+ unexpected"):
        create_source_model("test_resnet", checkpoint=tmp_path / "eff.pth")


def test_num_classes_with_checkpoint_replaces_the_head(tmp_path: Path) -> None:
    model = build_model(parse_model_name("torchvision:resnet18"))
    torch.save(model.state_dict(), tmp_path / "r18.pth")
    _, ten = create_source_model(
        "torchvision:resnet18", checkpoint=tmp_path / "r18.pth", num_classes=10
    )
    assert num_classes_of(ten) == 10
    torch.save(ten.state_dict(), tmp_path / "r18_10.pth")  # a checkpoint whose head has 10 classes
    _, again = create_source_model(
        "torchvision:resnet18", checkpoint=tmp_path / "r18_10.pth", num_classes=10
    )
    torch.testing.assert_close(again.fc.weight, ten.fc.weight)
    set_num_classes(again, 3)
    assert again(torch.randn(1, 3, 32, 32)).shape == (1, 3)
