"""``enorm build-kernel``: compile EN's optional C++ CPU kernel once."""

from __future__ import annotations

import typer

from .common import stdout, user_errors


@user_errors
def build_kernel() -> None:
    """Build EN's C++ CPU kernel (about a minute, with a C++ compiler), or find it built.

    Without it EN runs on its tensor ops: the same function, slower on CPU. The build is kept
    in $ENORM_HOME/native/ under a name that hashes the source, the flags and torch's version,
    and runs are never stalled by a build: they use the kernel once it is there
    (ENORM_NATIVE=0 turns it off).

    Examples:

      enorm build-kernel
    """
    from ..layers import native

    try:
        native.build()
    except Exception as error:  # the loader raises RuntimeError, OSError, CalledProcessError
        text = str(error).strip()
        first = text.splitlines()[0] if text else type(error).__name__
        typer.echo(
            f"error: EN's C++ kernel was not built ({first}); install a C++ compiler "
            "(g++ or clang++) and run `enorm build-kernel` again, or keep EN's tensor ops",
            err=True,
        )
        raise typer.Exit(1) from None
    stdout.print(f"EN's C++ kernel: built in {native.build_dir()}", markup=False, soft_wrap=True)
