"""``enorm finetune``: fine-tune an EN model from a YAML recipe with Accelerate."""

from __future__ import annotations

import typer

from .common import user_errors


@user_errors
def finetune(
    overrides: list[str] | None = typer.Argument(
        None, help="Recipe overrides as key=value, e.g. optim.lr=0.01 data.batch_size=64."
    ),
    recipe: str = typer.Option(
        ..., "--recipe", "-r", help="A recipe file, or a packaged NAME (enorm recipes lists them)."
    ),
    resume: bool = typer.Option(
        False, "--resume", help="Continue the run in output_dir from its last state."
    ),
    force: bool = typer.Option(
        False, "--force", help="Start over in an output_dir that holds a run."
    ),
    progress: bool = typer.Option(
        True, "--progress/--no-progress", help="Rich progress bar (off for log files)."
    ),
) -> None:
    """Fine-tune from a recipe: one process here, many under accelerate launch or torchrun.

    Examples:

      enorm finetune --recipe quickstart

      enorm finetune --recipe quickstart optim.lr=0.02 schedule.epochs=2

      enorm finetune --recipe my_run.yaml

      torchrun --nproc_per_node 2 -m enorm_cli finetune --recipe quickstart

      accelerate launch --multi_gpu --num_processes 8 -m enorm_cli finetune
      --recipe webvision data.root=/data/webvision
    """
    from ..config.recipe import load_recipe
    from ..config.registry import resolve_recipe
    from ..finetune.loop import finetune as run

    run(
        load_recipe(resolve_recipe(recipe), overrides or []),
        resume=resume,
        force=force,
        progress=progress,
    )
