"""inspect's engine: the checkpoint alone (stored or prior ratios) and measured on real images."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from enorm_cli.config.settings import ENSettings
from enorm_cli.convert.pipeline import convert
from enorm_cli.data.datasets import parse_data_spec
from enorm_cli.inspect.report import inspect_checkpoint, inspect_on_data


def _sums_to_one(rows: list[dict], names: tuple[str, ...]) -> bool:
    return all(abs(sum(row[n] for n in names if n in row) - 1) < 1e-4 for row in rows)


def test_fresh_conversion_shows_the_prior(tmp_path: Path) -> None:
    out = tmp_path / "en.safetensors"
    converted = convert(
        "test_efficientnet_gn", out, ENSettings(normalizers=("bn", "ln")), pretrained=False
    )
    result = inspect_checkpoint(out)
    modules = dict(converted.model.named_modules())
    for layer in result.layers:  # what a layer adds over its source's affine: parameters only
        own = sum(p.numel() for p in modules[layer.name].parameters())
        assert layer.params_added == own - 2 * layer.channels
    assert result.source == "prior" and result.kind == "en"
    gn_layers = [layer for layer in result.layers if layer.source_type.startswith("GroupNorm")]
    assert gn_layers and all(layer.normalizers[-1] in ("gn", "in") for layer in gn_layers)
    for layer, ratios in zip(result.layers, result.ratios):
        k = len(layer.normalizers)
        assert max(ratios.mean) == pytest.approx(math.exp(2) / (math.exp(2) + k - 1))
        assert layer.params_added > 0
    assert _sums_to_one(result.rows(), ("bn", "in", "ln", "gn"))


def test_finetuned_checkpoint_shows_stored_ratios(finetuned: Path) -> None:
    result = inspect_checkpoint(finetuned)
    assert result.source == "stored" and result.samples == 12
    assert len(result.ratios) == len(result.layers) > 0
    assert any(r.std[0] > 0 for r in result.ratios)
    assert _sums_to_one(result.rows(), ("bn", "in", "ln"))


def test_measured_per_sample_and_per_class(finetuned: Path, image_classes: Path) -> None:
    result = inspect_on_data(
        finetuned, parse_data_spec(str(image_classes / "val")), samples=10, workers=0, by_class=True
    )
    assert result.source == "data" and result.samples == 10
    assert result.per_sample is not None and tuple(result.per_sample.shape) == (
        10,
        len(result.layers),
        3,
    )
    assert result.classes is not None and {c.name for c in result.classes} <= {
        "class0",
        "class1",
        "class2",
    }
    deviations = [c.deviation for c in result.classes]
    assert deviations == sorted(deviations, reverse=True) and deviations[0] > 0
    rows = result.class_rows()
    assert len(rows) == len(result.layers) * len(result.classes) and _sums_to_one(
        rows, ("bn", "in", "ln")
    )
    for r in result.ratios:
        assert all(0 <= lo <= hi <= 1 for lo, hi in zip(r.p10, r.p90))


def test_sn_checkpoint_shows_static_ratios(tmp_path: Path, image_classes: Path) -> None:
    out = tmp_path / "sn.safetensors"
    convert("test_resnet", out, ENSettings(layer="sn"), pretrained=False)
    result = inspect_checkpoint(out)
    assert result.kind == "sn" and result.source == "prior"
    assert result.ratios[0].mean[0] == pytest.approx(math.exp(2) / (math.exp(2) + 2))
    measured = inspect_on_data(
        out, parse_data_spec(str(image_classes / "val")), samples=4, workers=0
    )
    for stored, seen in zip(result.ratios, measured.ratios):
        assert seen.mean == pytest.approx(stored.mean, abs=1e-6) and max(seen.std) < 1e-6
