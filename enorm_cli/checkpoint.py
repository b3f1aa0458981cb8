"""EN checkpoints: one .safetensors file with the weights and what rebuilds the model.

Metadata values are strings (safetensors' rule); structured fields are JSON
text. ``load_model`` needs nothing but the file: it builds the source
architecture without weights, re-runs the same surgery and loads strictly.

Format versions: files from an older format are brought up to this one when read
(``MIGRATIONS``, one step per version, as torch's ``_version`` and
``_load_from_state_dict`` do for a module's state); a newer format is refused with
"upgrade enorm".
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from torch import nn

from .config.settings import ENSettings, validation_line
from .errors import EnormError
from .fileio import atomic_path
from .models import build_model
from .version import __version__

FORMAT_VERSION = 4
KEY = "enorm."


def _v1_to_v2(meta: dict[str, str]) -> dict[str, str]:
    """Format 1 files written before the ratio branch had ``logit_scale`` have an unscaled
    FC2 (s = 1); format 2 always stores the key (None: the default 1 / sqrt(pi K))."""
    from .layers.exemplar_norm import with_logit_scale

    settings = with_logit_scale(json.loads(meta[KEY + "en_settings"]))
    return {**meta, KEY + "en_settings": json.dumps(settings, sort_keys=True)}


def _v2_to_v3(meta: dict[str, str]) -> dict[str, str]:
    """Format 2 files were written before EN's branch could be centered: their layers read h
    as it is (``centered`` false)."""
    settings = {"centered": False, **json.loads(meta[KEY + "en_settings"])}
    return {**meta, KEY + "en_settings": json.dumps(settings, sort_keys=True)}


def _v3_to_v4(meta: dict[str, str]) -> dict[str, str]:
    """Format 3 files were written before EN's anchored start: their layers mix with the
    ratios alone (``anchored`` false; the state has no ``mix_offset``, which loads as 0)."""
    settings = {"anchored": False, **json.loads(meta[KEY + "en_settings"])}
    return {**meta, KEY + "en_settings": json.dumps(settings, sort_keys=True)}


MIGRATIONS: dict[int, Callable[[dict[str, str]], dict[str, str]]] = {
    1: _v1_to_v2,
    2: _v2_to_v3,
    3: _v3_to_v4,
}
"""Format N -> N + 1, on the raw metadata."""


def migrate(meta: dict[str, str], path: Path) -> dict[str, str]:
    """The metadata of an enorm file in this version's format (``MIGRATIONS``, step by step)."""
    raw = meta[KEY + "format_version"]
    try:
        version = int(raw)
    except ValueError:
        raise EnormError(
            f"{str(path)!r} has a damaged enorm format version {raw!r}; re-create it"
        ) from None
    if version > FORMAT_VERSION:
        raise EnormError(
            f"{str(path)!r} was written by a newer enorm "
            f"(format {version}; this enorm reads formats "
            f"up to {FORMAT_VERSION}): upgrade enorm"
        )
    if version < 1:
        raise EnormError(f"{str(path)!r} has an unknown enorm format {version}; re-create it")
    try:
        while version < FORMAT_VERSION:
            meta = MIGRATIONS[version](meta)
            version += 1
    except (KeyError, ValueError) as exc:
        raise EnormError(
            f"{str(path)!r} has damaged enorm metadata ({exc}); re-create it"
        ) from None
    return {**meta, KEY + "format_version": str(FORMAT_VERSION)}


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
    """Each converted layer's normalizers, in order (the settings' set plus a GroupNorm source's
    own)."""


def build_metadata(
    source_model: str,
    namespace: str,
    num_classes: int,
    settings: dict[str, Any],
    converted_layers: dict[str, str],
    data_config: dict[str, Any],
    layer_normalizers: dict[str, list[str]],
    extra: dict[str, Any] | None = None,
    model_kwargs: dict[str, Any] | None = None,
) -> dict[str, str]:
    """String metadata for safetensors; ``extra`` carries later fields (ratio stats, ...);
    ``model_kwargs``: what the source model's factory took (``models.ModelName.kwargs``)."""
    if model_kwargs:
        extra = {**(extra or {}), "model_kwargs": model_kwargs}
    meta = {
        "format": "pt",
        KEY + "format_version": str(FORMAT_VERSION),
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


def save_checkpoint(
    model: nn.Module, path: Path, metadata: dict[str, str], fault: str | None = None
) -> None:
    """Write atomically: a temp file beside ``path``, renamed on success. Shared tensors once.
    ``fault``: the write kind ``faults.write_fault`` may fail here, half written (tests)."""
    from safetensors.torch import save_model

    with atomic_path(Path(path)) as tmp:
        save_model(model, str(tmp), metadata=dict(metadata))
        if fault is not None:
            from .faults import write_fault

            try:
                write_fault(fault)
            except OSError:  # the fault strikes with half of the file written
                os.truncate(tmp, tmp.stat().st_size // 2)
                raise


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
            f"{str(path)!r} is not a readable .safetensors "
            f"file ({exc}); re-create it with enorm convert"
        ) from None


def read_info(path: Path) -> CheckpointInfo:
    """Parse an enorm checkpoint's metadata; a foreign file gets a clear error."""
    meta = read_metadata(path)
    if KEY + "format_version" not in meta:
        raise EnormError(
            f"{str(path)!r} is not an enorm checkpoint (no "
            "enorm metadata); create one with enorm convert"
        )
    meta = migrate(meta, path)
    known = {
        "format_version",
        "version",
        "source_model",
        "namespace",
        "num_classes",
        "en_settings",
        "converted_layers",
        "data_config",
        "layer_normalizers",
    }
    try:
        return CheckpointInfo(
            source_model=meta[KEY + "source_model"],
            num_classes=int(meta[KEY + "num_classes"]),
            settings=json.loads(meta[KEY + "en_settings"]),
            converted_layers=json.loads(meta[KEY + "converted_layers"]),
            data_config=json.loads(meta[KEY + "data_config"]),
            extra={
                k[len(KEY) :]: json.loads(v)
                for k, v in meta.items()
                if k.startswith(KEY) and k[len(KEY) :] not in known
            },
            enorm_version=meta[KEY + "version"],
            layer_normalizers=json.loads(meta.get(KEY + "layer_normalizers", "{}")),
        )
    except (KeyError, ValueError) as exc:
        raise EnormError(
            f"{str(path)!r} has damaged enorm metadata ({exc}); re-create it"
        ) from None


def settings_of(info: CheckpointInfo, path: Path) -> ENSettings:
    """The file's ``ENSettings``; settings this enorm cannot build are a damaged file."""
    try:
        return ENSettings.from_json(info.settings)
    except ValidationError as exc:
        raise EnormError(
            f"{str(path)!r} has settings this enorm cannot "
            f"build ({validation_line(exc, str)}); re-create it"
        ) from None


def load_model(path: str | Path) -> nn.Module:
    """Rebuild an EN model from an enorm .safetensors file alone (no network), in eval mode.

    The file names its source architecture (and the kwargs its factory took); that model is
    built without weights, converted with the file's settings and loaded strictly.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_model as load_into

    from .convert.surgery import remember, replace_norms
    from .models import parse_model_name

    path = Path(path)
    info = read_info(path)
    settings = settings_of(info, path)
    kwargs = info.extra.get("model_kwargs", {})
    name = parse_model_name(info.source_model, kwargs)
    model = build_model(name, pretrained=False, num_classes=info.num_classes or None)
    norm = info.extra.get("norm", "en")
    converted: dict[str, str] = {}
    if norm != "bn":  # "bn": a fine-tuned baseline, no surgery
        report = replace_norms(model, settings)
        converted = {layer.name: layer.source_type for layer in report.converted}
        remember(
            model,
            settings,
            report,
            source_model=name.full,
            model_kwargs=kwargs,
            data_config=info.data_config,
        )
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
        raise EnormError(
            f"{str(path)!r} does not fit its own model description ({first[:200]})"
        ) from None
    return model.eval()


def save_model(
    model: nn.Module,
    path: str | Path,
    source_model: str | None = None,
    *,
    model_kwargs: dict[str, Any] | None = None,
    data_config: dict[str, Any] | None = None,
    force: bool = False,
) -> Path:
    """Write a converted model to one .safetensors file that ``load_model`` rebuilds it from.

    ``source_model`` names the architecture the model was converted from, as enorm builds it
    (``resnet50``, ``torchvision:fasterrcnn_resnet50_fpn``, ``smp:Unet``), with
    ``model_kwargs`` its factory's kwargs (``features_only=True``,
    ``encoder_name="tu-resnet18"``); both default to what ``load_model`` read, for a model
    loaded from a file. The conversion's settings are the ones ``convert_model`` used.
    Atomic (a temp file renamed into place); an existing file only with ``force``.
    """
    from .convert.surgery import provenance_of
    from .fileio import check_writable
    from .models import data_config as default_data_config
    from .models import head_classes, parse_model_name

    path = Path(path)
    record = provenance_of(model)
    if record is None:
        raise EnormError(
            f"this {type(model).__name__} was not converted by enorm: convert it with "
            "enorm_cli.convert_model (or load it with enorm_cli.load_model) before save_model"
        )
    source_model = source_model or record.source_model
    if source_model is None:
        raise EnormError(
            "save_model needs the source architecture's name: pass source_model= "
            "('resnet50', 'torchvision:resnet18', 'smp:Unet', ...)"
        )
    kwargs = record.model_kwargs if model_kwargs is None else model_kwargs
    name = parse_model_name(source_model, kwargs)
    if path.suffix != ".safetensors":
        raise EnormError(f"{str(path)!r} must end in .safetensors")
    check_writable(path, force, "save_model path", "force=True")
    metadata = build_metadata(
        source_model=name.full,
        namespace=name.namespace,
        num_classes=head_classes(name, model),
        settings=record.settings.to_json(),
        converted_layers=record.converted_layers,
        data_config=data_config or record.data_config or default_data_config(name, model),
        layer_normalizers=record.layer_normalizers,
        model_kwargs=kwargs,
    )
    save_checkpoint(model, path, metadata)
    return path
