"""Evaluation: exact top-1/top-5 over a whole split on any number of processes, and
``enorm eval`` of a checkpoint on a split of its choosing."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .faults import crash_point
from .inspect.recorder import RatioRecorder, Readout, summarize


@dataclass
class EvalResult:
    top1: float
    top5: float
    loss: float
    samples: int
    ratio_stats: dict[str, Any] | None


def cpu_only() -> bool:
    """True without a GPU: Accelerate only picks MULTI_CPU (gloo) under torchrun when told
    ``cpu=True``."""
    # torch >= 2.6 has torch.accelerator; older: CUDA is what Accelerate would use.
    accel = getattr(torch, "accelerator", None)
    return not (accel.is_available() if accel is not None else torch.cuda.is_available())


def _accuracy_counts(logits: torch.Tensor, target: torch.Tensor) -> tuple[float, float]:
    from timm.utils import accuracy

    k5 = min(5, logits.shape[1])
    top1, top5 = accuracy(logits, target, topk=(1, k5))
    n = target.shape[0]
    return top1.item() * n / 100.0, top5.item() * n / 100.0


@torch.no_grad()
def evaluate(
    model: nn.Module, loader: Any, accelerator: Any, record_ratios: bool = True
) -> EvalResult:
    """Exact top-1/top-5 over the whole split, across processes (no padded duplicates).

    With ``record_ratios``, also every EN/SN layer's ratio statistics and diagnostics
    (``inspect.recorder.summarize``),
    which checkpoints store for ``enorm inspect``.
    """
    model.eval()
    unwrapped = accelerator.unwrap_model(model)
    recorder = RatioRecorder(unwrapped) if record_ratios else None
    if recorder is not None and not recorder.layers:
        recorder = None
    correct1 = correct5 = loss_sum = 0.0
    samples = 0
    readouts = []
    with recorder if recorder is not None else contextlib.nullcontext():
        for x, y in loader:
            logits = model(x).float()
            extra = (
                tuple(t.to(logits.device) for t in recorder.take_readout())
                if recorder is not None
                else ()
            )
            gathered = accelerator.gather_for_metrics((logits, y, *extra))
            g_logits, g_y = gathered[0], gathered[1]
            c1, c5 = _accuracy_counts(g_logits, g_y)
            correct1 += c1
            correct5 += c5
            loss_sum += nn.functional.cross_entropy(g_logits, g_y, reduction="sum").item()
            samples += g_y.shape[0]
            if extra:
                readouts.append(Readout(*(t.cpu() for t in gathered[2:])))
            crash_point("eval")
    stats = None
    if recorder is not None and readouts:
        stats = summarize(
            recorder.names,
            recorder.normalizers,
            Readout.cat(readouts),
            recorder.gamma_sizes(),
        )
    return EvalResult(
        100.0 * correct1 / samples, 100.0 * correct5 / samples, loss_sum / samples, samples, stats
    )


def evaluate_checkpoint(
    path: Path, data: Any, batch_size: int, workers: int, limit: int | None
) -> EvalResult:
    """``enorm eval``: top-1/top-5 of a checkpoint on one split, with its own data config."""
    from accelerate import Accelerator

    from .checkpoint import load_model, read_info
    from .data.datasets import checkpoint_split, make_loader

    info = read_info(path)
    split = checkpoint_split(data, info.data_config, info.num_classes, limit)
    model = load_model(path)
    accelerator = Accelerator(cpu=cpu_only())
    loader = make_loader(split, batch_size, workers, train=False)
    model, loader = accelerator.prepare(model, loader)
    return evaluate(model, loader, accelerator, record_ratios=False)
