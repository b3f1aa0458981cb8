"""Per-sample augmentation randomness: each training sample's crop, flip and jitter drawn
from (run seed, epoch, sample index), never from the process's running RNG.

So a sample is augmented alike whatever process or data-loader worker reads it and
whatever ran before it: a resumed run sees the images the uninterrupted one saw, and the
global RNG (dropout, drop-path) is left to the model (``train.FinetuneRecipe``).
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

_MIX = 0x9E3779B97F4A7C15  # 2^64 / golden ratio: spreads nearby (seed, epoch, index) apart


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for one sample in one epoch (splitmix64 of the three)."""
    x = (seed * 1_000_003 + epoch) * 2_147_483_647 + index
    x = (x + _MIX) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (x ^ (x >> 31)) >> 1


class PerSampleSeeds(Dataset):
    """Wraps a dataset so ``dataset[i]`` runs with torch, ``random`` and numpy seeded from
    (seed, epoch, i), and leaves the caller's RNG states as they were.

    ``set_epoch`` must reach the copy that reads: data-loader workers hold their own, so
    the train loader re-creates them every epoch (``data.make_loader``).
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        s = sample_seed(self.seed, self.epoch, int(index))
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(s)
            random.seed(s)
            np.random.seed(s % 2**32)
            try:
                return self.dataset[index]
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)
