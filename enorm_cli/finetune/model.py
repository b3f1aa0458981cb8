"""The model a recipe names, ready to fine-tune, and what its checkpoints must record."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from ..checkpoint import build_metadata, load_model, read_info, settings_of
from ..config.recipe import ModelConfig, Recipe
from ..config.settings import TUNED_FIELDS, ENSettings
from ..convert.surgery import replace_norms
from ..errors import EnormError
from ..models import create_source_model, data_config, num_classes_of, set_num_classes


@dataclass
class PreparedModel:
    model: nn.Module
    source_model: str
    namespace: str
    settings: ENSettings
    converted_layers: dict[str, str]
    layer_normalizers: dict[str, list[str]]
    norm: str
    mean: list[float]
    std: list[float]

    def metadata(self, data_config: dict[str, Any], extra: dict[str, Any]) -> dict[str, str]:
        return build_metadata(
            source_model=self.source_model,
            namespace=self.namespace,
            num_classes=num_classes_of(self.model),
            settings=self.settings.to_json(),
            converted_layers=self.converted_layers,
            data_config=data_config,
            layer_normalizers=self.layer_normalizers,
            extra={"norm": self.norm, **extra},
        )


def prepare_model(recipe: Recipe, num_classes: int) -> PreparedModel:
    """Load an EN checkpoint, or build the source model and convert it (``norm: en``)."""
    cfg = recipe.model
    if cfg.name.endswith(".safetensors"):
        path = Path(cfg.name)
        info = read_info(path)
        settings = settings_of(info, path)
        check_recipe_agrees(cfg, settings, info.extra.get("norm", "en"), path)
        model = load_model(path)
        if num_classes != info.num_classes:
            set_num_classes(model, num_classes)
        return PreparedModel(
            model,
            info.source_model,
            info.source_model.partition(":")[0] if ":" in info.source_model else "timm",
            settings,
            info.converted_layers,
            info.layer_normalizers,
            info.extra.get("norm", "en"),
            list(info.data_config["mean"]),
            list(info.data_config["std"]),
        )
    if cfg.pretrained and cfg.checkpoint:
        raise EnormError("model.pretrained and model.checkpoint are both set: keep one")
    name, model = create_source_model(
        cfg.name,
        pretrained=cfg.pretrained,
        checkpoint=Path(cfg.checkpoint) if cfg.checkpoint else None,
        num_classes=num_classes,
    )
    config = data_config(name, model)
    settings = cfg.settings
    converted: dict[str, str] = {}
    normalizers: dict[str, list[str]] = {}
    if cfg.norm != "bn":
        report = replace_norms(model, settings)
        if not report.converted:
            raise EnormError(
                f"{cfg.name} has no BatchNorm or GroupNorm layer to convert: use model.norm=bn"
            )
        converted = {c.name: c.source_type for c in report.converted}
        normalizers = {c.name: list(c.normalizers) for c in report.converted}
        settings = report.settings_used(settings)
    return PreparedModel(
        model,
        name.full,
        name.namespace,
        settings,
        converted,
        normalizers,
        cfg.norm,
        list(config["mean"]),
        list(config["std"]),
    )


def check_recipe_agrees(cfg: ModelConfig, settings: ENSettings, norm: str, path: Path) -> None:
    """A model loaded from an EN checkpoint keeps the settings its layers were converted with
    (the margin that ``optim.affine_lr_scale: auto`` reads, the branch's shape): a recipe key
    set to another value is refused, one set to the same value is fine."""
    given: list[tuple[str, Any]] = [
        (f"model.en.{name}", getattr(cfg.en, name))
        for name in TUNED_FIELDS
        if name in cfg.en.model_fields_set
    ]
    given += [
        (f"model.en.ablation.{name}", getattr(cfg.en.ablation, name))
        for name in cfg.en.ablation.model_fields_set
    ]
    for key, value in given:
        have = getattr(settings, key.rsplit(".", 1)[-1])
        if value != have:
            raise EnormError(
                f"{key}={value!r} contradicts {str(path)!r}, whose layers were converted with "
                f"{have!r}: remove the key (a checkpoint keeps its own settings)"
            )
    if "norm" in cfg.model_fields_set and cfg.norm != norm:
        raise EnormError(
            f"model.norm={cfg.norm} contradicts {str(path)!r}, a model.norm={norm} checkpoint: "
            "remove the key, or convert the source model again"
        )


def sync_batchnorm(model: nn.Module, device_type: str) -> nn.Module:
    """The baseline follows EN's rule: where EN syncs its bn statistics, BatchNorm becomes
    SyncBatchNorm (timm's ``convert_sync_batchnorm``: torch's and timm's norm+act layers), so
    that several-process comparisons are fair. On CPU, where torch's SyncBatchNorm has no
    kernel, the same algorithm on torch ops (``cpu_sync_batchnorm``)."""
    if device_type == "cpu":
        from ..layers.cpu_sync_batchnorm import cpu_syncable

        return cpu_syncable(model)
    from timm.layers import convert_sync_batchnorm

    return convert_sync_batchnorm(model)


def resolved_starts(model: nn.Module) -> list[bool]:
    """The starts EN layers took (``ExemplarNorm2d.anchored`` after conversion or load), each
    once: what ``model.en.ablation.anchored: auto`` resolved to (config.yaml)."""
    from ..layers import ExemplarNorm2d

    starts = {m.anchored for m in model.modules() if isinstance(m, ExemplarNorm2d)}
    return sorted(s for s in starts if isinstance(s, bool))
