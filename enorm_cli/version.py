"""enorm's version, from the installed package's metadata (one place; the checkpoint format
records it)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("enorm")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0.0.0+unknown"
