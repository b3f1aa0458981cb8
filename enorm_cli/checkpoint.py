"""EN checkpoints: one .safetensors file with the weights and what rebuilds the model.

Metadata values are strings (safetensors' rule); structured fields are JSON
text. ``load_model`` needs nothing but the file: it builds the source
architecture without weights, re-runs the same surgery and loads strictly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from . import __version__
from .errors import EnormError
from .fileio import atomic_path

FORMAT_VERSION = "1"
KEY = "enorm."


@dataclass(frozen=True)
class CheckpointInfo:
    """What an enorm checkpoint says about itself."""

    source_model: str
    num_classes: int
    settings: dict[str, Any]
    converted_layers: dict[str, str]
    data_config: dict[str, Any]
    extra: dict[str, Any]
    enorm_version: str
    layer_normalizers: dict[str, list[str]]
    """Each converted layer's normalizers, in order (the settings' set plus a GroupNorm source's own)."""


def build_metadata(
    source_model: str,
    namespace: str,
    num_classes: int,
    settings: dict[str, Any],
    converted_layers: dict[str, str],
    data_config: dict[str, Any],
    layer_normalizers: dict[str, list[str]],
    extra: dict[str, Any] | None = None,
) -> dict[str, str]:
    """String metadata for safetensors; ``extra`` carries later fields (ratio stats, ...)."""
    meta = {
        "format": "pt",
        KEY + "format_version": FORMAT_VERSION,
        KEY + "version": __version__,
        KEY + "source_model": source_model,
        KEY + "namespace": namespace,
        KEY + "num_classes": str(num_classes),
        KEY + "en_settings": json.dumps(settings, sort_keys=True),
        KEY + "converted_layers": json.dumps(converted_layers),
        KEY + "data_config": json.dumps(data_config, sort_keys=True),
        KEY + "layer_normalizers": json.dumps(layer_normalizers),
    }
    for key, value in (extra or {}).items():
        meta[KEY + key] = json.dumps(value)
    return meta


def save_checkpoint(model: nn.Module, path: Path, metadata: dict[str, str]) -> None:
    """Write atomically: a temp file beside ``path``, renamed on success. Shared tensors once."""
    from safetensors.torch import save_model

    with atomic_path(Path(path)) as tmp:
        save_model(model, str(tmp), metadata=dict(metadata))


def read_metadata(path: Path) -> dict[str, str]:
    """The raw metadata of a .safetensors file, with clear errors for bad files."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise EnormError(f"checkpoint {str(path)!r} not found: check the path")
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as exc:
        raise EnormError(
            f"{str(path)!r} is not a readable .safetensors file ({exc}); re-create it with enorm convert"
        ) from None


def read_info(path: Path) -> CheckpointInfo:
    """Parse an enorm checkpoint's metadata; a foreign file gets a clear error."""
    meta = read_metadata(path)
    if KEY + "format_version" not in meta:
        raise EnormError(
            f"{str(path)!r} is not an enorm checkpoint (no enorm metadata); create one with enorm convert"
        )
    if meta[KEY + "format_version"] != FORMAT_VERSION:
        raise EnormError(
            f"{str(path)!r} has enorm format {meta[KEY + 'format_version']}, this enorm reads "
            f"{FORMAT_VERSION}: upgrade enorm"
        )
    known = {"format_version", "version", "source_model", "namespace", "num_classes",
             "en_settings", "converted_layers", "data_config", "layer_normalizers"}
    try:
        return CheckpointInfo(
            source_model=meta[KEY + "source_model"],
            num_classes=int(meta[KEY + "num_classes"]),
            settings=json.loads(meta[KEY + "en_settings"]),
            converted_layers=json.loads(meta[KEY + "converted_layers"]),
            data_config=json.loads(meta[KEY + "data_config"]),
            extra={k[len(KEY):]: json.loads(v) for k, v in meta.items()
                   if k.startswith(KEY) and k[len(KEY):] not in known},
            enorm_version=meta[KEY + "version"],
            layer_normalizers=json.loads(meta.get(KEY + "layer_normalizers", "{}")),
        )
    except (KeyError, ValueError) as exc:
        raise EnormError(f"{str(path)!r} has damaged enorm metadata ({exc}); re-create it") from None


def load_model(path: str | Path) -> nn.Module:
    """Rebuild an EN model from an enorm .safetensors file alone (no network), in eval mode."""
    from safetensors import SafetensorError
    from safetensors.torch import load_model as load_into

    from .models import build_model, parse_model_name
    from .surgery import ENSettings, convert_model

    path = Path(path)
    info = read_info(path)
    name = parse_model_name(info.source_model)
    model = build_model(name, pretrained=False, num_classes=info.num_classes)
    converted: dict[str, str] = {}
    if info.extra.get("norm", "en") != "bn":  # "bn": a fine-tuned baseline, no surgery
        report = convert_model(model, ENSettings.from_json(info.settings))
        converted = {layer.name: layer.source_type for layer in report.converted}
    if converted != info.converted_layers:
        raise EnormError(
            f"{str(path)!r} does not match {info.source_model} as this timm/torchvision builds it "
            f"({len(converted)} layers converted here, {len(info.converted_layers)} in the file): "
            "use the library versions that wrote it"
        )
    try:
        load_into(model, str(path), strict=True)
    except (SafetensorError, OSError) as exc:
        raise EnormError(f"{str(path)!r} is damaged ({exc}); re-create it") from None
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise EnormError(f"{str(path)!r} does not fit its own model description ({first[:200]})") from None
    return model.eval()
