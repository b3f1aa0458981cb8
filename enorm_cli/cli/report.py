"""Rich rendering of library results (tables and summary lines)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from ..convert.pipeline import ConvertResult


def print_conversion(result: ConvertResult, console: Console) -> None:
    """Layers converted by source type, parameters before/after, and the verification."""
    table = Table(title=f"enorm convert: {result.source_model}", title_justify="left")
    table.add_column("source type")
    table.add_column("layers", justify="right")
    table.add_column("channels", justify="right")
    table.add_column("params added", justify="right")
    table.add_column("normalizers")
    groups: dict[str, list] = {}
    for layer in result.report.converted:
        groups.setdefault(layer.source_type, []).append(layer)
    for source_type, layers in groups.items():
        widths = sorted({layer.channels for layer in layers})
        table.add_row(
            source_type,
            str(len(layers)),
            f"{widths[0]}-{widths[-1]}" if len(widths) > 1 else str(widths[0]),
            f"{sum(layer.params_added for layer in layers):,}",
            ",".join(sorted({",".join(layer.normalizers) for layer in layers})),
        )
    console.print(table)
    if result.report.skipped:
        kinds: dict[str, int] = {}
        for _, kind, reason in result.report.skipped:
            kinds[f"{kind} ({reason})"] = kinds.get(f"{kind} ({reason})", 0) + 1
        console.print(
            "left as they are: " + "; ".join(f"{n} x {k}" for k, n in kinds.items()),
            markup=False,
            soft_wrap=True,
        )
    before, after = result.params_before, result.params_after
    console.print(
        f"parameters: {before:,} -> {after:,} (+{(after - before) / max(before, 1):.2%})",
        markup=False,
        soft_wrap=True,
    )
    v = result.verification
    if v is None:
        console.print("verification: skipped (--no-verify)")
    else:
        status = (
            ("[green]same function[/green]" if result.verified else "[red]DIFFERENT[/red]")
            if result.exact
            else (
                "[yellow]near the source by design (SN / shared affine: the mixed statistics "
                "differ)[/yellow]"
            )
        )
        a, a64 = v.float32, v.float64
        console.print(
            f"verification ({a.samples} samples, {a.calibration}): {status}\n"
            f"  float64: max |delta logit| {a64.max_abs_delta:.2e} ({a64.relative_delta:.2e} of "
            f"max |logit|, tolerance {v.tolerance:.1e}); written weights within "
            f"{v.rounding_ulps:.2g} units of float rounding of it\n"
            f"  float32: top-1 agreement {a.top1_agreement:.1%}, max |delta logit| "
            f"{a.max_abs_delta:.2e} ({a.relative_delta:.2e} of max |logit|)",
            soft_wrap=True,
        )
    if result.out is not None and result.verified:
        console.print(f"wrote {result.out}", markup=False, soft_wrap=True)
