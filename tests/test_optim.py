"""Optimizer groups over the layer interface, timm's optimizer and scheduler factories."""

from __future__ import annotations

import pytest
from helpers import QUICK

from enorm_cli.errors import EnormError
from enorm_cli.finetune_model import prepare_model
from enorm_cli.layers import MixedNorm2d
from enorm_cli.optim import build_optimizer, build_scheduler, param_groups
from enorm_cli.recipe import load_recipe


def test_param_groups_split_en_parts() -> None:
    recipe = load_recipe(
        QUICK, ["model.checkpoint=null", "optim.lr=0.1", "optim.ratio_lr_scale=0.5"]
    )
    prepared = prepare_model(recipe, 10)
    groups = {g["name"]: g for g in param_groups(prepared.model, recipe)}
    assert groups["ratio"]["lr"] == 0.05 and groups["ratio"]["weight_decay"] == 0.0
    assert groups["affine"]["lr"] == 0.1 and groups["decay"]["weight_decay"] == 1e-4
    total = sum(p.numel() for g in groups.values() for p in g["params"])
    assert total == sum(p.numel() for p in prepared.model.parameters())


@pytest.mark.parametrize("norm", ["en", "sn"])
def test_groups_hold_what_each_layer_names(norm: str) -> None:
    recipe = load_recipe(
        QUICK, ["model.name=test_resnet", "model.checkpoint=null", f"model.norm={norm}"]
    )
    model = prepare_model(recipe, 10).model
    groups = {g["name"]: {id(p) for p in g["params"]} for g in param_groups(model, recipe)}
    layers = [m for m in model.modules() if isinstance(m, MixedNorm2d)]
    assert layers
    assert groups["ratio"] == {id(p) for m in layers for p in m.ratio_parameters()}
    assert groups["affine"] == {id(p) for m in layers for p in m.affine_parameters()}


def test_optimizer_and_scheduler_from_the_recipe() -> None:
    recipe = load_recipe(
        QUICK,
        [
            "model.name=test_resnet",
            "model.checkpoint=null",
            "optim.name=adamw",
            "schedule.warmup_epochs=1",
            "schedule.epochs=2",
        ],
    )
    model = prepare_model(recipe, 10).model
    optimizer = build_optimizer(model, recipe)
    assert type(optimizer).__name__ == "AdamW"
    scheduler = build_scheduler(optimizer, recipe, steps_per_epoch=10)
    scheduler.step_update(5)
    assert 0 < optimizer.param_groups[0]["lr"] < recipe.optim.lr
    bad = load_recipe(
        QUICK, ["model.name=test_resnet", "model.checkpoint=null", "optim.name=nosuch"]
    )
    with pytest.raises(EnormError, match="optim"):
        build_optimizer(model, bad)
