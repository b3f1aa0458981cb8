"""Per-sample augmentation seeds: the same sample draws alike, and the caller's RNG is kept."""

from __future__ import annotations

import random

import numpy as np
import torch

from enorm_cli.finetune.sample_seeds import PerSampleSeeds, sample_seed


class _Draws(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 5

    def __getitem__(self, index: int) -> tuple[float, float, float]:
        return torch.rand(()).item(), random.random(), float(np.random.rand())


def test_a_sample_draws_the_same_whatever_ran_before_and_the_rng_is_left_alone() -> None:
    data = PerSampleSeeds(_Draws(), seed=3)
    first = [data[i] for i in range(5)]
    torch.manual_seed(99)
    random.seed(99)
    before = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()
    again = [data[i] for i in reversed(range(5))][::-1]
    assert again == first and len(set(first)) == 5
    assert torch.equal(torch.get_rng_state(), before[0]) and random.getstate() == before[1]
    assert (np.random.get_state()[1] == before[2]).all()
    data.set_epoch(1)
    assert [data[i] for i in range(5)] != first  # a new epoch, new crops
    assert PerSampleSeeds(_Draws(), seed=4)[0] != first[0]


def test_sample_seeds_are_spread_and_in_range() -> None:
    seeds = {sample_seed(s, e, i) for s in range(3) for e in range(3) for i in range(100)}
    assert len(seeds) == 900 and all(0 <= s < 2**63 for s in seeds)
