"""Rich tables and JSON/CSV files for ``enorm inspect``."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import typer
from rich import box
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table

from ..fileio import atomic_path
from .recorder import LayerRatios
from .report import InspectResult

SOURCE_TEXT = {
    "data": "measured on {n} samples",
    "stored": "stored at the checkpoint's last eval ({n} samples); "
    "pass --data for a fresh measurement",
    "prior": "the prior: no ratios stored and none measured; "
    "the ratio branch starts input-independent",
    "prior (fc2 bias only)": "the ratio branch's bias term only (no ratios stored): "
    "pass --data to measure",
}


def _layer_table(result: InspectResult, compact: bool) -> Table:
    """The per-layer table; ``compact``: 2 decimals, no borders or index, short headers, layer
    names fold."""
    names = result.normalizer_names
    kind = result.kind.upper()
    digits = 2 if compact else 3
    title = f"enorm inspect: {result.checkpoint} ({kind}, {len(result.ratios)} layers)"
    table = Table(
        title=title,
        title_justify="left",
        caption="cells: mean±std over samples of each normalizer's ratio",
        caption_justify="left",
        box=box.SIMPLE_HEAD if compact else box.HEAVY_HEAD,
        pad_edge=not compact,
        collapse_padding=compact,
    )
    if not compact:
        table.add_column("#", justify="right")
    table.add_column(
        "layer",
        overflow="fold",
        no_wrap=not compact,
        min_width=8 if compact else max((len(r.name) for r in result.ratios), default=5),
    )
    table.add_column("C", justify="right", no_wrap=True)
    if result.source != "data":
        table.add_column("params+", justify="right", no_wrap=True)
    for n in names:
        table.add_column(n, justify="right", no_wrap=True)
    table.add_column("top" if compact else "dominant", no_wrap=True)
    if result.source == "data":
        table.add_column(
            "top p10-p90" if compact else "dominant p10-p90", justify="right", no_wrap=True
        )
    for i, (info, r) in enumerate(zip(result.layers, result.ratios)):
        cells = [] if compact else [str(i)]
        cells += [r.name, str(info.channels)]
        if result.source != "data":
            cells.append(f"{info.params_added:,}")
        for n in names:
            if n in r.normalizers:
                j = r.normalizers.index(n)
                cells.append(f"{r.mean[j]:.{digits}f}±{r.std[j]:.{digits}f}")
            else:
                cells.append("-")
        cells.append(r.dominant)
        if result.source == "data":
            j = r.normalizers.index(r.dominant)
            cells.append(f"{r.p10[j]:.{digits}f}-{r.p90[j]:.{digits}f}")
        table.add_row(*cells)
    return table


DIAGNOSTIC_HEADERS = {
    "spread": "ratio sd",
    "logit_std": "logit sd",
    "saturated": "saturated",
    "gamma_rel": "gamma / source",
}
"""Whether a layer chooses (``LayerRatios``): its logits' largest spread over samples, the
share of its branch's saturated hidden units, each normalizer's gamma size relative to the
source's (in the layer's normalizer order)."""


def _diagnostics(result: InspectResult) -> list[str]:
    """The diagnostic columns this result has values for (the ratio spread only with data)."""
    columns = ["spread"] if result.source in ("data", "stored") else []
    return columns + [
        c
        for c in DIAGNOSTIC_HEADERS
        if c != "spread" and any(getattr(r, c) is not None for r in result.ratios)
    ]


def _diagnostic_cell(r: LayerRatios, column: str) -> str:
    value = getattr(r, column)
    if value is None:
        return "-"
    if column in ("spread", "logit_std"):
        return f"{value if column == 'spread' else max(value):.3f}"
    if column == "saturated":
        return f"{100 * value:.0f}%"
    return "/".join(f"{g:.2f}" for g in value)


def _diagnostics_table(result: InspectResult, columns: list[str], compact: bool) -> Table:
    """Whether each layer chooses: the largest spread over samples of a ratio and of a logit,
    the branch's saturated hidden units, and the gammas against the source's."""
    table = Table(
        title="whether EN chooses (0 spread: the same mix for every sample)",
        title_justify="left",
        caption="gamma / source: each normalizer's gamma size, in the layer's normalizer "
        "order; 0: that normalizer is inert",
        caption_justify="left",
        box=box.SIMPLE_HEAD if compact else box.HEAVY_HEAD,
        pad_edge=not compact,
        collapse_padding=compact,
    )
    table.add_column(
        "layer",
        overflow="fold",
        no_wrap=not compact,
        min_width=8 if compact else max((len(r.name) for r in result.ratios), default=5),
    )
    for column in columns:
        table.add_column(DIAGNOSTIC_HEADERS[column], justify="right", no_wrap=True)
    for r in result.ratios:
        table.add_row(r.name, *(_diagnostic_cell(r, c) for c in columns))
    return table


def print_inspection(result: InspectResult, console: Console, top: int = 3) -> None:
    """The per-layer table, a summary line, and with classes the ones that deviate most.

    Where the full table does not fit (80 columns: a pipe, a CI log), a compact one that
    keeps every ratio to 2 decimals and folds long layer names instead of cutting numbers.
    """
    names = result.normalizer_names
    kind = result.kind.upper()
    table = _layer_table(result, compact=False)
    unbounded = console.options.update(max_width=10_000)  # Measurement clamps to max_width
    if Measurement.get(console, unbounded, table).maximum > console.width:
        table = _layer_table(result, compact=True)
    console.print(table)
    console.print(SOURCE_TEXT[result.source].format(n=result.samples), markup=False, soft_wrap=True)
    dominant: dict[str, int] = {}
    for r in result.ratios:
        dominant[r.dominant] = dominant.get(r.dominant, 0) + 1
    added = sum(layer.params_added for layer in result.layers)
    console.print(
        "ratios after the softmax; dominant normalizer: "
        + ", ".join(
            f"{n} ({c} layer{'s' if c > 1 else ''})"
            for n, c in sorted(dominant.items(), key=lambda kv: -kv[1])
        )
        + f"; {kind} adds {added:,} parameters",
        markup=False,
        soft_wrap=True,
    )
    columns = _diagnostics(result)
    if columns and result.kind == "en":
        table = _diagnostics_table(result, columns, compact=False)
        if Measurement.get(console, unbounded, table).maximum > console.width:
            table = _diagnostics_table(result, columns, compact=True)
        console.print(table)
    if result.classes:
        _print_classes(result, console, names, top)


def _print_classes(result: InspectResult, console: Console, names: list[str], top: int) -> None:
    """Every class's mean ratios over layers, ranked by distance from the overall mean."""
    assert result.classes is not None
    table = Table(
        title="per class (ranked by how far its ratios sit from all samples')",
        title_justify="left",
        caption="normalizer columns: the class's mean ratio, averaged over layers",
        caption_justify="left",
    )
    table.add_column("class", overflow="fold")
    table.add_column("n", justify="right")
    table.add_column("distance", justify="right")
    for n in names:
        table.add_column(n, justify="right", no_wrap=True)
    table.add_column("most different layer", overflow="fold")
    for c in result.classes:
        cells = [c.name, str(c.samples), f"{c.deviation:.4f}"]
        for n in names:
            values = [
                m[r.normalizers.index(n)]
                for r, m in zip(result.ratios, c.mean)
                if n in r.normalizers
            ]
            cells.append(f"{sum(values) / len(values):.3f}" if values else "-")
        cells.append(c.most_deviant_layer)
        table.add_row(*cells)
    console.print(table)
    worst = result.classes[: max(top, 0)]
    if worst:
        parts = []
        for c in worst:
            i = [r.name for r in result.ratios].index(c.most_deviant_layer)
            r = result.ratios[i]
            mine = ", ".join(f"{n} {v:.2f}" for n, v in zip(r.normalizers, c.mean[i]))
            overall = ", ".join(f"{n} {v:.2f}" for n, v in zip(r.normalizers, r.mean))
            parts.append(f"{c.name} (at {r.name}: {mine} vs all {overall})")
        console.print(
            "classes whose ratios differ most: " + "; ".join(parts), markup=False, soft_wrap=True
        )


def rows_of(result: InspectResult) -> list[dict[str, Any]]:
    """Per layer, or per layer and class when classes were measured."""
    return result.class_rows() if result.classes else result.rows()


def write_json(result: InspectResult, path: Path | None) -> None:
    """JSON list of rows; to stdout when ``path`` is None."""
    text = json.dumps(rows_of(result), indent=1)
    if path is None:
        typer.echo(text)
        return
    with atomic_path(path) as tmp:
        tmp.write_text(text + "\n")


def write_csv(result: InspectResult, path: Path | None) -> None:
    """CSV of the same rows (columns: the union of every row's keys); to stdout when ``path`` is
    None."""
    rows = rows_of(result)
    fields = list(dict.fromkeys(k for row in rows for k in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, restval="")
    writer.writeheader()
    writer.writerows(rows)
    if path is None:
        typer.echo(buffer.getvalue(), nl=False)
        return
    with atomic_path(path) as tmp:
        tmp.write_text(buffer.getvalue())
