"""The CLI edge: one line on stderr for user mistakes, the traceback only with --debug."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

import typer
from rich.console import Console

from ..errors import EnormError
from ..finetune.preemption import Preempted

if TYPE_CHECKING:
    from ..config.recipe import DataConfig

P = ParamSpec("P")
R = TypeVar("R")

stdout = Console()
stderr = Console(stderr=True)


_debug = False


def set_debug(value: bool) -> None:
    """Set by the root callback from ``enorm --debug``."""
    global _debug
    _debug = value


def debug_enabled() -> bool:
    """``enorm --debug`` (or ENORM_DEBUG=1) shows tracebacks instead of one line."""
    return _debug or os.environ.get("ENORM_DEBUG", "") not in ("", "0")


def user_errors(fn: Callable[P, R]) -> Callable[P, R]:
    """Turn EnormError (and Ctrl-C) into one stderr line and a non-zero exit; a preempted run
    (``Preempted``) into its one line and exit code 75."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except EnormError as exc:
            if debug_enabled():
                raise
            # Plain print, not rich markup: messages hold paths and brackets. An error every
            # process of a run raised alike is printed once.
            if not exc.collective or os.environ.get("RANK", "0") == "0":
                typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(exc.exit_code) from None
        except Preempted as exc:
            if os.environ.get("RANK", "0") == "0":  # one line, not one per process
                typer.echo(str(exc), err=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None

    return wrapper


def data_option() -> Any:
    """``--data SPEC``: the split a checkpoint is evaluated or inspected on."""
    return typer.Option(
        None,
        "--data",
        help="Image folder DIR/<class>/<img>, fashion_mnist[:train], or filelist:LIST[@IMAGE_DIR].",
    )


def recipe_option() -> Any:
    """``--recipe R``: a recipe's val split instead of ``--data``."""
    return typer.Option(
        None, "--recipe", help="Use this recipe's val split (a file or a packaged NAME)."
    )


def overrides_argument() -> Any:
    """The recipe's ``key=value`` overrides (with ``--recipe``)."""
    return typer.Argument(None, help="Recipe overrides (with --recipe).")


def shift_option() -> Any:
    """``--shift KIND:SEVERITY``: each image's appearance shifted by its own draw."""
    return typer.Option(
        None,
        "--shift",
        help="Shift each image's appearance by its own draw: contrast|brightness|gamma:SEVERITY "
        "(0-5).",
    )


def split_config(
    data: str | None, recipe: str | None, overrides: list[str] | None, shift: str | None
) -> DataConfig:
    """The data section ``--data`` or ``--recipe`` (with overrides) names, with ``--shift``."""
    from ..config.recipe import load_recipe
    from ..config.registry import resolve_recipe
    from ..data.datasets import parse_data_spec
    from ..data.shift import parse_shift

    cfg = (
        parse_data_spec(data)
        if data is not None
        else load_recipe(resolve_recipe(str(recipe)), overrides or []).data
    )
    if shift is not None:
        cfg = cfg.model_copy(update={"shift": str(parse_shift(shift))})
    return cfg
