"""Safetensors checkpoints: metadata, rebuild from the file alone, bad files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from enorm_cli import load_model
from enorm_cli.checkpoint import build_metadata, read_info, save_checkpoint
from enorm_cli.config.settings import ENSettings
from enorm_cli.convert.pipeline import convert
from enorm_cli.errors import EnormError
from enorm_cli.layers import ExemplarNorm2d


def test_convert_save_and_load_model_round_trip(tmp_path: Path) -> None:
    out = tmp_path / "eff.safetensors"
    settings = ENSettings(normalizers=("bn", "ln"), pi=10, reduction=4)
    result = convert("test_efficientnet", out, settings, pretrained=False, num_classes=7)
    meta = safe_open(str(out), framework="pt").metadata()
    assert meta["format"] == "pt" and all(isinstance(v, str) for v in meta.values())
    info = read_info(out)
    assert info.source_model == "test_efficientnet" and info.num_classes == 7
    assert info.settings["normalizers"] == ["bn", "ln"] and info.settings["pi"] == 10
    assert set(info.converted_layers.values()) == {"BatchNormAct2d"}
    assert info.data_config["input_size"] == [3, 160, 160]
    assert json.loads(meta["enorm.converted_layers"]) == info.converted_layers
    loaded = load_model(out)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), result.model(x), rtol=0, atol=0)


def test_shared_tensors_are_saved_once_and_reload(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    model[1].weight = model[0].weight
    path = tmp_path / "tied.safetensors"
    save_checkpoint(model, path, {"format": "pt"})
    from safetensors.torch import load_model as st_load

    fresh = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    fresh[1].weight = fresh[0].weight
    st_load(fresh, str(path))
    torch.testing.assert_close(fresh[1].weight, model[0].weight)


def test_foreign_corrupt_and_missing_files(tmp_path: Path) -> None:
    foreign = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(EnormError, match="not an enorm checkpoint"):
        load_model(foreign)
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......")
    with pytest.raises(EnormError, match=r"not a readable \.safetensors"):
        load_model(corrupt)
    with pytest.raises(EnormError, match="not found"):
        load_model(tmp_path / "nope.safetensors")


def test_truncated_checkpoint_is_reported(tmp_path: Path) -> None:
    out = tmp_path / "r.safetensors"
    convert("test_resnet", out, ENSettings(), pretrained=False)
    data = out.read_bytes()
    out.write_bytes(data[: len(data) // 2])
    with pytest.raises(EnormError):
        load_model(out)


def test_metadata_is_strings_only() -> None:
    meta = build_metadata(
        "m",
        "timm",
        3,
        {"a": [1]},
        {"x": "BatchNorm2d"},
        {"mean": [0.5]},
        {"x": ["bn", "ln"]},
        {"ratio_stats": {"l": 1}},
    )
    assert all(isinstance(v, str) for v in meta.values())
    assert json.loads(meta["enorm.ratio_stats"]) == {"l": 1}


def test_sn_checkpoint_round_trip(tmp_path: Path) -> None:
    out = tmp_path / "sn.safetensors"
    result = convert(
        "test_resnet", out, ENSettings(layer="sn", normalizers=("bn", "ln")), pretrained=False
    )
    assert result.verified and not result.exact  # reported, not enforced: SN starts near its source
    info = read_info(out)
    assert info.settings["layer"] == "sn" and set(map(tuple, info.layer_normalizers.values())) == {
        ("bn", "ln")
    }
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(load_model(out)(x), result.model(x))


def _rewrite_metadata(
    src: Path, dst: Path, drop_suffix: str | tuple[str, ...] | None = None, **changes: str | None
) -> None:
    """A copy of ``src`` with metadata keys changed (None: removed), as another enorm wrote it;
    tensors whose name ends with ``drop_suffix`` (one or several) are left out."""
    from safetensors.torch import load_file

    meta = dict(safe_open(str(src), framework="pt").metadata())
    for key, value in changes.items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    tensors = {
        k: v
        for k, v in load_file(str(src)).items()
        if not (drop_suffix and k.endswith(drop_suffix))
    }
    save_file(tensors, str(dst), metadata=meta)


def _older_format(
    src: Path, dst: Path, version: int, setting: str, drop_suffix: str | tuple[str, ...]
) -> None:
    """A copy of ``src`` as format ``version`` wrote it: without the settings key and the
    tensors that version did not have yet."""
    settings = json.loads(safe_open(str(src), framework="pt").metadata()["enorm.en_settings"])
    del settings[setting]
    _rewrite_metadata(
        src,
        dst,
        drop_suffix=drop_suffix,
        **{"enorm.format_version": str(version), "enorm.en_settings": json.dumps(settings)},
    )


def test_format_2_files_load_with_the_uncentered_branch_they_were_trained_with(
    tmp_path: Path,
) -> None:
    """Format 2 files predate the centered branch: their layers read h as it is, with trained
    FC2 weights that a centre would change."""
    out = tmp_path / "r.safetensors"
    convert("test_resnet", out, ENSettings(), pretrained=False)
    current = load_model(out)
    assert all(m.centered for m in current.modules() if isinstance(m, ExemplarNorm2d))
    old = tmp_path / "v2.safetensors"
    _older_format(out, old, 2, "centered", ("ratio.hidden_mean", "ratio.logit_shift"))
    assert read_info(old).settings["centered"] is False
    layers = [m for m in load_model(old).modules() if isinstance(m, ExemplarNorm2d)]
    assert layers and not any(m.centered or m.sample_parameters() for m in layers)


def test_format_3_files_load_with_the_start_they_were_converted_with(tmp_path: Path) -> None:
    """Format 3 files predate the anchored start: no ``mix_offset``, so their layers mix with
    the ratios alone (offset 0) and their gain lives in the source row (its own lr rule)."""
    out = tmp_path / "r.safetensors"
    convert("test_resnet", out, ENSettings(anchored=False), pretrained=False)
    old = tmp_path / "v3.safetensors"
    _older_format(out, old, 3, "anchored", "mix_offset")
    assert read_info(old).settings["anchored"] is False
    layers = [m for m in load_model(old).modules() if isinstance(m, ExemplarNorm2d)]
    assert layers and not any(m.anchored or m.mix_offset.any() for m in layers)
    assert all(m.source_gain_share() < 1 for m in layers)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(load_model(old).eval()(x), load_model(out).eval()(x))


def test_format_1_files_migrate_and_newer_formats_are_refused(tmp_path: Path) -> None:
    """Format 1 files from before logit_scale existed had an unscaled FC2: they load as they
    were."""
    out = tmp_path / "r.safetensors"
    result = convert("test_resnet", out, ENSettings(), pretrained=False)
    settings = json.loads(safe_open(str(out), framework="pt").metadata()["enorm.en_settings"])
    assert (
        settings["logit_scale"] is None
        and "enorm.format_version" in safe_open(str(out), "pt").metadata()
    )
    old = tmp_path / "v1.safetensors"
    del settings["logit_scale"], settings["centered"]
    _rewrite_metadata(  # nor did its layers' state dicts carry it (ExemplarNorm2d version 1)
        out,
        old,
        drop_suffix=("ratio._extra_state", "ratio.hidden_mean", "ratio.logit_shift"),
        **{"enorm.format_version": "1", "enorm.en_settings": json.dumps(settings)},
    )
    assert read_info(old).settings["logit_scale"] == 1.0
    model = load_model(old)
    layers = [m for m in model.modules() if hasattr(m, "logit_scale")]
    assert layers and all(m.logit_scale == 1.0 for m in layers)
    assert read_info(out).settings["logit_scale"] is None  # a current file is left as it is
    with torch.no_grad():  # a fresh conversion does not depend on s (FC2's weight is zero)
        x = torch.randn(2, 3, 64, 64)
        torch.testing.assert_close(model(x), result.model(x))
    for version, match in (("5", "newer enorm.*upgrade enorm"), ("x", "damaged"), ("0", "unknown")):
        bad = tmp_path / f"v{version}.safetensors"
        _rewrite_metadata(out, bad, **{"enorm.format_version": version})
        with pytest.raises(EnormError, match=match):
            load_model(bad)


def test_settings_a_file_cannot_build_are_one_error(tmp_path: Path) -> None:
    out = tmp_path / "r.safetensors"
    convert("test_resnet", out, ENSettings(), pretrained=False)
    settings = {
        **json.loads(safe_open(str(out), framework="pt").metadata()["enorm.en_settings"]),
        "pi": 0,
    }
    bad = tmp_path / "bad.safetensors"
    _rewrite_metadata(out, bad, **{"enorm.en_settings": json.dumps(settings)})
    with pytest.raises(EnormError, match=r"cannot build.*pi"):
        load_model(bad)


@pytest.mark.parametrize("layer", ["en", "sn"])
def test_files_from_before_the_frozen_guard_load_as_the_same_function(
    tmp_path: Path, layer: str
) -> None:
    """A checkpoint written before the frozen-statistics guard (no ``frozen_log_r`` and
    ``frozen_state``) loads strictly, with a fresh guard, and computes what it did."""
    out = tmp_path / "new.safetensors"
    convert("test_resnet", out, ENSettings(layer=layer), pretrained=False)
    with safe_open(str(out), framework="pt") as f:
        metadata = f.metadata()
        assert any(k.endswith(".frozen_state") for k in f.keys())
        tensors = {k: f.get_tensor(k) for k in f.keys() if ".frozen_" not in k}
    old = tmp_path / "old.safetensors"
    save_file(tensors, str(old), metadata=metadata)
    x = torch.randn(2, 3, 32, 32)
    new_model, old_model = load_model(out), load_model(old)
    assert any(k.endswith("frozen_state") for k in old_model.state_dict())
    torch.testing.assert_close(old_model(x), new_model(x), rtol=0, atol=0)
