"""Figures of EN's ratios: mean per layer along the depth, and their spread over samples."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..fileio import atomic_path
from .report import InspectResult

COLORS = {"bn": "#4C72B0", "in": "#DD8452", "ln": "#55A868", "gn": "#C44E52"}


def pick_layers(result: InspectResult, wanted: int = 4) -> list[int]:
    """The layers whose ratios vary most across samples (std of the dominant normalizer), by
    depth."""
    spread = [r.std[r.normalizers.index(r.dominant)] for r in result.ratios]
    return sorted(sorted(range(len(spread)), key=lambda i: -spread[i])[:wanted])


def _layer_ticks(ax: Any, names: list[str]) -> None:
    """About 16 layer names along a depth axis."""
    step = max(1, len(names) // 16)
    ax.set_xticks(
        range(0, len(names), step),
        [names[i] for i in range(0, len(names), step)],
        rotation=60,
        ha="right",
        fontsize=7,
    )


def plot_ratios(result: InspectResult, out: Path, layers: list[int] | None = None) -> None:
    """One PNG: stacked mean ratios per layer; with per-sample data, box plots for chosen layers;
    with classes, a heat map of each class's distance from the mean ratios per layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r.name for r in result.ratios]
    normalizers = result.normalizer_names
    panels = 1 + (result.per_sample is not None) + (bool(result.classes))
    fig, axes = plt.subplots(
        panels, 1, figsize=(max(8.0, 0.22 * len(names) + 3), 3.6 * panels), squeeze=False
    )
    ax = axes[0][0]
    bottom = [0.0] * len(names)
    for norm in normalizers:
        values = [
            r.mean[r.normalizers.index(norm)] if norm in r.normalizers else 0.0
            for r in result.ratios
        ]
        ax.bar(
            range(len(names)), values, bottom=bottom, color=COLORS.get(norm), label=norm, width=0.85
        )
        bottom = [b + v for b, v in zip(bottom, values)]
    source = {
        "data": f"{result.samples} samples",
        "stored": f"stored at the last eval, {result.samples} samples",
    }
    ax.set_title(
        f"{Path(result.checkpoint).name}: mean {result.kind.upper()} ratio per layer "
        f"({source.get(result.source, result.source)})"
    )
    ax.set_ylabel("mean ratio (softmax)")
    ax.set_xlabel("layer (input to output)")
    ax.set_ylim(0, 1)
    ax.set_xlim(-0.6, len(names) - 0.4)
    _layer_ticks(ax, names)
    ax.legend(loc="upper right", ncol=len(normalizers), fontsize=8)
    row = 1
    if result.per_sample is not None:
        ax = axes[row][0]
        row += 1
        chosen = layers if layers is not None else pick_layers(result)
        positions, data, colors, ticks = [], [], [], []
        for slot, i in enumerate(chosen):
            norms = result.ratios[i].normalizers
            for j, norm in enumerate(norms):
                positions.append(slot * (len(normalizers) + 1) + j)
                data.append(result.per_sample[:, i, j].numpy())
                colors.append(COLORS.get(norm, "grey"))
            ticks.append((slot * (len(normalizers) + 1) + (len(norms) - 1) / 2, names[i]))
        parts = ax.boxplot(
            data, positions=positions, widths=0.7, patch_artist=True, showfliers=False
        )
        for patch, color in zip(parts["boxes"], colors):
            patch.set_facecolor(color)
        ax.set_xticks([t for t, _ in ticks], [n for _, n in ticks], fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_ylabel("ratio per sample")
        ax.set_title(
            "the layers whose ratios vary most across samples (boxes: quartiles, whiskers: 1.5 IQR)"
        )
    if result.classes:
        ax = axes[row][0]
        classes = sorted(result.classes, key=lambda c: c.label)
        image = ax.imshow([c.distances for c in classes], aspect="auto", cmap="magma")
        ax.set_yticks(range(len(classes)), [c.name for c in classes], fontsize=8)
        _layer_ticks(ax, names)
        ax.set_title("per class: distance of its mean ratios from all samples' (total variation)")
        fig.colorbar(image, ax=ax, fraction=0.03)
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
