"""What EN chose: per-layer, per-sample and per-class normalizer ratios (``enorm inspect``).

Two sources: the checkpoint alone (layer list from the file's tensors and metadata,
the ratio statistics its last eval stored, or the prior the branch starts from,
with no model built and no timm import), or a forward pass over data with
``RatioRecorder`` hooks. Ratios are always post-softmax and named.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..checkpoint import CheckpointInfo, read_info
from ..convert.surgery import ConvertedLayer
from ..errors import EnormError
from ..layers import get_norm_layer
from ..layers.base import STATE_BUFFERS
from .recorder import LayerRatios, Readout, layer_ratios


@dataclass
class ClassRatios:
    """Mean ratios of one class in every layer, and how far they sit from all samples' mean."""

    label: int
    name: str
    samples: int
    mean: list[list[float]]  # layer x normalizer
    distances: list[float]  # per layer: total-variation distance to all samples' mean ratios
    most_deviant_layer: str

    @property
    def deviation(self) -> float:
        """Mean over layers of ``distances``: how far this class's ratios sit overall."""
        return sum(self.distances) / len(self.distances)


@dataclass
class InspectResult:
    checkpoint: str
    kind: str  # "en" or "sn"
    source: str  # "data", "stored" or "prior"
    samples: int
    layers: list[ConvertedLayer]
    ratios: list[LayerRatios]
    classes: list[ClassRatios] | None = None
    per_sample: Tensor | None = None  # N x L x K_max, for plots

    @property
    def normalizer_names(self) -> list[str]:
        """Every normalizer any layer mixes, in first-seen order (table and plot columns)."""
        return list(dict.fromkeys(n for r in self.ratios for n in r.normalizers))

    def rows(self) -> list[dict[str, Any]]:
        """One row per layer: each normalizer's mean ratio under its own name (they sum to 1)."""
        out = []
        for index, (info, r) in enumerate(zip(self.layers, self.ratios)):
            row: dict[str, Any] = {"index": index, "layer": r.name, "channels": info.channels}
            row.update({n: m for n, m in zip(r.normalizers, r.mean)})
            row.update({f"{n}_std": s for n, s in zip(r.normalizers, r.std)})
            if r.logit_std is not None:
                row.update({f"{n}_logit_std": s for n, s in zip(r.normalizers, r.logit_std)})
            if r.saturated is not None:
                row["saturated"] = r.saturated
            if r.gamma_rel is not None:
                row.update({f"{n}_gamma_rel": g for n, g in zip(r.normalizers, r.gamma_rel)})
            row.update({"dominant": r.dominant, "samples": self.samples, "source": self.source})
            out.append(row)
        return out

    def class_rows(self) -> list[dict[str, Any]]:
        """One row per layer and class (with ``--by-class``)."""
        out = []
        for c in self.classes or []:
            for r, mean in zip(self.ratios, c.mean):
                row: dict[str, Any] = {
                    "layer": r.name,
                    "class": c.label,
                    "class_name": c.name,
                    "samples": c.samples,
                }
                row.update({n: m for n, m in zip(r.normalizers, mean)})
                out.append(row)
        return out


def checkpoint_layers(path: Path, info: CheckpointInfo) -> tuple[str, list[ConvertedLayer]]:
    """EN/SN layers from the file's tensor shapes and metadata, without building the model."""
    from safetensors import safe_open

    if not info.converted_layers:
        raise EnormError(
            f"{str(path)!r} has no EN layers (a fine-tuned BatchNorm baseline): nothing to inspect"
        )
    kind = info.settings.get("layer", "en")
    layers = []
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        for name, source_type in info.converted_layers.items():
            prefix = f"{name}."
            own = [
                k
                for k in keys
                if k.startswith(prefix)
                and k[len(prefix) :] not in STATE_BUFFERS
                and not k.endswith("._extra_state")  # settings kept as state, not parameters
            ]
            own = [
                k
                for k in own
                if "." not in k[len(prefix) :] or k[len(prefix) :].startswith("ratio.")
            ]
            channels = f.get_slice(prefix + "running_mean").get_shape()[0]
            params = sum(math.prod(f.get_slice(k).get_shape()) for k in own)
            normalizers = info.layer_normalizers.get(name) or list(info.settings["normalizers"])
            layers.append(
                ConvertedLayer(
                    name, source_type, channels, tuple(normalizers), params - 2 * channels
                )
            )
    return kind, layers


def prior_ratios(
    path: Path, kind: str, layers: list[ConvertedLayer]
) -> tuple[list[LayerRatios], bool]:
    """Ratios that do not depend on the input (the layer class's ``prior_ratio_logits``): SN's
    static ones, or EN's branch at conversion (softmax(fc2.bias), exact while fc2.weight is
    zero). Returns the ratios and whether they are what forward uses.
    """
    from safetensors import safe_open

    cls = get_norm_layer(kind)
    out = []
    exact = True
    with safe_open(str(path), framework="pt") as f:
        for layer in layers:
            logits, layer_exact = cls.prior_ratio_logits(
                lambda key, p=layer.name: f.get_tensor(f"{p}.{key}")
            )
            exact = exact and bool(layer_exact)
            lam = torch.softmax(logits.double(), 0).tolist()
            zeros = [0.0] * len(lam)
            out.append(LayerRatios(layer.name, list(layer.normalizers), lam, zeros, lam, lam))
    return out, exact


def file_gamma_sizes(
    path: Path, kind: str, layers: list[ConvertedLayer]
) -> list[list[float] | None]:
    """Each EN layer's gamma sizes from the file's weights (``MixedNorm2d.gamma_sizes``,
    relative to the largest row: the file does not name the source normalizer); None for SN
    and shared affines."""
    from safetensors import safe_open

    out: list[list[float] | None] = []
    with safe_open(str(path), framework="pt") as f:
        for layer in layers:
            weight = f.get_tensor(f"{layer.name}.weight").double()
            if kind != "en" or weight.dim() != 2 or weight.shape[0] == 1:
                out.append(None)
                continue
            rms = weight.square().mean(1).sqrt()
            out.append((rms / rms.max().clamp_min(1e-30)).tolist())
    return out


def inspect_checkpoint(path: Path) -> InspectResult:
    """The no-data view: layers plus the stored ratio statistics of the last eval, else the
    prior."""
    info = read_info(path)
    kind, layers = checkpoint_layers(path, info)
    stored = info.extra.get("ratio_stats")
    if stored and stored.get("layers"):
        ratios = [LayerRatios.from_json(s) for s in stored["layers"]]
        for r, gamma in zip(ratios, file_gamma_sizes(path, kind, layers)):
            r.gamma_rel = r.gamma_rel or gamma  # files from before the diagnostics
        return InspectResult(str(path), kind, "stored", int(stored["samples"]), layers, ratios)
    ratios, exact = prior_ratios(path, kind, layers)
    for r, gamma in zip(ratios, file_gamma_sizes(path, kind, layers)):
        r.gamma_rel = gamma
    return InspectResult(
        str(path), kind, "prior" if exact else "prior (fc2 bias only)", 0, layers, ratios
    )


def per_class(
    ratios: Tensor, targets: Tensor, layer_ratios: list[LayerRatios], class_names: list[str] | None
) -> list[ClassRatios]:
    """Mean ratios per class; classes ranked by how far their ratios sit from the overall mean."""
    overall = torch.nan_to_num(ratios.double().mean(0))  # L x K
    out = []
    for label in sorted(set(targets.tolist())):
        mine = torch.nan_to_num(ratios[targets == label].double().mean(0))
        tv = 0.5 * (mine - overall).abs().sum(1)  # per layer
        worst = int(tv.argmax())
        mean = [mine[i, : len(r.normalizers)].tolist() for i, r in enumerate(layer_ratios)]
        name = class_names[label] if class_names and label < len(class_names) else str(label)
        out.append(
            ClassRatios(
                label,
                name,
                int((targets == label).sum()),
                mean,
                tv.tolist(),
                layer_ratios[worst].name,
            )
        )
    return sorted(out, key=lambda c: -c.deviation)


def inspect_on_data(
    path: Path,
    data: Any,
    samples: int,
    batch_size: int = 64,
    workers: int = 2,
    by_class: bool = False,
) -> InspectResult:
    """Run the model in eval mode over ``samples`` images and record every EN layer's ratios."""
    from ..checkpoint import load_model
    from ..data.datasets import checkpoint_split
    from .recorder import RatioRecorder

    info = read_info(path)
    kind, layers = checkpoint_layers(path, info)
    split = checkpoint_split(data, info.data_config, None, samples)  # labels only group samples
    model = load_model(path)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    loader = torch.utils.data.DataLoader(split.dataset, batch_size=batch_size, num_workers=workers)
    batches, labels = [], []
    with RatioRecorder(model) as recorder, torch.inference_mode():
        for x, y in loader:
            try:
                model(x.to(device))
            except RuntimeError as exc:
                first = str(exc).strip().splitlines()[0][:160]
                raise EnormError(
                    f"the data does not fit the model ({first}): check --data"
                ) from None
            batches.append(recorder.take_readout())
            labels.append(y)
    readout = Readout.cat(batches)
    ratios = readout.ratios
    targets = torch.cat(labels)
    summary = layer_ratios(
        recorder.names, recorder.normalizers, *readout, gamma=recorder.gamma_sizes()
    )
    classes = per_class(ratios, targets, summary, split.classes) if by_class else None
    return InspectResult(
        str(path), kind, "data", int(ratios.shape[0]), layers, summary, classes, ratios
    )
