"""enorm: Exemplar Normalization for timm and torchvision models.

Import is cheap: torch and timm load on first use of what needs them.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

try:
    __version__ = version("enorm")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0.0.0+unknown"

if TYPE_CHECKING:
    from .checkpoint import load_model as load_model

__all__ = ["__version__", "load_model"]


def __getattr__(name: str) -> Any:
    """Lazy re-exports, so ``import enorm_cli`` does not import torch."""
    if name == "load_model":
        from .checkpoint import load_model

        return load_model
    raise AttributeError(f"module 'enorm_cli' has no attribute {name!r}")
