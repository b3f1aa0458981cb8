"""Symmetric label noise on a training split (``data.label_noise``), for robustness studies.

Noisy web labels (WebVision) are where the paper says per-sample normalization helps most.
A fixed fraction of the training labels is replaced by a different class drawn uniformly,
the same draw for every normalizer at one ``data.label_noise_seed``; val stays clean.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import Dataset


def noisy_targets(targets: list[int], rate: float, num_classes: int, seed: int) -> list[int]:
    """``targets`` with ``round(rate * n)`` of them, chosen at random, set to another class."""
    n = len(targets)
    flips = round(rate * n)
    if flips == 0 or num_classes < 2:
        return list(targets)
    g = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(n, generator=g)[:flips].tolist()
    # an offset in 1..C-1 makes the new class differ from the old one, uniformly
    offsets = torch.randint(1, num_classes, (flips,), generator=g).tolist()
    noisy = list(targets)
    for i, off in zip(chosen, offsets, strict=True):
        noisy[i] = (targets[i] + off) % num_classes
    return noisy


class RelabeledDataset(Dataset):
    """``dataset`` with its labels replaced by ``targets`` (same order)."""

    def __init__(self, dataset: Dataset, targets: list[int]) -> None:
        self.dataset = dataset
        self.targets = targets

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image, _ = self.dataset[index]
        return image, self.targets[index]
