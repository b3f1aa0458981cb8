"""One user cache for weights and data, found the same way from every directory.

``$ENORM_HOME``, else ``$XDG_CACHE_HOME/enorm``, else ``~/.cache/enorm`` (as Hugging Face
and torch keep theirs). ``assets/`` holds weights files, ``data/`` unpacked datasets.
Recipes name files in it as ``${ENORM_HOME}/assets/...``: ``expand_path`` resolves that
with the same rule even when the variable is unset, so a packaged recipe works anywhere.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

HOME_VARIABLE = "ENORM_HOME"


def enorm_home() -> Path:
    """The cache root: $ENORM_HOME, else $XDG_CACHE_HOME/enorm, else ~/.cache/enorm."""
    explicit = os.environ.get(HOME_VARIABLE)
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "enorm"


def assets_dir() -> Path:
    """Weights files (e.g. torchvision's mobilenet_v2-b0353104.pth)."""
    return enorm_home() / "assets"


def data_dir() -> Path:
    """Datasets unpacked for training and evaluation (Fashion-MNIST's idx files)."""
    return enorm_home() / "data"


_HOME_REFERENCE = re.compile(
    r"\$\{" + HOME_VARIABLE + r"\}|\$" + HOME_VARIABLE + r"(?![A-Za-z0-9_])"
)


def expand_path(value: str) -> str:
    """``${ENORM_HOME}`` (by the cache rule), other ``$VARS`` and a leading ``~``, expanded."""
    value = _HOME_REFERENCE.sub(lambda _: str(enorm_home()), value)
    return os.path.expanduser(os.path.expandvars(value))
