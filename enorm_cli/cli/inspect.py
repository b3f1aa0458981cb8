"""``enorm inspect``: which normalizers EN chose, per layer, per sample and per class."""

from __future__ import annotations

from pathlib import Path

import typer

from .common import (
    data_option,
    overrides_argument,
    recipe_option,
    shift_option,
    split_config,
    stdout,
    user_errors,
)


@user_errors
def inspect(
    checkpoint: Path = typer.Argument(
        ..., help="An enorm .safetensors (convert or finetune output)."
    ),
    overrides: list[str] | None = overrides_argument(),
    data: str | None = data_option(),
    recipe: str | None = recipe_option(),
    samples: int = typer.Option(512, "--samples", help="How many images (a fixed random subset)."),
    shift: str | None = shift_option(),
    by_class: bool = typer.Option(
        False, "--by-class", help="Mean ratios per class; the classes that deviate most."
    ),
    json_out: Path | None = typer.Option(None, "--json", help="Write rows as JSON ('-': stdout)."),
    csv_out: Path | None = typer.Option(None, "--csv", help="Write rows as CSV ('-': stdout)."),
    plot: Path | None = typer.Option(None, "--plot", help="Write a PNG figure."),
    top: int = typer.Option(3, "--top", help="How many deviating classes to name."),
    batch_size: int = typer.Option(64, "--batch-size"),
    workers: int = typer.Option(2, "--workers"),
    force: bool = typer.Option(False, "--force", help="Overwrite --json/--csv/--plot files."),
) -> None:
    """Show EN's normalizer ratios (after the softmax, named) for every EN layer of CHECKPOINT.

    Without data: the layers and the ratio statistics stored at the checkpoint's last
    eval (or, for a fresh conversion, the prior). With --data or --recipe: the model
    runs in eval mode over --samples images and hooks record every layer's ratios.

    Examples:

      enorm inspect runs/quickstart/best.safetensors

      enorm inspect runs/quickstart/best.safetensors --data fashion_mnist --by-class --plot r.png

      enorm inspect runs/quickstart/best.safetensors --recipe quickstart --json rows.json
    """
    from ..errors import EnormError
    from ..fileio import check_writable

    if samples < 1:
        raise EnormError(f"--samples must be a positive integer, got {samples}")
    if batch_size < 1 or workers < 0:
        raise EnormError("--batch-size must be positive and --workers not negative")
    if data is not None and recipe is not None:
        raise EnormError("give at most one of --data SPEC or --recipe R")
    if shift is not None and data is None and recipe is None:
        raise EnormError("--shift needs images: add --data SPEC or --recipe R")
    if by_class and data is None and recipe is None:
        raise EnormError("--by-class needs images: add --data SPEC or --recipe R")
    for flag, path in (("--json", json_out), ("--csv", csv_out), ("--plot", plot)):
        if path is not None and str(path) != "-":
            check_writable(path, force, flag)
    if json_out is not None and csv_out is not None and str(json_out) == str(csv_out) == "-":
        raise EnormError("--json - and --csv - both want stdout: send one of them to a file")
    if plot is not None and plot.suffix.lower() != ".png":
        raise EnormError(f"--plot {str(plot)!r} must end in .png")

    from ..inspect.report import inspect_checkpoint, inspect_on_data

    if data is None and recipe is None:
        result = inspect_checkpoint(checkpoint)
    else:
        cfg = split_config(data, recipe, overrides, shift)
        result = inspect_on_data(checkpoint, cfg, samples, batch_size, workers, by_class)

    from ..inspect.tables import print_inspection, write_csv, write_json

    to_stdout = any(p is not None and str(p) == "-" for p in (json_out, csv_out))
    if not to_stdout:
        print_inspection(result, stdout, top)
    if json_out is not None:
        write_json(result, None if str(json_out) == "-" else json_out)
    if csv_out is not None:
        write_csv(result, None if str(csv_out) == "-" else csv_out)
    if plot is not None:
        from ..inspect.plot import plot_ratios

        plot_ratios(result, plot)
    for path in (json_out, csv_out, plot):
        if path is not None and str(path) != "-":
            typer.echo(f"wrote {path}", err=to_stdout)  # keep stdout machine-readable
