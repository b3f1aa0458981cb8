"""Recording EN's per-sample normalizer ratios with forward hooks (inspect's engine).

A forward hook on each EN (or SN) layer computes ``layer.branch(input)`` under no_grad: the
lambdas forward used (the same math on the same input; forward's fused kernels do not
expose them), or SN's static ratios, with the logits and the ratio branch's saturated hidden
units. The model's computation path is untouched; ratios are always the post-softmax
lambdas, named by the layer's normalizers.

Whether EN chooses (``layer_ratios``): the spread over samples of each normalizer's ratio and
logit (none: every sample gets the same mix, a fixed mixture), the share of the branch's
hidden units that are saturated (all: h, and so the ratios, the same for every sample), and
each normalizer's gamma relative to the source's (0: that normalizer is inert, its output
the constant beta).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from ..layers import MixedNorm2d
from ..layers.base import Branch


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
    _current: dict[str, Branch] = field(default_factory=dict, init=False)

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
                self._current[name] = module.branch(inputs[0])

        return hook

    def take(self) -> Tensor:
        """Ratios of the last forward: N x L x K_max (NaN where a layer has fewer normalizers)."""
        return self.take_readout().ratios

    def take_readout(self) -> Readout:
        """Ratios, logits (N x L x K_max, NaN-padded) and each sample's share of saturated
        hidden units per layer (N x L, NaN for layers without a branch) of the last forward."""
        if not self._current:
            raise RuntimeError("no forward pass was recorded")
        n = next(iter(self._current.values())).ratios.shape[0]
        shape = (n, len(self.layers), self.k_max)
        ratios, logits = torch.full(shape, float("nan")), torch.full(shape, float("nan"))
        saturated = torch.full((n, len(self.layers)), float("nan"))
        for i, (name, _) in enumerate(self.layers):
            branch = self._current[name]
            k = branch.ratios.shape[1]
            ratios[:, i, :k] = branch.ratios.float().cpu()
            logits[:, i, :k] = branch.logits.float().cpu()
            if branch.saturated is not None:
                saturated[:, i] = branch.saturated.float().mean(1).cpu()
        self._current.clear()
        return Readout(ratios, logits, saturated)

    def gamma_sizes(self) -> list[list[float] | None]:
        """Each layer's ``MixedNorm2d.gamma_sizes`` (not data-dependent)."""
        return [m.gamma_sizes() for _, m in self.layers]


class Readout(NamedTuple):
    """``RatioRecorder.take_readout``: ratios, logits (N x L x K), saturated share (N x L)."""

    ratios: Tensor
    logits: Tensor
    saturated: Tensor

    @staticmethod
    def cat(readouts: list[Readout]) -> Readout:
        return Readout(*(torch.cat(parts) for parts in zip(*readouts)))


@dataclass
class LayerRatios:
    """Mean and spread over samples of each normalizer's ratio in one layer, and whether the
    layer chooses (``logit_std``, ``saturated``, ``gamma_rel``; None where not measured)."""

    name: str
    normalizers: list[str]
    mean: list[float]
    std: list[float]
    p10: list[float] = field(default_factory=list)
    p90: list[float] = field(default_factory=list)
    logit_std: list[float] | None = None
    """Spread over samples of each logit, centered per sample (softmax ignores a shift)."""
    saturated: float | None = None
    """Share of the ratio branch's hidden units saturated, over samples and units."""
    gamma_rel: list[float] | None = None
    """Each normalizer's gamma size relative to the source normalizer's."""

    @property
    def dominant(self) -> str:
        return self.normalizers[max(range(len(self.mean)), key=self.mean.__getitem__)]

    @property
    def spread(self) -> float:
        """The largest std over samples of a normalizer's ratio: 0 for a fixed mixture."""
        return max(self.std, default=0.0)

    def to_json(self, digits: int = 6) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "normalizers": self.normalizers,
            "mean": [round(v, digits) for v in self.mean],
            "std": [round(v, digits) for v in self.std],
        }
        if self.logit_std is not None:
            out["logit_std"] = [round(v, digits) for v in self.logit_std]
        if self.saturated is not None:
            out["saturated"] = round(self.saturated, digits)
        if self.gamma_rel is not None:
            out["gamma_rel"] = [round(v, digits) for v in self.gamma_rel]
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LayerRatios:
        """A layer's stored statistics (files from before the diagnostics lack them)."""
        return cls(
            data["name"],
            list(data["normalizers"]),
            list(data["mean"]),
            list(data["std"]),
            logit_std=data.get("logit_std"),
            saturated=data.get("saturated"),
            gamma_rel=data.get("gamma_rel"),
        )


def layer_ratios(
    names: list[str],
    normalizers: list[tuple[str, ...]],
    ratios: Tensor,
    logits: Tensor | None = None,
    saturated: Tensor | None = None,
    gamma: list[list[float] | None] | None = None,
) -> list[LayerRatios]:
    """Per layer: mean, std, 10th and 90th percentiles over samples of every normalizer's ratio;
    with ``logits`` (N x L x K), ``saturated`` (N x L) and ``gamma`` (per layer), the
    diagnostics of whether it chooses (``LayerRatios``)."""
    out = []
    for i, (name, norms) in enumerate(zip(names, normalizers)):
        k = len(norms)
        lam = ratios[:, i, :k].double()
        q = torch.quantile(lam, torch.tensor([0.1, 0.9], dtype=lam.dtype), dim=0)
        row = LayerRatios(
            name,
            list(norms),
            lam.mean(0).tolist(),
            _std(lam).tolist(),
            q[0].tolist(),
            q[1].tolist(),
        )
        if logits is not None:
            z = logits[:, i, :k].double()
            row.logit_std = _std(z - z.mean(1, keepdim=True)).tolist()
        if saturated is not None and not bool(saturated[:, i].isnan().any()):
            row.saturated = float(saturated[:, i].double().mean())
        if gamma is not None:
            row.gamma_rel = gamma[i]
        out.append(row)
    return out


def _std(x: Tensor) -> Tensor:
    """Population std over samples (0 for one sample)."""
    return x.std(0, correction=0) if x.shape[0] > 1 else torch.zeros(x.shape[1], dtype=x.dtype)


def summarize(
    names: list[str],
    normalizers: list[tuple[str, ...]],
    readout: Readout | Tensor,
    gamma: list[list[float] | None] | None = None,
) -> dict[str, Any]:
    """Per-layer ratio statistics and diagnostics (JSON-ready, for a checkpoint's metadata)."""
    if isinstance(readout, Tensor):
        readout = Readout(readout, None, None)  # type: ignore[arg-type]
    rows = layer_ratios(names, normalizers, *readout, gamma=gamma)
    return {"samples": int(readout.ratios.shape[0]), "layers": [r.to_json() for r in rows]}


def selection_scalars(stats: dict[str, Any]) -> dict[str, float]:
    """Whether the model's EN layers choose, in four numbers for the run's metrics at each
    eval: the mean over layers of the largest ratio std and of the largest logit std over
    samples, the mean share of saturated hidden units, and the mean gamma size of the
    normalizers other than the source's (relative to it)."""
    rows = [LayerRatios.from_json(r) for r in stats["layers"]]
    out = {"ratio_spread": sum(r.spread for r in rows) / max(len(rows), 1)}
    logit = [max(r.logit_std) for r in rows if r.logit_std]
    if logit:
        out["logit_spread"] = sum(logit) / len(logit)
    saturated = [r.saturated for r in rows if r.saturated is not None]
    if saturated:
        out["saturated"] = sum(saturated) / len(saturated)
    others = [g for r in rows if r.gamma_rel for g in r.gamma_rel if g != 1.0]
    if others:
        out["gamma_other"] = sum(others) / len(others)
    return out
