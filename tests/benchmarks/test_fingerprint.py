"""The refactor fingerprint: deterministic in one machine, and it sees a changed layer."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import fingerprint


def test_fingerprint_repeats_and_changes_with_the_layer(monkeypatch: pytest.MonkeyPatch) -> None:
    first = fingerprint.fingerprint("test_resnet", ("bn", "in", "ln"), "en")
    assert first == fingerprint.fingerprint("test_resnet", ("bn", "in", "ln"), "en")
    assert "delta=" in first and "state " in first
    from enorm_cli.layers import ExemplarNorm2d

    start_as = ExemplarNorm2d._start_as

    def nudged(self, src, prior, lam_src):  # a conversion that is off by one part in 1e6
        start_as(self, src, prior, lam_src)
        self.bias.add_(1e-6 * torch.ones_like(self.bias))

    monkeypatch.setattr(ExemplarNorm2d, "_start_as", nudged)
    assert fingerprint.fingerprint("test_resnet", ("bn", "in", "ln"), "en") != first
