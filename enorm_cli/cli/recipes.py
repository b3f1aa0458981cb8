"""``enorm recipes``: list the packaged recipes, or copy one out to edit (``cp``)."""

from __future__ import annotations

from pathlib import Path

import typer

from .common import stdout, user_errors

app = typer.Typer(
    name="recipes",
    help="The recipes that ship with enorm: list them (default), or copy one out to edit.",
    invoke_without_command=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _print_list() -> None:
    from rich.table import Table

    from ..config.registry import list_recipes

    table = Table(
        title="enorm recipes (enorm finetune --recipe NAME)", title_justify="left", show_lines=True
    )
    table.add_column("name", no_wrap=True)
    table.add_column("what it is for", ratio=3)
    table.add_column("hardware and time", ratio=2)
    for entry in list_recipes():
        table.add_row(entry.name, entry.purpose, entry.hardware)
    stdout.print(table)


@app.callback()
@user_errors
def recipes(ctx: typer.Context) -> None:
    """List the packaged recipes (what each is for, the hardware and time it needs)."""
    if ctx.invoked_subcommand is None:
        _print_list()


@app.command("ls")
@user_errors
def ls() -> None:
    """List the packaged recipes."""
    _print_list()


@app.command("cp", no_args_is_help=True)
@user_errors
def cp(
    name: str = typer.Argument(..., help="A packaged recipe (enorm recipes lists them)."),
    dest: Path = typer.Argument(..., help="A file, or a folder to write NAME.yaml in."),
    force: bool = typer.Option(False, "--force", help="Overwrite DEST if it exists."),
) -> None:
    """Copy a packaged recipe out, to edit and run with --recipe DEST.

    Example:

      enorm recipes cp quickstart my_run.yaml && enorm finetune --recipe my_run.yaml
    """
    from ..config.registry import copy_recipe

    target = copy_recipe(name, dest, force)
    stdout.print(f"wrote {target}", markup=False, soft_wrap=True)
