"""Optimizer groups over the layer interface, timm's optimizer and scheduler factories."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from helpers import QUICK, randomize_norms
from torch import nn

from enorm_cli.config.recipe import Recipe, load_recipe
from enorm_cli.config.settings import ENSettings
from enorm_cli.convert.surgery import replace_norms
from enorm_cli.errors import EnormError
from enorm_cli.finetune.model import prepare_model
from enorm_cli.finetune.optim import (
    SAMPLE_LR_MULTIPLE,
    build_optimizer,
    build_scheduler,
    gradient_scaled,
    network_lr,
    recipe_param_groups,
)
from enorm_cli.layers import MixedNorm2d

LAMBDA_SRC = math.exp(2.0) / (math.exp(2.0) + 1)  # the quickstart's margin 2 over [bn, ln]
UNANCHORED = ["model.en.ablation.anchored=false"]


def groups_of(model: nn.Module, recipe: Recipe) -> list[dict]:
    return recipe_param_groups(model, recipe.optim)


def test_param_groups_split_en_parts() -> None:
    recipe = load_recipe(
        QUICK, ["model.checkpoint=null", "optim.lr=0.1", "optim.ratio_lr_scale=0.5"]
    )
    prepared = prepare_model(recipe, 10)
    groups = {g["name"]: g for g in groups_of(prepared.model, recipe)}
    assert groups["ratio"]["lr"] == 0.05 and groups["ratio"]["weight_decay"] == 0.0
    assert groups["affine"]["lr"] == pytest.approx(0.1)  # auto: anchored, the source row's gain
    assert groups["decay"]["weight_decay"] == 1e-4
    total = sum(p.numel() for g in groups.values() for p in g["params"])
    assert total == sum(p.numel() for p in prepared.model.parameters())


@pytest.mark.parametrize(
    ("overrides", "lr"),
    [
        ([], 0.1),  # anchored: the source row holds gamma at mixing weight 1
        (["optim.name=adamw"], 0.1),
        (UNANCHORED, 0.1 / LAMBDA_SRC**2),  # gamma / lambda_src, entering times lambda_src
        ([*UNANCHORED, "optim.name=adamw"], 0.1 / LAMBDA_SRC),  # adaptive: the scale cancels
        (["optim.affine_lr_scale=1"], 0.1),
        (["optim.affine_lr_scale=0.3"], 0.03),
        (["model.norm=sn"], 0.1),  # one affine pair: the gain's own gradient
        (["model.en.ablation.shared_affine=true"], 0.1),
    ],
)
def test_affine_lr_scale(overrides: list[str], lr: float) -> None:
    recipe = load_recipe(
        QUICK, ["model.name=test_resnet", "model.checkpoint=null", "optim.lr=0.1", *overrides]
    )
    groups = {g["name"]: g for g in groups_of(prepare_model(recipe, 10).model, recipe)}
    assert groups["affine"]["lr"] == pytest.approx(lr)


@pytest.mark.parametrize(
    ("overrides", "lr"),
    [
        ([], 0.1),  # default logit scale 1 / sqrt(pi K): a step moves the logits as SN's
        (["model.en.ablation.logit_scale=1.0"], 0.1 / 100),  # s^2 pi K = 100 for K=2, pi=50
        (["model.en.ablation.logit_scale=1.0", "model.en.ablation.pi=10"], 0.1 / 20),
        (["model.norm=sn"], 0.1),  # plain logits
        (["optim.ratio_lr_scale=0.5"], 0.05),
        (["optim.name=adamw"], 0.1),  # adaptive at lr 0.1: above ADAPTIVE_LOGIT_LR, the lr
        (["optim.name=adamw", "optim.ratio_lr_scale=0.5"], 0.05),
    ],
)
def test_ratio_lr_scale(overrides: list[str], lr: float) -> None:
    """``ratio_lr_scale: auto`` divides out ``ratio_step_factor`` (s^2 pi K), so the ratio
    logits move as far per step whatever the branch's logit scale."""
    recipe = load_recipe(
        QUICK, ["model.name=test_resnet", "model.checkpoint=null", "optim.lr=0.1", *overrides]
    )
    groups = {g["name"]: g for g in groups_of(prepare_model(recipe, 10).model, recipe)}
    assert groups["ratio"]["lr"] == pytest.approx(lr) and "ratio_1" not in groups
    assert groups["ratio"]["lr_multiple"] == pytest.approx(lr / 0.1)


@pytest.mark.parametrize(
    ("overrides", "batch", "multiple"),
    [
        ([], 64, 300.0),  # SGD from 64 images per step: the whole multiple
        ([], 256, 300.0),
        ([], 63, 1.0),  # fewer: the ratio lr
        ([], None, 1.0),  # a loop that does not say its batch: the ratio lr
        (["optim.name=adamw"], 64, 1.0),  # adaptive: the logits' lr (at lr 0.1: the lr)
        (["optim.sample_lr_scale=5"], 8, 5.0),
        (["model.en.ablation.centered=false"], 64, None),  # the paper's branch: no such group
    ],
)
def test_sample_lr_scale(overrides: list[str], batch: int | None, multiple: float | None) -> None:
    """A centered branch's FC2 weight has its own group ("sample") at ``sample_lr_scale``."""
    recipe = load_recipe(
        QUICK, ["model.name=test_resnet", "model.checkpoint=null", "optim.lr=0.1", *overrides]
    )
    model = prepare_model(recipe, 10).model
    groups = {g["name"]: g for g in recipe_param_groups(model, recipe.optim, batch)}
    layers = [m for m in model.modules() if isinstance(m, MixedNorm2d)]
    if multiple is None:
        assert "sample" not in groups
        assert not any(m.sample_parameters() for m in layers)
        return
    assert groups["sample"]["lr_multiple"] == pytest.approx(multiple)
    assert groups["sample"]["lr"] == pytest.approx(0.1 * multiple)
    assert {id(p) for p in groups["sample"]["params"]} == {id(m.ratio.fc2.weight) for m in layers}
    assert not {id(p) for p in groups["ratio"]["params"]} & {
        id(p) for p in groups["sample"]["params"]
    }


@pytest.mark.parametrize(
    ("opt", "lr", "multiple"),
    [
        ("adamw", 0.0002, 10.0),  # at most ten times the lr
        ("adamw", 0.002, 10.0),  # ADAPTIVE_LOGIT_LR: 0.02 a step
        ("adamw", 0.005, 4.0),
        ("lion", 0.01, 2.0),
        ("adamw", 0.05, 1.0),  # never slower than the network
        ("sgd", 0.001, 1.0),  # SGD: the step grows with the gradient, no multiple
    ],
)
@pytest.mark.parametrize("extra", [[], ["model.en.ablation.logit_scale=1.0"]])
def test_adaptive_optimizers_give_ens_logits_their_own_lr(
    opt: str, lr: float, multiple: float, extra: list[str]
) -> None:
    """Under optimizers that step every parameter by about the lr, EN's logits (FC2's bias and
    per-sample weight) learn at ADAPTIVE_LOGIT_LR within 1-10 times the lr, on top of the
    logit-scale factor; the hidden layer keeps that factor alone, and SN's logits the lr."""
    base = ["model.name=test_resnet", "model.checkpoint=null", f"optim.name={opt}"]
    recipe = load_recipe(QUICK, [*base, f"optim.lr={lr}", *extra])
    model = prepare_model(recipe, 10).model
    groups = {g["name"]: g for g in recipe_param_groups(model, recipe.optim, 64)}
    step = 1.0 if not extra else 1 / 100  # s^2 pi K = 100 at s = 1, K = 2, pi = 50
    assert groups["ratio"]["lr_multiple"] == pytest.approx(multiple * step)
    sample = multiple * step if opt != "sgd" else SAMPLE_LR_MULTIPLE * step  # 64 images a step
    assert groups["sample"]["lr_multiple"] == pytest.approx(sample)
    assert groups["hidden"]["lr_multiple"] == pytest.approx(step)
    small = {g["name"]: g for g in recipe_param_groups(model, recipe.optim, 16)}
    assert small["sample"]["lr_multiple"] == pytest.approx(step)  # noisy: the SGD ratio scale
    assert small["ratio"]["lr_multiple"] == pytest.approx(multiple * step)
    sn = load_recipe(QUICK, [*base, f"optim.lr={lr}", "model.norm=sn"])
    sn_groups = {g["name"]: g for g in groups_of(prepare_model(sn, 10).model, sn)}
    assert sn_groups["ratio"]["lr_multiple"] == 1.0


@pytest.mark.parametrize(
    ("overrides", "multiple"),
    [
        ([], 1.0),  # SGD: the ratio scale, as when the hidden layer was in the ratio group
        (["optim.name=adamw"], 1.0),  # adaptive: the network's lr, whatever the logits get
        (["model.en.ablation.logit_scale=1.0", "model.en.ablation.pi=10"], 1 / 20),
        (["optim.ratio_lr_scale=0.5"], 0.5),  # a set ratio scale sets the whole branch's
        (["optim.name=adamw", "optim.ratio_lr_scale=10"], 10.0),
        (["optim.name=adamw", "optim.hidden_lr_scale=2"], 2.0),
    ],
)
def test_hidden_lr_scale(overrides: list[str], multiple: float) -> None:
    """EN's conv and FC1 have their own group ("hidden"), disjoint from the logits' groups."""
    recipe = load_recipe(
        QUICK, ["model.name=test_resnet", "model.checkpoint=null", "optim.lr=0.1", *overrides]
    )
    model = prepare_model(recipe, 10).model
    groups = {g["name"]: g for g in recipe_param_groups(model, recipe.optim, 64)}
    layers = [m for m in model.modules() if isinstance(m, MixedNorm2d)]
    assert groups["hidden"]["lr_multiple"] == pytest.approx(multiple)
    assert groups["hidden"]["lr"] == pytest.approx(0.1 * multiple)
    assert groups["hidden"]["weight_decay"] == groups["ratio"]["weight_decay"] == 0.0
    hidden = {
        id(p) for m in layers for p in [*m.ratio.conv.parameters(), *m.ratio.fc1.parameters()]
    }
    assert {id(p) for p in groups["hidden"]["params"]} == hidden
    assert {id(p) for p in groups["ratio"]["params"]} == {id(m.ratio.fc2.bias) for m in layers}


def test_sgd_steps_the_hidden_layer_as_the_ratio_group_did() -> None:
    """Under SGD the hidden group is the ratio group's lr and decay: the step EN's branch took
    when both were one group, to the bit."""
    recipe = load_recipe(QUICK, ["model.name=test_resnet", "model.checkpoint=null"])
    torch.manual_seed(0)
    model = prepare_model(recipe, 10).model
    twin = copy.deepcopy(model)
    split = recipe_param_groups(model, recipe.optim, 64)
    joined = [dict(g) for g in recipe_param_groups(twin, recipe.optim, 64)]
    ratio = next(g for g in joined if g["name"] == "ratio")
    ratio["params"] = ratio["params"] + next(g for g in joined if g["name"] == "hidden")["params"]
    joined = [g for g in joined if g["name"] != "hidden"]
    x = torch.randn(4, 3, 32, 32)
    for net, groups in ((model, split), (twin, joined)):
        optimizer = torch.optim.SGD(groups, lr=recipe.optim.lr, momentum=0.9)
        for _ in range(2):
            optimizer.zero_grad()
            net(x).square().mean().backward()
            optimizer.step()
    assert all(a.equal(b) for a, b in zip(model.parameters(), twin.parameters(), strict=True))


def test_auto_ratio_scale_is_exactly_one_at_the_default_logit_scale() -> None:
    """Bit-identical to the recipes' former explicit ``ratio_lr_scale: 1.0``."""
    recipe = load_recipe(QUICK, ["model.checkpoint=null"])
    groups = {g["name"]: g for g in groups_of(prepare_model(recipe, 10).model, recipe)}
    assert groups["ratio"]["lr_multiple"] == 1.0 and groups["ratio"]["lr"] == recipe.optim.lr


def test_gradient_scaled_optimizers() -> None:
    assert all(gradient_scaled(n) for n in ("sgd", "momentum", "nesterov", "sgdp", "lookahead_sgd"))
    assert not any(gradient_scaled(n) for n in ("adamw", "lion", "rmsproptf", "lamb"))


@pytest.mark.parametrize(
    ("anchored", "scale", "gain_step"),
    [(True, "auto", 1.0), (True, "1", 1.0), (False, "auto", 1.0), (False, "1", LAMBDA_SRC**2)],
)
def test_auto_scale_gives_the_source_gain_the_step_bn_takes(
    anchored: bool, scale: str, gain_step: float
) -> None:
    """Why ``affine_lr_scale: auto``: one SGD step on a converted EN layer moves its source gain
    (mixing weight times the gamma_src row) as far as the same step moves the BatchNorm's gamma.
    Anchored, the row is gamma at weight 1, so any scale 1 does that; from the paper-style start
    (gamma / lambda_src at weight lambda_src) scale 1 moves it lambda_src^2 = 0.78 times as far,
    and EN learned slower than BN at low lrs."""
    torch.manual_seed(0)
    bn_model = randomize_norms(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)))
    en_model = copy.deepcopy(bn_model)
    replace_norms(en_model, ENSettings(normalizers=("bn", "ln"), margin=2.0, anchored=anchored))
    recipe = load_recipe(
        QUICK, ["model.checkpoint=null", "optim.lr=0.1", f"optim.affine_lr_scale={scale}"]
    )
    x, target = torch.randn(6, 3, 9, 9), torch.randn(6, 8, 7, 7)
    steps = []
    for model in (bn_model, en_model):
        layer = model[1]
        row = layer.normalizers.index("bn") if isinstance(layer, MixedNorm2d) else slice(None)
        share = layer.source_gain_share() if isinstance(layer, MixedNorm2d) else 1.0
        gain = share * layer.weight.detach()[row].clone()  # the source gain the output sees
        groups = [g for g in groups_of(model, recipe) if g["name"] != "ratio"]
        optimizer = torch.optim.SGD(groups, lr=recipe.optim.lr)
        (model(x) * target).sum().backward()
        optimizer.step()
        steps.append(share * layer.weight.detach()[row] - gain)
    assert torch.allclose(steps[1], gain_step * steps[0], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("norm", ["en", "sn"])
def test_groups_hold_what_each_layer_names(norm: str) -> None:
    recipe = load_recipe(
        QUICK, ["model.name=test_resnet", "model.checkpoint=null", f"model.norm={norm}"]
    )
    model = prepare_model(recipe, 10).model
    groups = {g["name"]: {id(p) for p in g["params"]} for g in groups_of(model, recipe)}
    layers = [m for m in model.modules() if isinstance(m, MixedNorm2d)]
    assert layers
    assert groups["ratio"] == {id(p) for m in layers for p in m.ratio_parameters()}
    assert groups.get("hidden", set()) == {id(p) for m in layers for p in m.hidden_parameters()}
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
    assert 0 < network_lr(optimizer) < recipe.optim.lr  # warming up
    bad = load_recipe(
        QUICK, ["model.name=test_resnet", "model.checkpoint=null", "optim.name=nosuch"]
    )
    with pytest.raises(EnormError, match="optim"):
        build_optimizer(model, bad)


def test_the_logged_lr_is_the_networks_not_the_scaled_affines() -> None:
    recipe = load_recipe(QUICK, ["model.name=test_resnet", "model.checkpoint=null", "optim.lr=0.1"])
    optimizer = build_optimizer(prepare_model(recipe, 10).model, recipe)
    assert max(g["lr"] for g in optimizer.param_groups) > 0.1  # the affines: 0.1 / lambda^2
    assert network_lr(optimizer) == 0.1


def test_the_scheduler_applies_each_groups_scale_once() -> None:
    """timm's schedulers multiply a group's lr by a key named ``lr_scale``: the groups' own
    multiple must not be read as one (the affines would learn at lr / lambda_src^4)."""
    recipe = load_recipe(QUICK, ["model.name=test_resnet", "model.checkpoint=null", "optim.lr=0.1"])
    optimizer = build_optimizer(prepare_model(recipe, 10).model, recipe)
    scheduler = build_scheduler(optimizer, recipe, steps_per_epoch=10)
    scheduler.step_update(0)
    for group in optimizer.param_groups:
        assert group["lr"] == pytest.approx(0.1 * group.get("lr_multiple", 1.0))
