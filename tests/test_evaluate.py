"""Evaluation: exact top-1 over a split, and ``enorm eval``'s checkpoint evaluation."""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn

from enorm_cli.checkpoint import read_info
from enorm_cli.data.datasets import parse_data_spec
from enorm_cli.evaluate import evaluate, evaluate_checkpoint


def test_evaluate_counts_every_sample_once() -> None:
    """7 samples in batches of 3: top-1 is exact, and the ratio statistics cover all 7."""
    from enorm_cli.layers import ExemplarNorm2d

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3),
        ExemplarNorm2d(8),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )
    x, y = torch.randn(7, 3, 8, 8), torch.tensor([0, 1, 2, 3, 0, 1, 2])
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=3)
    accelerator = Accelerator(cpu=True)
    result = evaluate(model, loader, accelerator)
    with torch.no_grad():
        expected = (model.eval()(x).argmax(1) == y).float().mean().item() * 100
    assert result.samples == 7 and abs(result.top1 - expected) < 1e-4 and result.top5 == 100.0
    assert result.ratio_stats["samples"] == 7 and len(result.ratio_stats["layers"]) == 1


def test_evaluate_checkpoint_reproduces_the_runs_own_eval(
    finetuned: Path, image_classes: Path
) -> None:
    """The fine-tuned checkpoint on its val split, with its own data config: the top-1 its run
    logged."""
    summary = read_info(finetuned).extra["train"]
    result = evaluate_checkpoint(finetuned, parse_data_spec(str(image_classes / "val")), 4, 0, None)
    assert result.samples == summary["samples"]
    assert abs(result.top1 - summary["top1"]) < 1e-4
