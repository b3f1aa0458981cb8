"""``enorm eval``: top-1/top-5 of a checkpoint on a dataset split (cross-dataset evaluation)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from .common import (
    data_option,
    overrides_argument,
    recipe_option,
    shift_option,
    split_config,
    user_errors,
)


@user_errors
def evaluate(
    checkpoint: Path = typer.Argument(
        ..., help="An enorm .safetensors (convert or finetune output)."
    ),
    data: str | None = data_option(),
    recipe: str | None = recipe_option(),
    overrides: list[str] | None = overrides_argument(),
    batch_size: int = typer.Option(64, "--batch-size", min=1),
    workers: int = typer.Option(2, "--workers", min=0),
    limit: int | None = typer.Option(
        None, "--limit", min=1, help="Evaluate a fixed random subset."
    ),
    first_classes: int | None = typer.Option(
        None, "--first-classes", min=1, help="Keep labels < N (a 50-class model on ImageNet val)."
    ),
    shift: str | None = shift_option(),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Evaluate CHECKPOINT on a split, preparing images with the checkpoint's data config.

    Examples:

      enorm eval runs/quickstart/best.safetensors --data fashion_mnist

      enorm eval runs/mini_webvision/best.safetensors --data /data/imagenet/val --limit 5000
    """
    from ..errors import EnormError
    from ..evaluate import evaluate_checkpoint

    if (data is None) == (recipe is None):
        raise EnormError("give exactly one of --data SPEC or --recipe R")
    cfg = split_config(data, recipe, overrides, shift)
    if first_classes is not None:
        cfg = cfg.model_copy(update={"first_classes": first_classes})
    result = evaluate_checkpoint(checkpoint, cfg, batch_size, workers, limit)
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "top1": result.top1,
                    "top5": result.top5,
                    "loss": result.loss,
                    "samples": result.samples,
                }
            )
        )
    else:
        typer.echo(
            f"{checkpoint}: top-1 {result.top1:.2f}% top-5 {result.top5:.2f}% "
            f"loss {result.loss:.4f} on {result.samples} images"
        )
