"""Selection benchmark: does EN choose per sample where the right normalizer is known?

Fashion-MNIST at 32 px where half of the training and test images (every other index) carry
a per-image intensity change x -> a x + b (a log-uniform in [1/A, A], b uniform in [-B, B],
on [0, 1] pixels, before the usual mean/std normalization). After the first convolution
instance statistics undo such a change (up to the zero padding at the borders); batch
statistics cannot, so a layer that chooses should give the shifted images more IN (or LN)
than the clean ones. The coded construction (``--construction coded``) gives each clean image
its class's contrast, which instance statistics throw away: BN is then right for the clean
group and IN for the shifted one.

Measured per variant (BN, frozen-statistics BN, SN, EN and EN designs): top-1 on the clean
and on the shifted test images, and per EN layer the AUC with which the per-sample IN ratio
(and IN + LN) tells shifted from clean images (above 0.5: more IN for the shifted ones), the
gap between the groups' mean IN + LN ratio (an AUC can be high on differences of 1e-4: the
gap says whether the choice is one), with the diagnostics of
``enorm inspect`` (ratio and logit spread, saturated hidden units, gammas against the
source's). Two regimes: fine-tuning torchvision's ImageNet MobileNetV2 after conversion
(``enorm fetch`` puts its weights in the cache) and training the same architecture from
scratch. Each run is a plain loop over the public API (``enorm_cli.convert_model``,
``param_groups`` through the schema's ``build_optimizer``, ``set_bn_stats``, the schema's
gradient clip and schedule), from a minimal recipe: model, data, batch, lr, epochs.

    python benchmarks/selection.py --seeds 0 1 2 --json selection.json --figure selection.png
    python benchmarks/selection.py --variants en --regimes finetune --seeds 0 --train 4000
    python benchmarks/selection.py --merge a.json b.json --json all.json --figure all.png
    python benchmarks/selection.py --variants en --regimes scratch --save runs/selection
    python benchmarks/selection.py --construction coded --variants en bn sn bn_routed_first
    python benchmarks/selection.py --ceiling --json ceiling.json
    python benchmarks/selection.py --ceiling --ceiling-budget 125 250 500 1000 --train 4000
    enorm inspect runs/selection/scratch-en-s0.safetensors --data fashion_mnist --shift contrast:5
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _logits_at(multiple: float) -> dict[str, Any]:
    """An AdamW variant with EN's logits (FC2's bias and per-sample weight) at ``multiple`` times
    the lr and the hidden layer at the lr: what ``en_adamw``'s auto resolves to, spelled out."""
    scales = {"ratio_lr_scale": multiple, "sample_lr_scale": multiple, "hidden_lr_scale": 1.0}
    return {"norm": "en", "optim": {"name": "adamw", **scales}}


VARIANTS: dict[str, dict[str, Any]] = {
    "bn": {"norm": "bn", "bn_stats": "batch"},
    "bn_frozen": {"norm": "bn", "bn_stats": "running"},
    "sn": {"norm": "sn"},
    "en": {"norm": "en"},
    # the start forced either way (EN's default, anchored "auto", anchors only untrained sources:
    # from scratch, not fine-tuning)
    "en_anchored": {"norm": "en", "en": {"ablation": {"anchored": True}}},
    "en_unanchored": {"norm": "en", "en": {"ablation": {"anchored": False}}},
    # the paper's uncentered branch with the paper-style start (EN's default before both)
    "en_paper": {"norm": "en", "en": {"ablation": {"centered": False, "anchored": False}}},
    # experiments (design candidates; docs/selection.md, "What was tried")
    "en_paper_rowlr": {
        "norm": "en",
        "en": {"ablation": {"centered": False, "anchored": False}},
        "rowlr": True,
    },
    "en_paper_ratio10": {
        "norm": "en",
        "en": {"ablation": {"centered": False, "anchored": False}},
        "optim": {"ratio_lr_scale": 10.0},
    },
    "en_paper_m0": {
        "norm": "en",
        "en": {"margin": 0.0, "ablation": {"centered": False, "anchored": False}},
    },
    "en_paper_w1000": {
        "norm": "en",
        "en": {"ablation": {"centered": False, "anchored": False}},
        "optim": {"sample_lr_scale": 1000.0},
    },
    "en_sample1": {"norm": "en", "optim": {"sample_lr_scale": 1.0}},
    "en_sample100": {"norm": "en", "optim": {"sample_lr_scale": 100.0}},
    "en_sample1000": {"norm": "en", "optim": {"sample_lr_scale": 1000.0}},
    "en_m0": {"norm": "en", "en": {"margin": 0.0}},
    # the anchored start with faster per-sample terms or a uniform prior (fine-tuning)
    "en_anchored_s1000": {
        "norm": "en",
        "en": {"ablation": {"anchored": True}},
        "optim": {"sample_lr_scale": 1000.0},
    },
    "en_anchored_s3000": {
        "norm": "en",
        "en": {"ablation": {"anchored": True}},
        "optim": {"sample_lr_scale": 3000.0},
    },
    "en_anchored_m0": {"norm": "en", "en": {"margin": 0.0, "ablation": {"anchored": True}}},
    # the branch sees each sample's spread (``_spread_input``), anchored so that IN carries a
    # feature to choose
    "en_spread": {"norm": "en", "en": {"ablation": {"anchored": True}}, "spread": True},
    # the layer's mean mixture (FC2's bias, the whole branch but W) at a tenth of the lr, W at
    # its default rate: the per-sample term moves first
    "en_slowmean": {"norm": "en", "optim": {"ratio_lr_scale": 0.1, "sample_lr_scale": 300.0}},
    "en_slowmean100": {
        "norm": "en",
        "optim": {"ratio_lr_scale": 0.01, "sample_lr_scale": 300.0},
    },
    "en_spread_slowmean": {
        "norm": "en",
        "en": {"ablation": {"anchored": True}},
        "spread": True,
        "optim": {"ratio_lr_scale": 0.1, "sample_lr_scale": 300.0},
    },
    # the branch's hidden layer (FC1 and the conv) learns with FC2's weight, at the sample lr:
    # at the ratio lr, and with a gradient that passes through W (0 at the start), it stays
    # near its random start
    "en_fasthidden": {"norm": "en", "fasthidden": True},
    # the mean mixture (every ratio parameter but FC2's weight) held for the first epoch, so the
    # layers after an anchored layer learn from its source normalizer's output (BN's) while the
    # per-sample term may already move samples apart
    "en_warm": {"norm": "en", "warm_epochs": 1},
    "en_warm_fasthidden": {"norm": "en", "warm_epochs": 1, "fasthidden": True},
    "en_warm2": {"norm": "en", "warm_epochs": 2},
    # an eighth, a quarter and half of an epoch, and the first epoch for the early layers only
    # (features.0-4)
    "en_warm_eighth": {"norm": "en", "warm_epochs": 0.125},
    "en_warm_quarter": {"norm": "en", "warm_epochs": 0.25},
    "en_warm_half": {"norm": "en", "warm_epochs": 0.5},
    "en_warm_early": {"norm": "en", "warm_epochs": 1, "warm_layers": r"^features\.[0-4]\."},
    # the first layer alone held for the first epoch: where runs that do not route send every
    # image to IN early on, while the layers after it are still forming
    "en_warm_first": {"norm": "en", "warm_epochs": 1, "warm_layers": r"^features\.0\."},
    # held for the whole run (4 epochs from scratch): in the first layer only, where the shift
    # lives, or everywhere; a held layer's mean stays at its source, so only the per-sample term
    # can give an image another normalizer
    "en_hold_first": {"norm": "en", "warm_epochs": 4, "warm_layers": r"^features\.0\."},
    "en_hold_all": {"norm": "en", "warm_epochs": 4},
    # the anchored start released: the mixing offset that makes a converted layer exactly its
    # source shrinks linearly to 0 over the first epoch (or quarter), so every layer ends at
    # its ratios (the prior: 10% IN, 10% LN, each with the source's gamma) and the network
    # adapts to it as it goes; exact until the first step, as SN's start is not
    "en_release": {"norm": "en", "en": {"ablation": {"anchored": True}}, "release_epochs": 1},
    "en_release_quarter": {
        "norm": "en",
        "en": {"ablation": {"anchored": True}},
        "release_epochs": 0.25,
    },
    # control for the hooks: EN as shipped on the autograd reference path they patch
    "en_reference": {"norm": "en", "reference_path": True},
    # Gaussian noise of this sd on every sample's ratio logits in training forwards
    "en_noise1": {"norm": "en", "logit_noise": 1.0},
    "en_noise2": {"norm": "en", "logit_noise": 2.0},
    "en_noise05": {"norm": "en", "logit_noise": 0.5},
    # annealed: from 1 down to 0 over the first two epochs
    "en_noise1_anneal": {"norm": "en", "logit_noise": 1.0, "noise_epochs": 2},
    # every training sample runs one EN layer, drawn uniformly, on one normalizer, drawn
    # uniformly; its loss against the mixture's is the ratio branch's reward (score function,
    # ``explore_step``), this many times the loss's weight
    "en_explore": {"norm": "en", "explore": 1.0},
    "en_explore01": {"norm": "en", "explore": 0.1},
    # at 1/52, a switched sample's score weighs what its loss does (plain REINFORCE)
    "en_explore002": {"norm": "en", "explore": 0.02},
    # the advantage not centered (each layer's ratios collapse onto one normalizer), and the
    # exploration alone (no reward): what the switches cost top-1
    "en_explore_raw": {"norm": "en", "explore": 1.0, "explore_centered": False},
    "en_explore0": {"norm": "en", "explore": 0.0},
    # each image's loss under every normalizer of one layer (paired, not sampled), its
    # expectation under the ratios the branch's signal (``paired_step``), at a tenth of the
    # weight of ``en_explore``
    "en_pair": {"norm": "en", "explore": 0.1, "paired": True},
    # the same with the switches in the training forward (``en_explore0``'s), so that the layers
    # after an image's layer read its other normalizers and the pair reads what a switch is worth
    "en_pair_switch": {"norm": "en", "explore": 0.1, "paired": True, "switch": True},
    # the branch's hidden layer (conv, FC1) at 100 times the ratio lr under SGD: at the ratio lr
    # its gradient passes through the per-sample weight and it moves by 0.3% in a run (median
    # layer), so the branch reads the groups through random features; AdamW moves it by 15-23%
    "en_hidden100": {"norm": "en", "optim": {"hidden_lr_scale": 100.0}},
    # AdamW (the lr from --lr): EN as shipped (``en_adamw``: its logits at 0.02 a step within 1-10
    # times the lr, the hidden layer at the lr), and with the ratio branch at the lr and the
    # per-sample weight at 10 or 30 times it
    "bn_adamw": {"norm": "bn", "bn_stats": "batch", "optim": {"name": "adamw"}},
    "sn_adamw": {"norm": "sn", "optim": {"name": "adamw"}},
    "en_adamw": {"norm": "en", "optim": {"name": "adamw"}},
    "en_adamw_s10": {
        "norm": "en",
        "optim": {"name": "adamw", "ratio_lr_scale": 1.0, "sample_lr_scale": 10.0},
    },
    "en_adamw_s30": {
        "norm": "en",
        "optim": {"name": "adamw", "ratio_lr_scale": 1.0, "sample_lr_scale": 30.0},
    },
    # the whole branch (the mean mixture and the per-sample weight) at 10 times the lr, as BIN
    # gives its gates
    "en_adamw_r10": {
        "norm": "en",
        "optim": {"name": "adamw", "ratio_lr_scale": 10.0, "sample_lr_scale": 10.0},
    },
    # the logits (FC2: the mean mixture and the per-sample weight) at 10 times the lr, the hidden
    # layer (the conv and FC1) at the lr: ``en_adamw`` up to lr 0.002 since
    # ``optim.hidden_lr_scale`` (``logit_multiple``), spelled out; at 10 times (r10) an Adam step
    # of 0.05 (lr 0.005) grows FC1 until tanh saturates
    "en_adamw_f10": _logits_at(10.0),
    # the logits at 4 and 2 times the lr (the hidden layer at the lr): ``en_adamw`` at lr 0.005
    # and 0.01, 0.02 a step; at 0.01 ten times threw most layers' mixtures onto one normalizer
    "en_adamw_f4": _logits_at(4.0),
    "en_adamw_f2": _logits_at(2.0),
    # ``en_adamw`` before that: the whole branch at the lr
    "en_adamw_r1": {
        "norm": "en",
        "optim": {"name": "adamw", "ratio_lr_scale": 1.0, "sample_lr_scale": 1.0},
    },
    # references, not EN: BatchNorm with the first norm layer (where the shift lives) replaced by
    # InstanceNorm for every image, or routed by the known group (IN for the shifted images, BN
    # for the clean): what choosing by group is worth, and so what the loss asks of a branch
    "bn_in_first": {"norm": "bn", "route": "in"},
    "bn_routed_first": {"norm": "bn", "route": "group"},
}
"""Each variant: ``model.norm``, and optionally ``bn_stats``, ``en`` (recipe keys under
``model.en``), ``optim`` (recipe keys), the experiments' switches ``rowlr``, ``spread``,
``fasthidden``, ``warm_epochs``, ``warm_layers``, ``release_epochs``, ``logit_noise`` and
``noise_epochs``, ``reference_path``, ``explore`` (the reward's weight), ``explore_centered``,
``paired``, ``switch``, and the references' ``route``."""
DEFAULT_VARIANTS = ("bn", "bn_frozen", "sn", "en")
"""What the benchmark compares; the others are design candidates, run by name."""
REGIMES = ("finetune", "scratch")
EPOCHS = (2, 4)
"""Epochs per regime (``--epochs``'s default); the budget ceiling's schedule has as many."""
LRS = (0.01, 0.05)
"""The lr per regime (``--lr``'s default)."""
CONTRAST, OFFSET = 3.0, 0.5
"""a in [1/3, 3] (log-uniform), b in [-0.5, 0.5]."""
CODED_CONTRAST = 2.0
"""The coded construction: the clean group's contrast is its class's, 2^(2 y / 9 - 1), in
[1/2, 2]."""
CONSTRUCTIONS = ("shift", "coded")
"""``shift``: the clean group as Fashion-MNIST gives it (IN costs it nothing measurable, so
the known answer is IN for the shifted images and either for the clean ones); ``coded``: the
clean group's contrast carries its class, which IN throws away, so BN is right for it and IN
for the shifted group."""
STRONG_CONTRAST, STRONG_OFFSET = 1.5, 0.2
"""A shift is strong when a is outside [1/1.5, 1.5] or |b| > 0.2 (86% of the shifted
images): the rest are close to clean images, and no reading of a sample can tell them."""
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def shifted_split(
    train: bool, limit: int, seed: int = 0, construction: str = "shift"
) -> dict[str, Any]:
    """Fashion-MNIST images (N x 3 x 32 x 32, normalized), labels, and the shifted mask (every
    other index); the shift of each image is drawn from a generator fixed by the split, so
    every run and variant sees the same images. ``construction`` (``CONSTRUCTIONS``) says what
    the clean group is."""
    import torch
    from torchvision.datasets import FashionMNIST

    from enorm_cli.cache import data_dir

    data = FashionMNIST(str(data_dir()), train=train, download=False)
    g = torch.Generator().manual_seed(1000 + seed + (0 if train else 1))
    index = torch.randperm(len(data), generator=g)[:limit]
    x = data.data[index].float().div(255.0)  # N x 28 x 28
    x = torch.nn.functional.pad(x, (2, 2, 2, 2)).unsqueeze(1).expand(-1, 3, -1, -1).clone()
    n = x.shape[0]
    shifted = torch.arange(n) % 2 == 1
    a = torch.exp((torch.rand(n, generator=g) * 2 - 1) * math.log(CONTRAST))
    b = (torch.rand(n, generator=g) * 2 - 1) * OFFSET
    y = data.targets[index]
    clean_a = torch.ones(n)
    if construction == "coded":
        clean_a = torch.exp(math.log(CODED_CONTRAST) * (2 * y.float() / 9 - 1))
    a, b = torch.where(shifted, a, clean_a), torch.where(shifted, b, 0.0)
    x = x * a.view(-1, 1, 1, 1) + b.view(-1, 1, 1, 1)
    x = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    return {"x": x, "y": y, "shifted": shifted, "a": a, "b": b, "construction": construction}


def strong_shift(data: dict[str, Any]) -> Any:
    """The shifted images whose shift is strong (``STRONG_CONTRAST``, ``STRONG_OFFSET``)."""
    a, b = data["a"], data["b"]
    strong = (a.log().abs() > math.log(STRONG_CONTRAST)) | (b.abs() > STRONG_OFFSET)
    return data["shifted"] & strong


def detector_ceiling(
    construction: str = "shift",
    train: int = 8000,
    test: int = 2000,
    seed: int = 0,
    steps: int = 3000,
    batch: int = 64,
    budget: str | None = None,
    lr: float = 0.05,
) -> dict[str, float]:
    """Whether the ratio branch can tell shifted from clean images at all: a fresh EN layer
    (the defaults) on the first EN layer's input (MobileNetV2's first convolution, random as
    from scratch and with the ImageNet weights as fine-tuning), its branch alone trained, with
    Adam on batches of ``batch`` in training mode, so that the logit of IN minus that of BN
    predicts the group; the test AUC of that score, over all shifted images and over the
    strong shifts; and, from the random convolution, FC2 alone trained on the hidden layer's
    random start (``scratch_readout``). High: the branch's input and capacity suffice, and what
    a trained model shows is what its loss asked of the branch.

    ``budget`` (a regime): that regime's first convolution only, the branch trained as a run
    of the regime trains it (the recipe's optimizer groups at ``lr``, its schedule over
    ``steps`` and its gradient clip): the most a run of that many steps could show if its loss
    asked for nothing but the group."""
    import torch
    from torchvision.models import mobilenet_v2

    from enorm_cli import ExemplarNorm2d
    from enorm_cli.cache import assets_dir
    from enorm_cli.finetune.optim import build_optimizer, build_scheduler

    tr = shifted_split(True, train, construction=construction)
    te = shifted_split(False, test, construction=construction)
    keep = ~te["shifted"] | strong_shift(te)
    out: dict[str, float] = {}
    starts = [("scratch", "branch"), ("scratch", "readout"), ("finetune", "branch")]
    for start, trained in [(budget, "branch")] if budget else starts:
        torch.manual_seed(seed)
        net = mobilenet_v2()
        if start == "finetune":
            weights = assets_dir() / "mobilenet_v2-b0353104.pth"
            net.load_state_dict(torch.load(weights, weights_only=True))
        conv = net.features[0][0]
        with torch.no_grad():
            x_tr, x_te = conv(tr["x"]), conv(te["x"])
        layer = ExemplarNorm2d(x_tr.shape[1], ("bn", "in", "ln"))

        def in_over_bn(x: Any) -> Any:
            logits = layer.branch(x).logits
            return logits[:, 1] - logits[:, 0]

        # "readout": FC2 alone, the hidden layer left at its random start
        params = layer.ratio.parameters() if trained == "branch" else layer.ratio.fc2.parameters()
        scheduler, clip = None, None
        if budget:
            epochs = EPOCHS[REGIMES.index(budget)]
            recipe = recipe_for(budget, "en", batch, lr, epochs)
            optimizer = build_optimizer(layer, recipe)
            scheduler = build_scheduler(optimizer, recipe, max(steps // epochs, 1))
            clip = recipe.train.grad_clip
        else:
            optimizer = torch.optim.Adam(params, 3e-3)
        g = torch.Generator().manual_seed(seed)
        for step in range(steps):
            idx = torch.randint(len(x_tr), (batch,), generator=g)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(
                in_over_bn(x_tr[idx]), tr["shifted"][idx].float()
            )
            optimizer.zero_grad()
            loss.backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(layer.parameters(), clip)
            optimizer.step()
            if scheduler is not None:
                scheduler.step_update(step + 1)
        with torch.no_grad():
            score = torch.cat([in_over_bn(x_te[i : i + batch]) for i in range(0, len(x_te), batch)])
        name = start if trained == "branch" else f"{start}_{trained}"
        out[name] = auc(score, te["shifted"])
        out[name + "_strong"] = auc(score[keep], te["shifted"][keep])
    return out


def recipe_for(regime: str, variant: str, batch: int, lr: float, epochs: int) -> Any:
    """The minimal recipe of a run: model, data, batch, lr, epochs (and the variant's norm)."""
    from enorm_cli.cache import assets_dir
    from enorm_cli.config.recipe import Recipe

    spec = VARIANTS[variant]
    model: dict[str, Any] = {"name": "torchvision:mobilenet_v2", "num_classes": 10}
    if regime == "finetune":
        model["checkpoint"] = str(assets_dir() / "mobilenet_v2-b0353104.pth")
    else:
        model["pretrained"] = False
    model["norm"] = spec["norm"]
    if "bn_stats" in spec:
        model["bn_stats"] = spec["bn_stats"]
    if "en" in spec:
        model["en"] = spec["en"]
    return Recipe.model_validate(
        {
            "model": model,
            "data": {"kind": "fashion_mnist", "image_size": 32, "batch_size": batch},
            "optim": {"lr": lr, **spec.get("optim", {})},
            "schedule": {"epochs": epochs},
        }
    )


def build(recipe: Any, regime: str) -> Any:
    """The run's model: the source (ImageNet weights or random), converted where EN/SN."""
    import enorm_cli
    from enorm_cli.models import create_source_model

    checkpoint = Path(recipe.model.checkpoint) if recipe.model.checkpoint else None
    _, model = create_source_model(recipe.model.name, False, checkpoint, 10)
    if recipe.model.norm != "bn":
        model = enorm_cli.convert_model(model, recipe.model.settings)
    return model


def _route_first_norm(model: Any, route: str) -> Any:
    """A reference run's first norm layer: per image its BatchNorm, or an InstanceNorm with the
    same affine (``route``: "in" for every image, "group" for the images the module's ``mask``
    marks, which the loop sets before each forward); returns the module."""
    import torch

    bn = model.features[0][1]

    class Routed(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn, self.route = bn, route
            self.mask: Any = None

        def instance(self, x: Any) -> Any:
            """InstanceNorm with the BN layer's affine."""
            xin = torch.nn.functional.instance_norm(x, eps=self.bn.eps)
            return xin * self.bn.weight.view(1, -1, 1, 1) + self.bn.bias.view(1, -1, 1, 1)

        def forward(self, x: Any) -> Any:
            xin = self.instance(x)
            if self.route == "in":
                return xin
            keep = self.mask.view(-1, 1, 1, 1).to(x.device)
            return torch.where(keep, xin, self.bn(x))

    model.features[0][1] = routed = Routed()
    return routed


def _row_lr(model: Any) -> None:
    """Experiment: each gamma row's gradient times (lambda_src / lambda_k)^2 at the prior."""
    import torch

    import enorm_cli

    for m in model.modules():
        if isinstance(m, enorm_cli.ExemplarNorm2d):
            prior = torch.softmax(m.ratio.fc2.bias.detach(), 0)
            scale = (prior.max() / prior).square().view(-1, 1)
            m.weight.register_hook(lambda g, s=scale: g * s.to(g))


@contextlib.contextmanager
def _spread_input() -> Iterator[None]:
    """Experiment, inside the block: IN's row of the ratio branch's input (the pooled IN output,
    always 0) becomes the sample's log spread against the batch's, log(sigma_in / sigma_bn) per
    channel, which a contrast change moves and the paper's pooled input cannot show. On the
    autograd reference path: the C++ kernel and the fused node's hand-written backward compute
    the paper's input."""
    import torch

    from enorm_cli.layers import exemplar_function as ef

    stats, logits = ef.stacked_stats, ef.ratio_logits
    seen: dict[str, Any] = {}

    def stacked(cfg: Any, m: Any, v: Any, p: Any, count: int) -> Any:
        out = stats(cfg, m, v, p, count)
        seen.update(names=cfg.normalizers, eps=cfg.eps, var=out[1].clone())  # before rsqrt_
        return out

    def spread_logits(xhat: Any, *args: Any) -> Any:
        names = seen["names"]
        if "in" in names and "bn" in names:
            i, b = names.index("in"), names.index("bn")
            var = seen["var"] + seen["eps"]
            row = 0.5 * (var[i].log() - var[b].log())
            xhat = torch.cat([xhat[:i], row.unsqueeze(0), xhat[i + 1 :]])
        return logits(xhat, *args)

    ef.stacked_stats, ef.ratio_logits = stacked, spread_logits
    try:
        with _reference_path():
            yield
    finally:  # the next run of the process measures the layer as shipped
        ef.stacked_stats, ef.ratio_logits = stats, logits


@contextlib.contextmanager
def _reference_path() -> Iterator[None]:
    """Inside the block EN runs on the autograd reference path, where a patched
    ``exemplar_function`` takes effect: the C++ kernel and the fused node's hand-written
    backward compute the layer as shipped (``fused_en``, and ``ENORM_NATIVE=0``)."""
    from enorm_cli import layers

    native = os.environ.get("ENORM_NATIVE")
    os.environ["ENORM_NATIVE"] = "0"
    try:
        with layers.fused_en(False):
            yield
    finally:
        if native is None:
            os.environ.pop("ENORM_NATIVE", None)
        else:
            os.environ["ENORM_NATIVE"] = native


NOISE = {"sigma": 0.0}
"""The logit noise of a training forward (``_noisy_logits``): 0 outside one."""


@contextlib.contextmanager
def _noisy_logits() -> Iterator[None]:
    """Experiment, inside the block: in a training forward (``NOISE["sigma"]`` > 0, set by
    ``run`` around it) every sample's ratio logits get their own Gaussian noise, so that the
    layers after an EN layer see each image under more than one normalizer and the loss can
    tell which one it gains from (exploration, as in noisy gating); evaluation and the loss
    preference read the ratios without it."""
    import torch

    from enorm_cli.layers import exemplar_function as ef

    logits = ef.ratio_logits

    def noisy(*args: Any) -> Any:
        out = logits(*args)
        if not NOISE["sigma"]:
            return out
        return (out[0] + NOISE["sigma"] * torch.randn_like(out[0]), *out[1:])

    ef.ratio_logits = noisy
    try:
        with _reference_path():
            yield
    finally:
        ef.ratio_logits = logits


EXPLORE: dict[str, Any] = {"mask": None, "choice": None, "record": False, "layer": 0, "taken": []}
"""A training forward's exploration (``_explored_mixing``): ``mask`` (N x layers) marks the EN
layers (in module order) where a sample runs on one normalizer instead of its mixture,
``choice`` (N x layers) which one; ``record``: no switch, the marked layers' lambda only read;
``layer``: the index of the EN layer running now (set by a hook); ``taken`` collects each
marked layer's (index, lambda, rows, choice) in a forward with gradients. ``mask`` is None
outside one."""


@contextlib.contextmanager
def _explored_mixing() -> Iterator[None]:
    """Experiment, inside the block: in a training forward that ``EXPLORE`` sets up, a sample runs
    an EN layer on a single normalizer (a whole switch) instead of its mixture, so that the
    layers after it learn to read every normalizer's output and the loss tells what the switch
    is worth to that image (``explore_step``); evaluation, the recorder and the loss preference
    read the mixture."""
    import torch

    from enorm_cli.layers import exemplar_function as ef

    mixing = ef.mixing_weights

    def explored(lam: Any, offset: Any) -> Any:
        w = mixing(lam, offset)
        if EXPLORE["mask"] is None:
            return w
        j = EXPLORE["layer"]
        rows = EXPLORE["mask"][:, j].to(w.device)
        if not bool(rows.any()):
            return w
        choice = EXPLORE["choice"][:, j].to(w.device)
        # a forward with gradients, not a centered branch's first read of its hidden mean
        if torch.is_grad_enabled():
            EXPLORE["taken"].append((j, lam, rows, choice))
        if EXPLORE["record"]:  # the mixture itself, its lambda read
            return w
        hard = torch.nn.functional.one_hot(choice, w.shape[1]).to(w)
        return torch.where(rows.view(-1, 1), hard, w)

    ef.mixing_weights = explored
    try:
        with _reference_path():
            yield
    finally:
        ef.mixing_weights = mixing
        EXPLORE.update(mask=None, choice=None, record=False, layer=0, taken=[])


def explore_step(
    model: Any,
    x: Any,
    y: Any,
    baseline: Any,
    weight: float,
    g: Any,
    centered: bool = True,
) -> Any:
    """The training loss of an explored step (inside ``_explored_mixing``): every sample switches
    one EN layer, drawn uniformly, to one normalizer, drawn uniformly. Without a reward
    (``weight`` 0) that is all: the layers after a switch learn to read every normalizer's
    output, and the branch learns from the loss's gradient as it does without exploration (not
    at a switched sample, whose mixture is not used). With one, a switch's advantage is its
    loss so minus its loss under the mixture (a forward without gradients, with the same
    dropout and the running statistics put back); the ratio branch gets ``weight`` x the
    advantage x log lambda of the normalizer it ran, per layer scaled as if every sample had
    explored every layer: a worse switch pushes that normalizer's ratio down for that image, a
    better one up. The score function sees the whole switch, which the loss's gradient does not
    (docs/selection.md). ``baseline``: layers x normalizers (float64, NaN where unseen), the
    running mean (momentum 0.9) of each switch's advantage, updated in place; ``centered``
    subtracts it from the advantage first: then only how an image's switch compares with other
    images' moves its ratios, not the layer's mean mixture, which the loss's gradient sets."""
    import torch

    n = len(y)
    layers, normalizers = baseline.shape
    layer = torch.randint(layers, (n,), generator=g)
    mask = layer.view(-1, 1) == torch.arange(layers)
    choice = torch.randint(normalizers, (n,), generator=g).view(-1, 1).expand(n, layers)
    base = _losses_without_a_trace(model, x, y) if weight else None
    with _switched(model, mask, choice) as taken:
        per_sample = torch.nn.functional.cross_entropy(model(x), y, reduction="none")
    loss = per_sample.mean()
    if base is None or not taken:
        return loss
    advantage = (per_sample.detach() - base).double()
    score = 0.0
    for j, lam, rows, choice in taken:
        k, gain = choice[rows], advantage[rows]
        if centered:
            seen = baseline[j, k]
            gain = gain - torch.where(seen.isnan(), gain, seen)
            for c in k.unique():
                baseline[j, c] = _follow(baseline[j, c], advantage[rows][k == c].mean())
        score = score + (gain.to(lam) * lam[rows, k].clamp_min(1e-12).log()).sum()
    return loss + _branch_term(model, weight * score * layers / n)


def _follow(running: Any, new: Any) -> Any:
    """A running mean (momentum 0.9) after ``new``; ``new`` itself where it was unseen (NaN)."""
    import torch

    return torch.where(running.isnan(), new, 0.9 * running + 0.1 * new)


@contextlib.contextmanager
def _switched(model: Any, mask: Any, choice: Any, record: bool = False) -> Iterator[list[Any]]:
    """Inside the block a forward of ``model`` runs ``EXPLORE``'s switches (``mask``, ``choice``:
    N x layers; ``record``: read lambda, switch nothing); yields the list of what it took."""
    from enorm_cli import ExemplarNorm2d

    EXPLORE.update(mask=mask, choice=choice, record=record, layer=0, taken=[])
    layers = [m for m in model.modules() if isinstance(m, ExemplarNorm2d)]
    hooks = [
        m.register_forward_pre_hook(lambda mod, args, j=j: EXPLORE.update(layer=j))
        for j, m in enumerate(layers)
    ]
    try:
        yield EXPLORE["taken"]
    finally:
        EXPLORE.update(mask=None, choice=None, record=False, layer=0, taken=[])
        for h in hooks:
            h.remove()


def _losses_without_a_trace(model: Any, x: Any, y: Any) -> Any:
    """Per-sample losses of a training-mode forward without gradients that leaves no trace: the
    running statistics (and a centered branch's hidden mean) put back, the random state (the
    dropout's masks) as before it, so the next forward draws the same."""
    import torch

    buffers = [b.clone() for b in model.buffers()]
    rng = torch.get_rng_state()
    with torch.no_grad():
        out = torch.nn.functional.cross_entropy(model(x), y, reduction="none")
    for b, saved in zip(model.buffers(), buffers, strict=True):
        b.copy_(saved)
    torch.set_rng_state(rng)
    return out


def paired_step(
    model: Any, x: Any, y: Any, baseline: Any, weight: float, g: Any, switched: bool = False
) -> Any:
    """The training loss of a paired step (inside ``_explored_mixing``): each image gets one EN
    layer, drawn uniformly, and its loss with that layer run on each normalizer alone, every
    other layer as it is (K forwards without gradients, no sampling): L_ik, what each whole
    switch is worth to it. The training forward is the mixture's; the branch of the image's
    layer gets ``weight`` x the gradient of sum_k lambda_k (L_ik - b_k), b the running mean
    (momentum 0.9) of L_ik over images per layer and normalizer (``baseline``, updated in
    place), scaled as if every image had been read at every layer: the expected loss of a
    whole switch drawn from its ratios, less what every image would gain from it, so that only
    how an image's switches compare with other images' moves its ratios. ``switched``: the
    training forward runs each image's layer on one normalizer, drawn uniformly, instead of its
    mixture (``explore_step``'s switches), so that the layers after it learn to read every
    normalizer's output and the paired losses come to say what a switch is worth."""
    import torch

    n = len(y)
    layers, normalizers = baseline.shape
    layer = torch.randint(layers, (n,), generator=g)
    mask = layer.view(-1, 1) == torch.arange(layers)
    losses = []
    for k in range(normalizers):
        with _switched(model, mask, torch.full((n, layers), k)):
            losses.append(_losses_without_a_trace(model, x, y))
    switch = torch.stack(losses, 1).double()  # N x K
    if switched:
        choice = torch.randint(normalizers, (n,), generator=g).view(-1, 1).expand(n, layers)
    else:
        choice = torch.zeros(n, layers, dtype=torch.long)
    with _switched(model, mask, choice, record=not switched) as taken:
        loss = torch.nn.functional.cross_entropy(model(x), y)
    surrogate = 0.0
    for j, lam, rows, _ in taken:
        mean = switch[rows].mean(0)
        rel = switch[rows] - torch.where(baseline[j].isnan(), mean, baseline[j])
        baseline[j] = _follow(baseline[j], mean)
        surrogate = surrogate + (lam[rows] * rel.to(lam)).sum()
    if not taken or not weight:
        return loss
    return loss + _branch_term(model, weight * surrogate * layers / n)


def _branch_term(model: Any, term: Any) -> Any:
    """A term whose gradient is ``term``'s with respect to the EN layers' parameters. lambda
    lives in each layer's inner graph (``fused_affine``), which the loss's backward walks
    once: the gradient is taken now and joins the loss as <p, g>, whose gradient is g. It
    reaches the layers' parameters only, not the layers before them."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
    return sum((p * g).sum() for p, g in zip(params, grads, strict=True) if g is not None)


def auc(scores: Any, positive: Any) -> float:
    """Area under the ROC curve of ``scores`` for ``positive`` (Mann-Whitney, ties halved)."""
    import torch

    scores = scores.double()
    pos, neg = scores[positive], scores[~positive]
    if not len(pos) or not len(neg):
        return float("nan")
    greater = (pos.view(-1, 1) > neg.view(1, -1)).double().mean()
    ties = (pos.view(-1, 1) == neg.view(1, -1)).double().mean()
    return float(greater + 0.5 * ties) if torch.isfinite(scores).all() else float("nan")


@contextlib.contextmanager
def _fast_hidden() -> Iterator[None]:
    """Experiment, inside the block: a centered EN branch's FC1 and conv join FC2's weight in
    the per-sample group (``sample_parameters``, ``optim.sample_lr_scale``)."""
    from enorm_cli import ExemplarNorm2d

    shipped = ExemplarNorm2d.sample_parameters

    def sample_parameters(self: Any) -> list[Any]:
        extra = [*self.ratio.fc1.parameters()]
        if self.ratio.conv is not None:
            extra += [*self.ratio.conv.parameters()]
        return shipped(self) + extra if self.centered else shipped(self)

    ExemplarNorm2d.sample_parameters = sample_parameters  # type: ignore[method-assign]
    try:
        yield
    finally:
        ExemplarNorm2d.sample_parameters = shipped  # type: ignore[method-assign]


def _small_move(
    model: Any,
    modules: list[Any],
    own: Callable[[Any, Any], tuple[Any, Any]],
    data: dict[str, Any],
    limit: int,
    setup: Callable[[int, int], None] | None = None,
) -> list[Any]:
    """Per module and sample, <dL/dY, Y_bn> - <dL/dY, Y_in> on the first ``limit`` images,
    dL/dY the gradient at the module's output, ``own(module, x)`` its (Y_bn, Y_in) from its
    input; ``setup(i, end)`` prepares each batch. The layers after a module get a copy of its
    output: an in-place activation (MobileNetV2's ReLU6) on the output itself would make its
    gradient the activation's output gradient, not Y's."""
    import torch

    seen: dict[int, tuple[Any, Any]] = {}

    def keep(mod: Any, args: Any, out: Any) -> Any:
        seen[id(mod)] = (args[0], out)
        return out.clone()

    hooks = [m.register_forward_hook(keep) for m in modules]
    rows: list[list[Any]] = [[] for _ in modules]
    try:
        for i in range(0, min(limit, len(data["y"])), 256):
            end = min(i + 256, limit)
            if setup is not None:
                setup(i, end)
            with torch.enable_grad():
                out = model(data["x"][i:end])
                loss = torch.nn.functional.cross_entropy(out, data["y"][i:end], reduction="sum")
                grads = torch.autograd.grad(loss, [seen[id(m)][1] for m in modules])
            with torch.no_grad():
                for row, m, g in zip(rows, modules, grads, strict=True):
                    y_bn, y_in = own(m, seen[id(m)][0])
                    row.append((g.double() * (y_bn - y_in)).sum((1, 2, 3)))
    finally:
        for h in hooks:
            h.remove()
    return [torch.cat(row) for row in rows]


def loss_preference(model: Any, data: dict[str, Any], limit: int = 1024) -> list[Any]:
    """What the loss asks of each EN layer, per sample: <dL/dY, Y_bn> - <dL/dY, Y_in>, with
    Y_k = gamma_k xhat_k + beta_k each normalizer's own output (above 0: moving a sample's
    mixing weight from BN to IN would lower its loss), in evaluation mode (BN's running
    statistics) on the first ``limit`` images; one N-vector per EN layer, in module order. It
    does not depend on the ratios the layer has now: a branch trained on the loss can only
    separate what this separates. Read on a copy: under autograd a centered branch would move
    its running mean of h, and the model may still be training."""
    import copy

    from enorm_cli import ExemplarNorm2d

    model = copy.deepcopy(model).eval()
    layers = [m for m in model.modules() if isinstance(m, ExemplarNorm2d)]

    def own(m: Any, x: Any) -> tuple[Any, Any]:
        return _own_output(m, x.double(), "bn"), _own_output(m, x.double(), "in")

    return _small_move(model, layers, own, data, limit)


def routed_preference(model: Any, routed: Any, data: dict[str, Any], limit: int = 1024) -> Any:
    """``loss_preference`` at a reference's first norm layer (``_route_first_norm``): per
    sample, <dL/dY, Y_bn> - <dL/dY, Y_in> with BN's running statistics and IN's own, both with
    that layer's affine, the model run as it was trained (routed by group, or IN for every
    image). What the loss asks of a first layer once the layers after it have learned behind a
    routed one (above 0: more IN would lower the image's loss)."""

    def setup(i: int, end: int) -> None:
        routed.mask = data["shifted"][i:end]

    def own(m: Any, x: Any) -> tuple[Any, Any]:
        return m.bn(x), m.instance(x)

    model.eval()
    return _small_move(model, [routed], own, data, limit, setup)[0]


def _switch_losses(
    model: Any, data: dict[str, Any], limit: int, use: Callable[[str, int], None]
) -> Any:
    """Per sample, the loss with a first layer BN minus with it IN, ``use(name, n)`` setting
    that layer up for a batch of n images, in evaluation mode without gradients."""
    import torch

    rows = []
    with torch.no_grad():
        for i in range(0, min(limit, len(data["y"])), 256):
            end = min(i + 256, limit)
            x, y = data["x"][i:end], data["y"][i:end]
            loss = {}
            for name in ("bn", "in"):
                use(name, len(y))
                loss[name] = torch.nn.functional.cross_entropy(model(x), y, reduction="none")
            rows.append((loss["bn"] - loss["in"]).double())
    return torch.cat(rows)


def routed_full_preference(model: Any, routed: Any, data: dict[str, Any], limit: int = 1024) -> Any:
    """Per sample, the loss with a reference's first norm layer BN for every image minus the
    loss with it IN for every image, the layers after it as trained: what a whole switch of
    that layer gains each image (above 0: IN lowers the image's loss), where
    ``routed_preference`` reads a small move."""
    import torch

    def use(name: str, n: int) -> None:
        routed.mask = torch.full((n,), name == "in")

    model.eval()
    route = routed.route
    routed.route = "group"  # the mask decides, also for the IN-first reference
    try:
        return _switch_losses(model, data, limit, use)
    finally:
        routed.route = route


def _own_output(m: Any, x: Any, name: str) -> Any:
    """An EN layer's normalizer ``name`` ("bn": running statistics, "in": the sample's own)
    alone with its affine, gamma_k xhat_k + beta_k, in x's dtype."""
    from enorm_cli.layers.statistics import instance_stats

    if name == "bn":
        mean, var = m.running_mean.view(1, -1, 1, 1), m.running_var.view(1, -1, 1, 1)
    else:
        inst = instance_stats(x)
        mean, var = inst.mean[..., None, None], inst.var[..., None, None]
    k = m.normalizers.index(name)
    gain, shift = m.weight[k].view(1, -1, 1, 1), m.bias[k].view(1, -1, 1, 1)
    return gain.to(x) * (x - mean.to(x)) / (var.to(x) + m.eps).sqrt() + shift.to(x)


def en_switch_preference(model: Any, data: dict[str, Any], limit: int = 1024) -> Any:
    """``routed_full_preference`` at EN's first layer: per sample, the loss with that layer's
    output its BN normalizer's alone minus with it IN's alone (``_own_output``; the other
    layers as trained), read on a copy in evaluation mode. Above 0: a whole switch to IN
    lowers the image's loss."""
    import copy

    from enorm_cli import ExemplarNorm2d

    model = copy.deepcopy(model).eval()
    m = next(m for m in model.modules() if isinstance(m, ExemplarNorm2d))
    chosen = {"name": "bn"}

    def use(name: str, n: int) -> None:
        chosen["name"] = name

    hook = m.register_forward_hook(lambda mod, args, out: _own_output(m, args[0], chosen["name"]))
    try:
        return _switch_losses(model, data, limit, use)
    finally:
        hook.remove()


def group_t(values: Any, positive: Any) -> float:
    """The gap between the groups' means of ``values`` in standard errors (Welch's t)."""
    pos, neg = values[positive], values[~positive]
    se = (pos.var() / len(pos) + neg.var() / len(neg)).sqrt()
    return float((pos.mean() - neg.mean()) / se)


def group_gaps(model: Any, test: dict[str, Any], limit: int = 512) -> list[float]:
    """Per EN layer, how much more IN + LN the shifted images get than the clean ones
    (``gap_in_ln``) on the first ``limit`` test images, read in evaluation mode on a copy: when
    in training a run starts to route, and where."""
    import copy

    import torch

    from enorm_cli.inspect.recorder import RatioRecorder

    model = copy.deepcopy(model).eval()
    shifted = test["shifted"][:limit]
    with RatioRecorder(model) as recorder, torch.no_grad():
        model(test["x"][:limit])
        lam = recorder.take_readout().ratios
    return [
        group_gap(in_ln(lam[:, i], norms), shifted) for i, norms in enumerate(recorder.normalizers)
    ]


def in_ln(lam: Any, normalizers: Any) -> Any:
    """Per image, a layer's ratios (N x K) on the per-image normalizers: IN + LN."""
    return sum(lam[:, normalizers.index(n)] for n in ("in", "ln") if n in normalizers)


def group_gap(values: Any, shifted: Any) -> float:
    """How much more of ``values`` the shifted images get than the clean ones, on average."""
    return float(values[shifted].mean() - values[~shifted].mean())


def preference_probe(model: Any, test: dict[str, Any], limit: int = 512) -> dict[str, Any]:
    """What the loss asks of a model in training: per EN layer the group gap of
    ``loss_preference`` (which reads a copy) in standard errors, and the largest with its
    layer's index; and what the ratios give the groups (``group_gaps``), the largest gap with
    its layer's index."""
    asked = loss_preference(model, test, limit)
    t = [group_t(a, test["shifted"][: len(a)]) for a in asked]
    largest = max(range(len(t)), key=lambda i: abs(t[i]))
    gaps = group_gaps(model, test, limit)
    widest = max(range(len(gaps)), key=lambda i: gaps[i])
    return {
        "t": [round(v, 2) for v in t],
        "largest_t": t[largest],
        "largest_layer": largest,
        "gaps": [round(v, 6) for v in gaps],
        "largest_gap": gaps[widest],
        "largest_gap_layer": widest,
    }


@contextlib.contextmanager
def variant_context(variant: str) -> Iterator[None]:
    """What a variant's run happens inside: an experiment's hooks, or nothing."""
    spec = VARIANTS[variant]
    with contextlib.ExitStack() as stack:
        if spec.get("spread"):
            stack.enter_context(_spread_input())
        if spec.get("fasthidden"):
            stack.enter_context(_fast_hidden())
        if spec.get("logit_noise"):
            stack.enter_context(_noisy_logits())
        if spec.get("reference_path"):
            stack.enter_context(_reference_path())
        if "explore" in spec:  # also without a reward (0): the switches alone
            stack.enter_context(_explored_mixing())
        yield


def run(
    regime: str,
    variant: str,
    seed: int,
    train: dict[str, Any],
    test: dict[str, Any],
    batch: int,
    lr: float,
    epochs: int,
    save: Path | None = None,
    probe_every: int = 0,
) -> dict[str, Any]:
    """Train one model, then measure top-1 per group and, for EN/SN, every layer's AUC and
    diagnostics; ``save``: a folder the EN/SN model is written to, as ``enorm inspect`` reads
    it (``REGIME-VARIANT-sSEED.safetensors``); ``probe_every``: read what the loss asks
    (``preference_probe``) every so many steps of training, into ``preference_trace``. An
    experiment's hooks wrap the call (``variant_context``)."""
    import torch

    import enorm_cli
    from enorm_cli.config.recipe import resolve_bn_stats
    from enorm_cli.finetune.optim import build_optimizer, build_scheduler
    from enorm_cli.inspect.recorder import RatioRecorder, Readout, layer_ratios

    torch.manual_seed(seed)
    recipe = recipe_for(regime, variant, batch, lr, epochs)
    model = build(recipe, regime)
    if VARIANTS[variant].get("rowlr"):
        _row_lr(model)
    route = VARIANTS[variant].get("route")
    routed = _route_first_norm(model, route) if route else None
    bn_stats = resolve_bn_stats(recipe.model, batch)
    steps = len(train["y"]) // batch
    optimizer = build_optimizer(model, recipe)
    scheduler = build_scheduler(optimizer, recipe, steps)
    g = torch.Generator().manual_seed(seed)
    # an explored run's switches draw from their own generator: its data order is EN's
    switches = torch.Generator().manual_seed(seed + 1000)
    tick, step = time.perf_counter(), 0
    spec = VARIANTS[variant]
    hold_steps = round(spec.get("warm_epochs", 0) * steps)
    held = [
        p
        for name, m in model.named_modules()
        if isinstance(m, enorm_cli.ExemplarNorm2d) and re.search(spec.get("warm_layers", ""), name)
        for p in [*m.ratio_parameters(), *m.hidden_parameters()]
    ]
    en_named = {n: m for n, m in model.named_modules() if isinstance(m, enorm_cli.ExemplarNorm2d)}
    en_layers = list(en_named.values())
    has_en = bool(en_layers)
    hidden_start = {
        n: [p.detach().clone() for p in m.hidden_parameters()] for n, m in en_named.items()
    }
    # an explored run's running mean advantage per layer and normalizer (``explore_step``)
    explored = (
        torch.full((len(en_layers), len(en_layers[0].normalizers)), math.nan, dtype=torch.float64)
        if "explore" in spec
        else None
    )
    release_steps = round(spec.get("release_epochs", 0) * steps)
    noise_steps = round(spec.get("noise_epochs", 0) * steps)
    offsets = [
        (m.mix_offset, m.mix_offset.clone())
        for m in model.modules()
        if isinstance(m, enorm_cli.ExemplarNorm2d) and release_steps
    ]
    trace: list[dict[str, Any]] = []
    for _ in range(epochs):
        order = torch.randperm(len(train["y"]), generator=g)
        enorm_cli.set_bn_stats(model, bn_stats)
        for i in range(steps):
            idx = order[i * batch : (i + 1) * batch]
            if routed is not None:
                routed.mask = train["shifted"][idx]
            NOISE["sigma"] = spec.get("logit_noise", 0.0)
            if noise_steps:  # annealed: down to 0 over the first noise_steps steps
                NOISE["sigma"] *= max(0.0, 1.0 - step / noise_steps)
            try:
                x, y = train["x"][idx], train["y"][idx]
                if explored is not None and spec.get("paired"):
                    switched = spec.get("switch", False)
                    loss = paired_step(model, x, y, explored, spec["explore"], switches, switched)
                elif explored is not None:
                    centered = spec.get("explore_centered", True)
                    loss = explore_step(model, x, y, explored, spec["explore"], switches, centered)
                else:
                    loss = torch.nn.functional.cross_entropy(model(x), y)
            finally:
                NOISE["sigma"] = 0.0
            optimizer.zero_grad()
            loss.backward()
            if step < hold_steps:  # steps taken so far: the first hold_steps are held
                for p in held:
                    p.grad = None
            if recipe.train.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.train.grad_clip)
            optimizer.step()
            step += 1
            for offset, start in offsets:
                offset.copy_(start * max(0.0, 1.0 - step / release_steps))
            scheduler.step_update(step)
            if has_en and probe_every and step % probe_every == 0:
                trace.append({"step": step, **preference_probe(model, test)})
    seconds = time.perf_counter() - tick
    model.eval()
    if save is not None and recipe.model.norm != "bn":
        save.mkdir(parents=True, exist_ok=True)
        path = save / f"{regime}-{variant}-s{seed}.safetensors"
        data = {"input_size": [3, 32, 32], "mean": list(MEAN), "std": list(STD)}
        enorm_cli.save_model(model, path, recipe.model.name, data_config=data, force=True)
    readouts, predictions = [], []
    with RatioRecorder(model) as recorder, torch.no_grad():
        for i in range(0, len(test["y"]), 256):
            if routed is not None:
                routed.mask = test["shifted"][i : i + 256]
            predictions.append(model(test["x"][i : i + 256]).argmax(1))
            if recorder.layers:
                readouts.append(recorder.take_readout())
    correct = torch.cat(predictions) == test["y"]
    shifted = test["shifted"]
    keep = ~shifted | strong_shift(test)  # clean and strongly shifted images
    out: dict[str, Any] = {
        "regime": regime,
        "construction": test.get("construction", "shift"),
        "variant": variant,
        "seed": seed,
        "bn_stats": bn_stats,
        "top1_clean": 100.0 * float(correct[~shifted].double().mean()),
        "top1_shifted": 100.0 * float(correct[shifted].double().mean()),
        "train_seconds": round(seconds, 1),
        "preference_trace": trace,
        "layers": [],
    }
    preference = loss_preference(model, test) if has_en else []
    moved = hidden_moves(model, hidden_start)
    if routed is not None:
        asked = routed_preference(model, routed, test)
        n = len(asked)
        out["first_loss_pref_auc"] = auc(asked, shifted[:n])
        out["first_loss_pref_t"] = group_t(asked, shifted[:n])
        switched = routed_full_preference(model, routed, test)
        out["first_switch_pref_auc"] = auc(switched, shifted[:n])
        out["first_switch_pref_t"] = group_t(switched, shifted[:n])
    if readouts:
        r = Readout.cat(readouts)
        rows = layer_ratios(recorder.names, recorder.normalizers, *r, recorder.gamma_sizes())
        for i, row in enumerate(rows):
            norms = row.normalizers
            lam = r.ratios[:, i, : len(norms)]
            per_image = in_ln(lam, norms)
            layer = {
                **row.to_json(4),
                "auc_in": auc(lam[:, norms.index("in")], shifted) if "in" in norms else None,
                "auc_in_ln": auc(per_image, shifted),
                # the strongly shifted images against the clean ones
                "auc_in_ln_strong": auc(per_image[keep], shifted[keep]),
                # how much more of the per-image normalizers the shifted images get, on average
                "gap_in_ln": group_gap(per_image, shifted),
                # what the choice follows: the share of its variance over samples that the
                # class, and the group, explain
                "class_share_in_ln": explained_share(per_image, test["y"]),
                "group_share_in_ln": explained_share(per_image, shifted.long()),
                # how far the branch's hidden layer moved from its start (relative)
                "hidden_move": moved.get(row.name),
            }
            if preference:
                asked, n = preference[i], len(preference[i])
                layer["loss_pref_auc"] = auc(asked, shifted[:n])
                layer["loss_pref_gap"] = float(
                    asked[shifted[:n]].mean() - asked[~shifted[:n]].mean()
                )
                # the gap in standard errors: whether the loss asks it on average
                layer["loss_pref_t"] = group_t(asked, shifted[:n])
            out["layers"].append(layer)
        aucs = [lay["auc_in"] for lay in out["layers"] if lay["auc_in"] is not None]
        both = [lay["auc_in_ln"] for lay in out["layers"]]
        out["best_auc_in"] = max(aucs, default=None)
        out["best_auc_in_ln"] = max(both, default=None)
        out["best_auc_in_ln_strong"] = max(lay["auc_in_ln_strong"] for lay in out["layers"])
        out["largest_gap_in_ln"] = max(lay["gap_in_ln"] for lay in out["layers"])
        if preference:
            out["best_loss_pref_auc"] = max(lay["loss_pref_auc"] for lay in out["layers"])
            t = [lay["loss_pref_t"] for lay in out["layers"]]
            out["largest_loss_pref_t"] = max(t, key=abs)
            out["first_loss_pref_t"] = t[0]
            out["first_loss_pref_auc"] = out["layers"][0]["loss_pref_auc"]
            switched = en_switch_preference(model, test)
            out["first_switch_pref_auc"] = auc(switched, shifted[: len(switched)])
            out["first_switch_pref_t"] = group_t(switched, shifted[: len(switched)])
    return out


def explained_share(values: Any, labels: Any) -> float | None:
    """The share of ``values``' variance that ``labels`` explain (between-label variance over
    total, eta squared); None where the values do not vary."""
    import torch

    values = values.double()
    total = float(values.var(unbiased=False))
    if total <= 1e-12 * max(float(values.abs().max()), 1e-30) ** 2:
        return None
    means = torch.zeros(int(labels.max()) + 1, dtype=values.dtype).index_add_(0, labels, values)
    counts = torch.bincount(labels, minlength=len(means)).to(values.dtype)
    fitted = (means / counts.clamp(min=1))[labels]
    return float((fitted - values.mean()).square().mean()) / total


def hidden_moves(model: Any, start: dict[str, list[Any]]) -> dict[str, float]:
    """Per EN layer (by name), how far its branch's hidden layer (the conv and FC1) moved from
    ``start``: |delta| / |start| over those parameters together. A hidden layer that stays at
    its random start gives the branch random features to read the groups from (the ceiling's
    "FC2 alone" column)."""
    import torch

    out: dict[str, float] = {}
    for name, params in start.items():
        if params:
            now = torch.cat(
                [p.detach().flatten() for p in model.get_submodule(name).hidden_parameters()]
            )
            was = torch.cat([p.flatten() for p in params])
            out[name] = float((now - was).norm() / was.norm().clamp_min(1e-12))
    return out


def per_sample_figures(run: dict[str, Any]) -> dict[str, float]:
    """A run's per-sample reading from its layers: the largest spread over samples of the
    per-image normalizers' ratio (in + ln; with [bn, in, ln] that is 1 - bn, so the bn ratio's
    sd), and the gap between the groups of largest size, with its sign (negative: the shifted
    images get less in + ln). Empty for a run without mixed layers."""
    layers = [lay for lay in run.get("layers", []) if "bn" in lay["normalizers"]]
    if not layers:
        return {}
    spreads = [lay["std"][lay["normalizers"].index("bn")] for lay in layers]
    out = {
        "largest_spread_in_ln": max(spreads),
        "layers_spreading": sum(s > SPREADS for s in spreads),
    }
    if all("gap_in_ln" in lay for lay in layers):  # not in the first probes' records
        out["largest_abs_gap_in_ln"] = max((lay["gap_in_ln"] for lay in layers), key=abs)
    if all(lay.get("saturated") is not None for lay in layers):
        out["saturated_share"] = sum(lay["saturated"] for lay in layers) / len(layers)
    if "in" in layers[0]["normalizers"]:
        out["first_in"] = layers[0]["mean"][layers[0]["normalizers"].index("in")]
    moves = sorted(lay["hidden_move"] for lay in layers if lay.get("hidden_move") is not None)
    if moves:  # the median layer's
        out["hidden_move"] = moves[len(moves) // 2]
    return out


SPREADS = 0.01
"""A layer's ratios differ between samples where the sd over samples of its in + ln ratio is
above this (``layers_spreading``); below, the layer is a fixed mixture to two decimals."""


def label(run: dict[str, Any]) -> str:
    """A run's regime, with its construction where that is not the plain shift."""
    construction = run.get("construction", "shift")
    return run["regime"] if construction == "shift" else f"{run['regime']}, {construction}"


def summary(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (regime, variant): the mean over seeds and the lowest-highest run."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((label(r), r["variant"]), []).append({**r, **per_sample_figures(r)})
    rows = []
    for (regime, variant), rs in sorted(groups.items()):
        row: dict[str, Any] = {"regime": regime, "variant": variant, "seeds": len(rs)}
        for key in (
            "layers_spreading",
            "saturated_share",
            "first_in",
            "hidden_move",
            "top1_clean",
            "top1_shifted",
            "best_auc_in",
            "best_auc_in_ln",
            "best_auc_in_ln_strong",
            "largest_gap_in_ln",
            "largest_abs_gap_in_ln",
            "largest_spread_in_ln",
            "best_loss_pref_auc",
            "largest_loss_pref_t",
            "first_loss_pref_auc",
            "first_loss_pref_t",
            "first_switch_pref_auc",
            "first_switch_pref_t",
        ):
            values = [r[key] for r in rs if r.get(key) is not None]
            if values:
                row[key] = sum(values) / len(values)
                row[key + "_range"] = [min(values), max(values)]
        rows.append(row)
    return rows


def _cell(row: dict[str, Any], key: str, digits: int) -> str:
    """A summary row's mean with its lowest-highest run, or "-" where no run has the key."""
    if key not in row:
        return "-"
    lo, hi = row[key + "_range"]
    return f"{row[key]:.{digits}f} ({lo:.{digits}f}-{hi:.{digits}f})"


def _summary_table(
    runs: list[dict[str, Any]], columns: list[tuple[str, str, int]], needs: str | None = None
) -> str:
    """A markdown table of ``summary`` rows, regime and variant first, then one column per
    (title, key, digits) as ``_cell`` writes it; ``needs``: only the rows with that key."""
    titles = ["regime", "variant", *(title for title, _, _ in columns)]
    lines = ["| " + " | ".join(titles) + " |", "|" + "---|" * len(titles)]
    for row in summary(runs):
        if needs is None or needs in row:
            cells = [row["regime"], row["variant"], *(_cell(row, k, d) for _, k, d in columns)]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


TOP1 = [("clean top-1", "top1_clean", 2), ("shifted top-1", "top1_shifted", 2)]
"""The first columns of every summary table."""


def preference_table(runs: list[dict[str, Any]]) -> str:
    """What the loss asks against what EN chose (runs with ``loss_preference``): per regime and
    variant, the best AUC of the ratios and of the loss's per-sample preference, the largest
    group gap of that preference in standard errors and the first layer's."""
    columns = [
        *TOP1,
        ("best AUC of the ratios (in+ln)", "best_auc_in_ln", 3),
        ("best AUC of the loss's preference", "best_loss_pref_auc", 3),
        ("largest gap of the preference (t)", "largest_loss_pref_t", 1),
        ("first layer's gap (t)", "first_loss_pref_t", 1),
    ]
    return _summary_table(runs, columns, needs="best_loss_pref_auc")


def first_preference_table(runs: list[dict[str, Any]]) -> str:
    """What the loss asks of the first norm layer at the end of training, per regime and
    variant: EN's first layer, or a reference's (``routed_preference``); the AUC of the
    preference and its groups' gap in standard errors, and those of a whole switch of the
    layer (``routed_full_preference``, ``en_switch_preference``)."""
    columns = [
        *TOP1,
        ("first layer: AUC of the loss's preference", "first_loss_pref_auc", 3),
        ("first layer: its gap (t)", "first_loss_pref_t", 1),
        ("a whole switch: AUC", "first_switch_pref_auc", 3),
        ("a whole switch: gap (t)", "first_switch_pref_t", 1),
    ]
    return _summary_table(runs, columns, needs="first_loss_pref_auc")


def trace_table(runs: list[dict[str, Any]]) -> str:
    """What the loss asked during training (runs with ``preference_trace``): per probe, the
    first layer's group gap of the preference in standard errors, the largest with its layer,
    and how many layers' exceed 3."""
    lines = [
        "| regime | variant | seed | step | first layer (t) | largest (t) | its layer "
        "| layers above 3 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        names = [lay["name"] for lay in r["layers"]]
        for probe in r.get("preference_trace", []):
            t = probe["t"]
            lines.append(
                f"| {label(r)} | {r['variant']} | {r['seed']} | {probe['step']} | {t[0]:.1f} | "
                f"{probe['largest_t']:.1f} | `{names[probe['largest_layer']]}` | "
                f"{sum(abs(v) > 3 for v in t)} of {len(t)} |"
            )
    return "\n".join(lines)


def gap_trace_table(runs: list[dict[str, Any]]) -> str:
    """When and where a run starts to route (runs whose probes read ``group_gaps``): per seed, a
    row per probe with the largest gap between the groups' IN + LN and its layer, and the
    first layer's gap (where the shift lives), ending with the run's own reading on all test
    images."""
    lines = [
        "| regime | variant | seed | step | largest gap (in+ln) | its layer | first layer's gap |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        names = [lay["name"] for lay in r["layers"]]
        rows = [
            (str(p["step"]), p["largest_gap"], p["largest_gap_layer"], p["gaps"][0])
            for p in r.get("preference_trace", [])
            if "gaps" in p
        ]
        if not rows:
            continue
        gaps = [lay["gap_in_ln"] for lay in r["layers"]]
        widest = max(range(len(gaps)), key=lambda i: gaps[i])
        rows.append(("end, all test images", gaps[widest], widest, gaps[0]))
        for step, gap, layer, first in rows:
            lines.append(
                f"| {label(r)} | {r['variant']} | {r['seed']} | {step} | {gap:.3f} | "
                f"`{names[layer]}` | {first:.3f} |"
            )
    return "\n".join(lines)


def table(runs: list[dict[str, Any]]) -> str:
    columns = [
        *TOP1,
        ("best AUC (in)", "best_auc_in", 3),
        ("best AUC (in+ln)", "best_auc_in_ln", 3),
        ("best AUC (in+ln), strong shifts", "best_auc_in_ln_strong", 3),
        ("largest gap (in+ln)", "largest_abs_gap_in_ln", 4),
        ("largest sd over samples (in+ln)", "largest_spread_in_ln", 4),
    ]
    return _summary_table(runs, columns)


def branch_table(runs: list[dict[str, Any]]) -> str:
    """Per (regime, variant) of mixed layers: top-1, how many layers' ratios differ between
    samples (``SPREADS``), the share of the branch's hidden units saturated (mean over layers:
    a branch whose units all saturate gives every sample the same h) and the first layer's
    mean IN ratio (where the shift lives)."""
    columns = [
        *TOP1,
        ("layers whose ratios spread", "layers_spreading", 1),
        ("hidden units saturated", "saturated_share", 2),
        ("first layer's IN ratio", "first_in", 2),
        ("hidden layer's move (median layer)", "hidden_move", 4),
    ]
    return _summary_table(runs, columns, needs="layers_spreading")


ROUTES = 0.25
"""A run routes by group where some layer gives the shifted images at least this much more
IN + LN, on average, than the clean ones (``gap_in_ln``): a choice, not a ranking of small
differences (an AUC alone can be high on those)."""


def share_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson's 95% interval for a share of k runs in n: with 5 or 10 runs a share is a
    coarse reading, and the interval says how coarse."""
    if n == 0:
        return 0.0, 1.0
    p, zz = k / n, z * z
    centre = (p + zz / (2 * n)) / (1 + zz / n)
    half = z * math.sqrt(p * (1 - p) / n + zz / (4 * n * n)) / (1 + zz / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def fisher_p(k1: int, n1: int, k2: int, n2: int) -> float:
    """Two-sided Fisher exact test that two shares of runs (k1 of n1, k2 of n2) are the same:
    the probability, with the margins fixed, of a table no more likely than the one seen."""
    total, hits = n1 + n2, k1 + k2

    def chance(a: int) -> float:
        return math.comb(n1, a) * math.comb(n2, hits - a) / math.comb(total, hits)

    seen = chance(k1)
    tables = [chance(a) for a in range(max(0, hits - n2), min(n1, hits) + 1)]
    return min(1.0, sum(p for p in tables if p <= seen * (1 + 1e-9)))


def routes(run: dict[str, Any]) -> bool:
    """Whether some layer of the run routes by group (``ROUTES``)."""
    return max(lay["gap_in_ln"] for lay in run["layers"]) >= ROUTES


def routing_table(runs: list[dict[str, Any]]) -> str:
    """Per (regime, variant): how many runs route by group (``ROUTES``), Wilson's 95% interval
    for that share, Fisher's exact p against EN as shipped in the same regime (``en``, or
    ``en_reference`` for the variants that patch the reference path, where the record has
    it), and the best AUC (in + ln) of the runs that route and of those that do not."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in runs:
        if r.get("layers"):
            groups.setdefault((label(r), r["variant"]), []).append(r)

    def mean_auc(rs: list[dict[str, Any]]) -> str:
        return f"{sum(r['best_auc_in_ln'] for r in rs) / len(rs):.3f}" if rs else "-"

    def against_en(regime: str, variant: str, k: int, n: int) -> str:
        spec = VARIANTS.get(variant, {})
        on_reference = spec.get("reference_path") or "explore" in spec
        # the same path where the record has it: the paths differ only in rounding
        bases = ("en_reference", "en") if on_reference else ("en", "en_reference")
        base = next((b for b in bases if (regime, b) in groups), None)
        if variant in ("en", "en_reference") or base is None:
            return "-"
        rs = groups[(regime, base)]
        return f"{fisher_p(k, n, sum(map(routes, rs)), len(rs)):.2f}"

    lines = [
        f"| regime | variant | runs routing (gap >= {ROUTES}) | 95% interval | "
        "against EN (Fisher p) | best AUC, routing | best AUC, not routing |",
        "|---|---|---|---|---|---|---|",
    ]
    for (regime, variant), rs in sorted(groups.items()):
        routing = [r for r in rs if routes(r)]
        rest = [r for r in rs if r not in routing]
        lo, hi = share_interval(len(routing), len(rs))
        lines.append(
            f"| {regime} | {variant} | {len(routing)} of {len(rs)} | {lo:.2f}-{hi:.2f} | "
            f"{against_en(regime, variant, len(routing), len(rs))} | {mean_auc(routing)} | "
            f"{mean_auc(rest)} |"
        )
    return "\n".join(lines)


def plot(runs: list[dict[str, Any]], path: Path) -> None:
    """Per regime: every EN variant's per-layer AUC (mean over seeds), and top-1 per group."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from enorm_cli.fileio import atomic_path

    regimes = sorted({label(r) for r in runs}, key=lambda g: (g not in REGIMES, g))
    fig, axes = plt.subplots(2, len(regimes), figsize=(6 * len(regimes), 7), squeeze=False)
    for col, regime in enumerate(regimes):
        mine = [r for r in runs if label(r) == regime]
        ax = axes[0][col]
        for variant in sorted({r["variant"] for r in mine if r["layers"]}):
            rs = [r for r in mine if r["variant"] == variant]
            n = len(rs[0]["layers"])
            key = "auc_in" if rs[0]["layers"][0]["auc_in"] is not None else "auc_in_ln"
            mean = [sum(r["layers"][i][key] for r in rs) / len(rs) for i in range(n)]
            ax.plot(range(n), mean, marker=".", label=f"{variant} ({key})")
        ax.axhline(0.5, color="grey", lw=0.8, ls="--")
        ax.set(title=f"{regime}: per-layer AUC, shifted vs clean", xlabel="EN layer", ylim=(0, 1))
        ax.legend(fontsize=8)
        ax = axes[1][col]
        rows = [row for row in summary(runs) if row["regime"] == regime]
        xs = range(len(rows))
        ax.bar([x - 0.2 for x in xs], [row["top1_clean"] for row in rows], 0.4, label="clean")
        ax.bar([x + 0.2 for x in xs], [row["top1_shifted"] for row in rows], 0.4, label="shifted")
        ax.set_xticks(list(xs), [row["variant"] for row in rows], rotation=30, fontsize=8)
        lo = min(min(row["top1_clean"], row["top1_shifted"]) for row in rows)
        ax.set(title=f"{regime}: top-1 per group", ylim=(max(lo - 10, 0), 100))
        ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--variants", nargs="+", default=list(DEFAULT_VARIANTS), choices=list(VARIANTS)
    )
    parser.add_argument("--regimes", nargs="+", default=list(REGIMES), choices=REGIMES)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--train", type=int, default=8000, help="training images")
    parser.add_argument("--test", type=int, default=2000, help="test images")
    parser.add_argument(
        "--epochs", type=int, nargs=2, default=list(EPOCHS), help="finetune, scratch"
    )
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, nargs=2, default=list(LRS), help="finetune, scratch")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--figure", type=Path)
    parser.add_argument("--save", type=Path, help="write each EN/SN model here (enorm inspect)")
    parser.add_argument("--merge", nargs="+", type=Path, help="join earlier --json files")
    parser.add_argument("--construction", default="shift", choices=CONSTRUCTIONS)
    parser.add_argument(
        "--probe-every", type=int, default=0, help="read what the loss asks every N steps"
    )
    parser.add_argument(
        "--ceiling",
        action="store_true",
        help="instead of training: the AUC of the ratio branch trained as a shift detector",
    )
    parser.add_argument(
        "--ceiling-budget",
        nargs="+",
        type=int,
        metavar="STEPS",
        help="with --ceiling: the branch trained as a run trains it, for each number of steps",
    )
    args = parser.parse_args(argv)

    if args.ceiling and args.ceiling_budget:
        rows = []
        for c in CONSTRUCTIONS:
            for regime in args.regimes:
                lr = args.lr[REGIMES.index(regime)]
                for n in args.ceiling_budget:
                    out = detector_ceiling(c, args.train, args.test, steps=n, budget=regime, lr=lr)
                    rows.append({"construction": c, "regime": regime, "steps": n, **out})
                    print(budget_table(rows[-1:]).splitlines()[-1], flush=True)
        print(budget_table(rows))
        if args.json:
            _write(args.json, [], args, budget=rows)
        return 0
    if args.ceiling:
        rows = [
            {"construction": c, **detector_ceiling(c, args.train, args.test)} for c in CONSTRUCTIONS
        ]
        print(ceiling_table(rows))
        if args.json:
            _write(args.json, [], args, ceiling=rows)
        return 0
    runs: list[dict[str, Any]] = []
    if args.merge:
        for path in args.merge:
            runs += json.loads(path.read_text())["runs"]
    else:
        import torch

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
        train = shifted_split(True, args.train, construction=args.construction)
        test = shifted_split(False, args.test, construction=args.construction)
        for seed in args.seeds:
            for regime in args.regimes:
                i = REGIMES.index(regime)
                for variant in args.variants:
                    with variant_context(variant):
                        result = run(
                            regime,
                            variant,
                            seed,
                            train,
                            test,
                            args.batch,
                            args.lr[i],
                            args.epochs[i],
                            args.save,
                            args.probe_every,
                        )
                    runs.append(result)
                    print(
                        f"{regime} {variant} seed {seed}: clean {result['top1_clean']:.2f} "
                        f"shifted {result['top1_shifted']:.2f} best AUC in "
                        f"{result.get('best_auc_in')} in+ln {result.get('best_auc_in_ln')} "
                        f"({result['train_seconds']} s)",
                        flush=True,
                    )
                    if args.json:
                        _write(args.json, runs, args)
    print(table(runs))
    if any("first_loss_pref_auc" in r for r in runs):
        print(first_preference_table(runs))
    if args.json:
        _write(args.json, runs, args)
    if args.figure:
        plot(runs, args.figure)
    return 0


def ceiling_table(rows: list[dict[str, Any]]) -> str:
    """The branch trained as a detector, per construction and first convolution: AUC over all
    shifted images (over the strong shifts)."""
    starts = ("scratch", "scratch_readout", "finetune")
    lines = [
        "| construction | random first conv (from scratch) | the same, FC2 alone trained "
        "| ImageNet first conv (fine-tuning) |",
        "|---|---|---|---|",
    ]
    for row in rows:
        cells = [f"{row[i]:.3f} ({row[i + '_strong']:.3f})" for i in starts]
        lines.append(f"| {row['construction']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def budget_table(rows: list[dict[str, Any]]) -> str:
    """The branch trained as a run trains it, per construction, regime and number of steps:
    AUC over all shifted images (over the strong shifts)."""
    lines = ["| construction | regime | steps | AUC (strong shifts) |", "|---|---|---|---|"]
    for row in rows:
        r = row["regime"]
        lines.append(
            f"| {row['construction']} | {r} | {row['steps']} | "
            f"{row[r]:.3f} ({row[r + '_strong']:.3f}) |"
        )
    return "\n".join(lines)


def _write(path: Path, runs: list[dict[str, Any]], args: argparse.Namespace, **extra: Any) -> None:
    from enorm_cli.fileio import write_text_atomic

    def plain(v: Any) -> Any:  # paths, and --merge's list of them, as strings
        return (
            [plain(x) for x in v] if isinstance(v, list) else str(v) if isinstance(v, Path) else v
        )

    settings = {k: plain(v) for k, v in vars(args).items()}
    record = {"settings": settings, "runs": runs, "summary": summary(runs), **extra}
    text = json.dumps(record, indent=1)
    write_text_atomic(path, text + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
