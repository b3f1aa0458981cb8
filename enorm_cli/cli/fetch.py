"""``enorm fetch``: the quickstart's weights and data, into the user cache."""

from __future__ import annotations

import typer

from .common import stdout, user_errors


@user_errors
def fetch() -> None:
    """Fetch torchvision's ImageNet MobileNetV2 weights and Fashion-MNIST into the user cache.

    The cache is $ENORM_HOME, else $XDG_CACHE_HOME/enorm, else ~/.cache/enorm. Files already
    there (with the right hash) are kept. Afterwards `enorm finetune --recipe quickstart` runs
    from any directory.
    """
    from ..cache import enorm_home
    from ..data.fetch import fetch_all

    stdout.print(f"cache: {enorm_home()}", markup=False, soft_wrap=True)
    results = fetch_all()
    for item in results:
        stdout.print(f"{item.name}: {item.status} ({item.path})", markup=False, soft_wrap=True)
    missing = [item.name for item in results if item.status.startswith("missing")]
    if missing:
        typer.echo(
            f"error: could not fetch {', '.join(missing)}: see the lines above for the fix",
            err=True,
        )
        raise typer.Exit(1)
