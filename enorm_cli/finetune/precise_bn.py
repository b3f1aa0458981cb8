"""Precise BN: running statistics recomputed with the weights an eval is about to judge.

During training the running statistics are a moving average over the last few batches, taken
while the weights moved. With large batches that is a good estimate; with 4 images per step
it is the average of some 40 images, and in MobileNetV2's 1x1 last layers each batch gives
4 values per channel: the eval then judges the weights through noisy statistics (the same
batch-4 cell run through the one-node and the autograd path of the layer trained to the same
loss and scored 17.9% and 43.4%; docs/stability.md). Recomputing them over many training
images with the final weights (Wu and Johnson 2021, "Rethinking 'Batch' in BatchNorm";
detectron2's PreciseBN hook) removes that noise from the eval. Only the statistics change;
no parameter does.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ..layers import MixedNorm2d
from ..layers.modes import RUNNING_STATS_LAYERS


def norm_layers(model: nn.Module) -> list[nn.Module]:
    """Every layer that keeps running statistics (a BatchNorm may be built without)."""
    return [
        m
        for m in model.modules()
        if isinstance(m, RUNNING_STATS_LAYERS) and m.running_mean is not None
    ]


@torch.no_grad()
def recompute_running_stats(model: nn.Module, batches: Iterable, images: int) -> int:
    """Reset and recompute every running mean and variance as the plain average over the
    batches' statistics (momentum None), until ``images`` images are seen; returns how many.

    The model is in eval mode but for its norm layers, so dropout and drop-path draw no random
    numbers (resume stays exact) and EN's ratio branch sees what it sees in training. Batch
    Renormalization is off meanwhile: it would normalize with the statistics being rebuilt
    (and ``frozen_stats`` too, or nothing would be rebuilt).
    Each process reads the same images, so the statistics are equal on every process.
    """
    layers = norm_layers(model)
    if not layers or images <= 0:
        return 0
    was_training = model.training
    saved = [
        (m.momentum, getattr(m, "renorm", False), getattr(m, "frozen_stats", False)) for m in layers
    ]
    model.eval()
    for m in layers:
        m.reset_running_stats()
        m.momentum = None
        m.train()
        if isinstance(m, MixedNorm2d):
            m.renorm = m.frozen_stats = False
    seen = 0
    device = next(model.parameters()).device
    try:
        for x, _ in batches:
            model(x.to(device))
            seen += x.shape[0]
            if seen >= images:
                break
    finally:
        for m, (momentum, renorm, frozen) in zip(layers, saved):
            m.momentum = momentum
            if isinstance(m, MixedNorm2d):
                m.renorm, m.frozen_stats = renorm, frozen
        model.train(was_training)
    return seen
