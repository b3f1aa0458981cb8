"""The CLI edge: one line on stderr for user mistakes, the traceback only with --debug."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import typer
from rich.console import Console

from ..errors import EnormError
from ..preemption import Preempted

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
            # Plain print, not rich markup: messages hold paths and brackets.
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
