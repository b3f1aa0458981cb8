"""enorm: Exemplar Normalization for the models you already have, as a library and a CLI.

Import is cheap: torch and timm load on first use of a name that needs them.

    import torchvision, enorm_cli

    model = enorm_cli.convert_model(torchvision.models.resnet18(), verify=True)
    optimizer = torch.optim.SGD(enorm_cli.param_groups(model, lr=0.01), lr=0.01, momentum=0.9)
    enorm_cli.set_bn_stats(model, "renorm_frozen")   # where you would call model.train()

The Python API page of the docs lists every name.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .version import __version__

if TYPE_CHECKING:
    from .checkpoint import load_model, save_model
    from .config.settings import ENSettings
    from .convert import convert_model
    from .convert.verify import verify_conversion
    from .errors import EnormError
    from .finetune.optim import param_groups
    from .inspect.recorder import RatioRecorder, layer_ratios
    from .layers import (
        ExemplarNorm2d,
        ExemplarNormAct2d,
        MixedNorm2d,
        SwitchableNorm2d,
        SwitchableNormAct2d,
    )
    from .layers.modes import set_bn_stats, set_sync_stats

_EXPORTS = {
    # conversion
    "convert_model": ".convert",
    "verify_conversion": ".convert.verify",
    "ENSettings": ".config.settings",
    # layers
    "ExemplarNorm2d": ".layers",
    "ExemplarNormAct2d": ".layers",
    "SwitchableNorm2d": ".layers",
    "SwitchableNormAct2d": ".layers",
    "MixedNorm2d": ".layers",
    # training
    "set_bn_stats": ".layers.modes",
    "set_sync_stats": ".layers.modes",
    "param_groups": ".finetune.optim",
    # inspection
    "RatioRecorder": ".inspect.recorder",
    "layer_ratios": ".inspect.recorder",
    # files
    "load_model": ".checkpoint",
    "save_model": ".checkpoint",
    "EnormError": ".errors",
}

__all__ = [
    "__version__",
    "ENSettings",
    "EnormError",
    "ExemplarNorm2d",
    "ExemplarNormAct2d",
    "MixedNorm2d",
    "RatioRecorder",
    "SwitchableNorm2d",
    "SwitchableNormAct2d",
    "convert_model",
    "layer_ratios",
    "load_model",
    "param_groups",
    "save_model",
    "set_bn_stats",
    "set_sync_stats",
    "verify_conversion",
]


def __getattr__(name: str) -> Any:
    """Lazy re-exports (PEP 562), so ``import enorm_cli`` does not import torch."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'enorm_cli' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value  # looked up once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
