"""The model a recipe names: converted on the fly or loaded, with what its checkpoints record."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import QUICK

from enorm_cli.checkpoint import load_model, read_info, save_checkpoint
from enorm_cli.config.recipe import load_recipe
from enorm_cli.errors import EnormError
from enorm_cli.finetune.model import prepare_model
from enorm_cli.layers import ExemplarNorm2d, SwitchableNorm2d
from enorm_cli.layers.modes import set_sync_stats


def recipe(*extra: str):
    return load_recipe(QUICK, ["model.name=test_resnet", "model.checkpoint=null", *extra])


@pytest.mark.parametrize(
    ("norm", "kind"), [("en", ExemplarNorm2d), ("sn", SwitchableNorm2d), ("bn", None)]
)
def test_on_the_fly_conversion_by_norm(norm: str, kind: type | None) -> None:
    prepared = prepare_model(recipe(f"model.norm={norm}"), num_classes=4)
    layers = [
        m for m in prepared.model.modules() if isinstance(m, (ExemplarNorm2d, SwitchableNorm2d))
    ]
    assert (len(layers) > 0) == (kind is not None) and all(
        isinstance(m, kind) for m in layers if kind
    )
    assert len(prepared.converted_layers) == len(layers) and prepared.norm == norm
    assert (
        prepared.source_model == "test_resnet"
        and prepared.namespace == "timm"
        and len(prepared.mean) == 3
    )
    assert set_sync_stats(prepared.model, True) is prepared.model
    assert all(m.sync_stats for m in layers)


def test_settings_follow_the_recipe() -> None:
    settings = recipe(
        "model.en.normalizers=[bn,ln]", "model.en.ablation.logit_scale=0.5", "model.norm=bn"
    ).model.settings
    assert (
        settings.normalizers == ("bn", "ln")
        and settings.logit_scale == 0.5
        and settings.layer == "en"
    )


def test_a_checkpoint_reloads_with_a_new_head(tmp_path: Path) -> None:
    prepared = prepare_model(recipe(), num_classes=4)
    path = tmp_path / "ft.safetensors"
    meta = prepared.metadata(
        {"input_size": [3, 32, 32], "mean": prepared.mean, "std": prepared.std}, {"x": 1}
    )
    save_checkpoint(prepared.model, path, meta)
    assert read_info(path).extra == {"norm": "en", "x": 1} and load_model(path) is not None
    again = prepare_model(recipe(f"model.name={path}"), num_classes=7)
    assert (
        again.model.get_classifier().out_features == 7
        and again.converted_layers == prepared.converted_layers
    )


def test_pretrained_and_checkpoint_together_is_refused(tmp_path: Path) -> None:
    with pytest.raises(EnormError, match="keep one"):
        prepare_model(
            recipe("model.pretrained=true", f"model.checkpoint={tmp_path / 'w.pth'}"), num_classes=3
        )


def test_a_checkpoint_keeps_its_settings_and_a_contradicting_recipe_is_refused(
    tmp_path: Path,
) -> None:
    """Fine-tuning an EN checkpoint uses the file's settings (its margin sets the affine lr
    scale); a recipe key set to another value is refused in one line, the same value is fine."""
    prepared = prepare_model(recipe("model.en.margin=3.0"), num_classes=4)
    path = tmp_path / "m3.safetensors"
    meta = prepared.metadata({"input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.5] * 3}, {})
    save_checkpoint(prepared.model, path, meta)
    assert prepare_model(recipe(f"model.name={path}"), 4).settings.margin == 3.0
    assert prepare_model(recipe(f"model.name={path}", "model.en.margin=3"), 4).settings.margin == 3
    # the file records the start its layers took (auto resolved), so config.yaml's resolved
    # value, given back, agrees with it
    assert prepared.settings.anchored is True and read_info(path).settings["anchored"] is True
    again = recipe(f"model.name={path}", "model.en.ablation.anchored=true")
    assert prepare_model(again, 4).settings.anchored is True
    for extra, match in [
        ("model.en.margin=2.0", r"model\.en\.margin=2\.0 contradicts .*converted with 3\.0"),
        ("model.en.ablation.pi=10", r"model\.en\.ablation\.pi=10 contradicts .* 50: remove"),
        ("model.en.ablation.anchored=false", r"anchored=False contradicts .* with True"),
        ("model.norm=sn", r"model\.norm=sn contradicts .* a model\.norm=en checkpoint"),
    ]:
        with pytest.raises(EnormError, match=match):
            prepare_model(recipe(f"model.name={path}", extra), 4)
