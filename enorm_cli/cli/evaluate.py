"""``enorm eval``: top-1/top-5 of a checkpoint on a dataset split (cross-dataset evaluation)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from .common import user_errors


@user_errors
def evaluate(
    checkpoint: Path = typer.Argument(
        ..., help="An enorm .safetensors (convert or finetune output)."
    ),
    data: str | None = typer.Option(
        None,
        "--data",
        help="Image folder DIR/<class>/<img>, fashion_mnist[:train], or filelist:LIST[@IMAGE_DIR].",
    ),
    recipe: str | None = typer.Option(
        None, "--recipe", help="Use this recipe's val split (a file or a packaged NAME)."
    ),
    overrides: list[str] | None = typer.Argument(None, help="Recipe overrides (with --recipe)."),
    batch_size: int = typer.Option(64, "--batch-size", min=1),
    workers: int = typer.Option(2, "--workers", min=0),
    limit: int | None = typer.Option(
        None, "--limit", min=1, help="Evaluate a fixed random subset."
    ),
    first_classes: int | None = typer.Option(
        None, "--first-classes", min=1, help="Keep labels < N (a 50-class model on ImageNet val)."
    ),
    shift: str | None = typer.Option(
        None,
        "--shift",
        help="Shift each image's appearance by its own draw: contrast|brightness|gamma:SEVERITY "
        "(0-5).",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Evaluate CHECKPOINT on a split, preparing images with the checkpoint's data config.

    Examples:

      enorm eval runs/quickstart/best.safetensors --data fashion_mnist

      enorm eval runs/mini_webvision/best.safetensors --data /data/imagenet/val --limit 5000
    """
    from ..data import parse_data_spec
    from ..errors import EnormError
    from ..evaluate import evaluate_checkpoint
    from ..recipe import load_recipe
    from ..recipe_registry import resolve_recipe
    from ..shift import parse_shift

    if (data is None) == (recipe is None):
        raise EnormError("give exactly one of --data SPEC or --recipe R")
    cfg = (
        parse_data_spec(data)
        if data is not None
        else load_recipe(resolve_recipe(recipe), overrides or []).data
    )
    if first_classes is not None:
        cfg = cfg.model_copy(update={"first_classes": first_classes})
    if shift is not None:
        cfg = cfg.model_copy(update={"shift": str(parse_shift(shift))})
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
