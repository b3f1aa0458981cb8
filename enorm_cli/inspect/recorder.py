"""Recording EN's per-sample normalizer ratios with forward hooks (inspect's engine).

A forward hook on each EN (or SN) layer computes ``layer.ratios(input)`` under
no_grad: the lambdas forward used (the same math on the same input; forward's fused
kernels do not expose them), or SN's static ratios. The model's computation path is
untouched; ratios are always the post-softmax lambdas, named by the layer's normalizers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..layers import MixedNorm2d


def en_layers(model: nn.Module) -> list[tuple[str, MixedNorm2d]]:
    """EN (and SN) layers in forward-definition order, by module name."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, MixedNorm2d)]


@dataclass
class RatioRecorder:
    """Collects lambda (N x K) of every EN layer for each batch the model sees.

    Use as a context manager around forward passes; ``take()`` returns the
    ratios of the batches since the last call as N x L x K_max (K padded with NaN
    when layers mix different numbers of normalizers).
    """

    model: nn.Module
    layers: list[tuple[str, MixedNorm2d]] = field(init=False)
    _handles: list[Any] = field(default_factory=list, init=False)
    _current: dict[str, Tensor] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        self.layers = en_layers(self.model)

    @property
    def names(self) -> list[str]:
        return [n for n, _ in self.layers]

    @property
    def normalizers(self) -> list[tuple[str, ...]]:
        return [m.normalizers for _, m in self.layers]

    @property
    def k_max(self) -> int:
        return max((len(m.normalizers) for _, m in self.layers), default=0)

    def __enter__(self) -> RatioRecorder:
        for name, module in self.layers:
            self._handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, name: str):
        def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            with torch.no_grad():
                self._current[name] = module.ratios(inputs[0]).float()

        return hook

    def take(self) -> Tensor:
        """Ratios of the last forward: N x L x K_max (NaN where a layer has fewer normalizers)."""
        if not self._current:
            raise RuntimeError("no forward pass was recorded")
        n = next(iter(self._current.values())).shape[0]
        out = torch.full((n, len(self.layers), self.k_max), float("nan"))
        for i, (name, _) in enumerate(self.layers):
            lam = self._current[name]
            out[:, i, : lam.shape[1]] = lam.cpu()
        self._current.clear()
        return out


@dataclass
class LayerRatios:
    """Mean and spread over samples of each normalizer's ratio in one layer."""

    name: str
    normalizers: list[str]
    mean: list[float]
    std: list[float]
    p10: list[float] = field(default_factory=list)
    p90: list[float] = field(default_factory=list)

    @property
    def dominant(self) -> str:
        return self.normalizers[max(range(len(self.mean)), key=self.mean.__getitem__)]


def layer_ratios(
    names: list[str], normalizers: list[tuple[str, ...]], ratios: Tensor
) -> list[LayerRatios]:
    """Per layer: mean, std, 10th and 90th percentiles over samples of every normalizer's ratio."""
    out = []
    for i, (name, norms) in enumerate(zip(names, normalizers)):
        lam = ratios[:, i, : len(norms)].double()
        q = torch.quantile(lam, torch.tensor([0.1, 0.9], dtype=lam.dtype), dim=0)
        std = (
            lam.std(0, correction=0)
            if lam.shape[0] > 1
            else torch.zeros(len(norms), dtype=lam.dtype)
        )
        out.append(
            LayerRatios(
                name, list(norms), lam.mean(0).tolist(), std.tolist(), q[0].tolist(), q[1].tolist()
            )
        )
    return out


def summarize(
    names: list[str], normalizers: list[tuple[str, ...]], ratios: Tensor
) -> dict[str, Any]:
    """Per-layer mean and std over samples of each normalizer's ratio (JSON-ready, for metadata)."""
    layers = [
        {
            "name": r.name,
            "normalizers": r.normalizers,
            "mean": [round(v, 6) for v in r.mean],
            "std": [round(v, 6) for v in r.std],
        }
        for r in layer_ratios(names, normalizers, ratios)
    ]
    return {"samples": int(ratios.shape[0]), "layers": layers}
