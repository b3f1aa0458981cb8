"""Experiment trackers through Accelerate (``train.log_with``), beside metrics.jsonl.

Any tracker Accelerate knows (tensorboard, wandb, mlflow, ...). Accelerate silently drops a
tracker whose package is missing; here that is a user mistake with its install line. Scalars
go under ``train/`` and ``val/``, the resolved recipe as flat hyperparameters.
"""

from __future__ import annotations

import json
from typing import Any

from ..errors import EnormError

EXTRAS = {"tensorboard": "pip install 'enorm[tensorboard]'"}
SCALAR_KEYS = {
    "loss": "train/loss",
    "lr": "train/lr",
    "images_per_s": "train/images_per_s",
    "top1": "val/top1",
    "top5": "val/top5",
    "val_loss": "val/loss",
    "best_top1": "val/best_top1",
}


def check_trackers(names: list[str]) -> list[str]:
    """The trackers asked for, each known to Accelerate and installed; else one clear error."""
    from accelerate.tracking import get_available_trackers
    from accelerate.utils import LoggerType

    known = [t for t in LoggerType.list() if t != "all"]
    available = {str(t) for t in get_available_trackers()}
    for name in names:
        if name not in known:
            raise EnormError(
                f"train.log_with: {name!r} is not a tracker Accelerate knows; use one of "
                f"{', '.join(known)}"
            )
        if name not in available:
            fix = EXTRAS.get(name, f"pip install {name}")
            raise EnormError(f"train.log_with: {name} is not installed: {fix}")
    return list(dict.fromkeys(names))


def flat_config(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """The recipe as flat ``section.key`` scalars (TensorBoard's hparams take no lists or None)."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = prefix + key
        if isinstance(value, dict):
            flat.update(flat_config(value, name + "."))
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        else:
            flat[name] = json.dumps(value)
    return flat


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """A metrics.jsonl record's numbers, under tracker names."""
    return {
        SCALAR_KEYS[k]: float(v) for k, v in record.items() if k in SCALAR_KEYS and v is not None
    }
