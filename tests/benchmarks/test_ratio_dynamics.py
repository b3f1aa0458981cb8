"""The collapse, end to end: the quickstart model at batch 128 and lr 0.05 (docs/stability.md).

With an unscaled ratio branch at the plain lr (``model.en.ablation.logit_scale=1.0
optim.ratio_lr_scale=1.0``, the code before the fix) the last layer, 1280 channels in front of
the new head, flips onto ln (whose gamma is 0) within a few steps and its softmax saturates: its
output is the constant beta and no gradient reaches the network any more. The default branch
moves the same layer without saturating it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import ratio_dynamics  # noqa: E402

LAST = "features.18.1"
MINIMAL = ROOT / "benchmarks" / "recipes" / "minimal.yaml"


def last_layer_after(mobilenet_weights: Path, *extra: str) -> dict:
    overrides = [
        f"model.checkpoint={mobilenet_weights}",
        "data.limit_train=8000",
        "data.workers=0",
        "data.batch_size=128",
        "optim.lr=0.05",
        "train.grad_clip=null",  # the layer's own protection, without the recipes' clip
        *extra,
    ]
    out = ratio_dynamics.run(
        overrides, steps=10, recipe_path=ROOT / "recipes" / "quickstart.yaml", every=10
    )
    return out["records"][-1]["layers"][LAST]


@pytest.mark.slow
def test_unscaled_branch_kills_the_last_layer_and_the_default_does_not(
    mobilenet_weights: Path,
) -> None:
    # the code before the fix: no scale, the ratio branch at the plain lr (``auto`` would
    # divide it by pi K, the same protection by another way) and the paper's uncentered branch
    # (centered, a step on W leaves the layer's mean mixture where it is)
    old = last_layer_after(
        mobilenet_weights,
        "model.en.ablation.logit_scale=1.0",
        "optim.ratio_lr_scale=1.0",
        "model.en.ablation.centered=false",
    )
    assert old["ratios"][0] < 0.01  # bn ratio: saturated on ln
    new = last_layer_after(mobilenet_weights)
    assert new["ratios"][0] > 0.1
    assert new["grad_fc2"] > 100 * old["grad_fc2"]  # the branch still learns


@pytest.mark.slow
def test_gradient_clipping_keeps_the_last_layer_at_batch_4_and_a_high_lr(
    mobilenet_weights: Path,
) -> None:
    """The gain trap (docs/stability.md): at batch 4, lr 0.01 the new head's gradient norm climbs
    to ~100 in 10 steps and, unclipped, the paper's branch lets the last layer escape onto ln
    (gamma 0) by step ~20, for good; the recipes' ``train.grad_clip: 5`` keeps it on bn."""

    def last(*extra: str) -> dict:
        overrides = [
            f"model.checkpoint={mobilenet_weights}",
            "data.limit_train=1000",
            "data.workers=0",
            "data.batch_size=4",
            "optim.lr=0.01",
            *extra,
        ]
        out = ratio_dynamics.run(
            overrides, steps=30, recipe_path=ROOT / "recipes" / "quickstart.yaml", every=30
        )
        assert max(r["grad_norm"] for r in out["records"]) > 20  # the blow-up, clipped or not
        return out["records"][-1]["layers"][LAST]

    # the paper's branch, unclipped: flipped, its output is beta (the centered branch's W no
    # longer moves the layer's mean mixture, and this run no longer flips it)
    assert last("train.grad_clip=null", "model.en.ablation.centered=false")["ratios"][0] < 0.1
    assert last()["ratios"][0] > 0.5


@pytest.mark.slow
def test_a_minimal_recipe_is_safe_where_the_former_defaults_collapsed(
    mobilenet_weights: Path,
) -> None:
    """Safe by default: from a recipe that names only the model, the data, the batch, the lr and
    the epochs (benchmarks/recipes/minimal.yaml), batch 4 and lr 0.01. With the former
    defaults (no clip, ratio lr scale 0.1) the loss explodes to 40-400 within 20-30 steps (how
    far, and whether layers flip too, depends on the thread count's rounding); with the
    schema's defaults it stays below 10 and every layer stays on its source normalizer."""

    def run(*extra: str) -> dict:
        overrides = [
            f"model.checkpoint={mobilenet_weights}",
            "data.limit_train=1000",
            "data.workers=0",
            "data.batch_size=4",
            "optim.lr=0.01",
            *extra,
        ]
        return ratio_dynamics.run(overrides, steps=40, recipe_path=MINIMAL, every=40)

    former = run("train.grad_clip=null", "optim.ratio_lr_scale=0.1")
    assert max(r["loss"] for r in former["records"]) > 30
    now = run()
    assert not now["flipped"] and max(r["loss"] for r in now["records"]) < 10
