"""Fine-tuning recipes: a pydantic schema, YAML files and ``key=value`` overrides.

As torchtune and Hydra users expect: ``enorm finetune --recipe R.yaml optim.lr=0.01
data.batch_size=64``; override values are parsed as YAML (numbers, lists, null).
Unknown keys are refused, and every problem is reported at once with its field path.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from .cache import expand_path
from .errors import EnormError
from .settings import ENSettings, validation_line

UserPath = Annotated[str, AfterValidator(expand_path)]
"""A path in a recipe: ``${ENORM_HOME}`` (the user cache, ``cache.py``), ``$VARS`` and ``~``
expand."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class RecipeENSettings(ENSettings):
    """A recipe's ``model.en``: the layer settings of on-the-fly conversion (``ENSettings``,
    as ``enorm convert`` takes them; ``layer`` follows ``model.norm``), plus how training
    treats them."""

    sync_stats: bool | None = None
    """Synchronize the bn member's statistics across processes (None: when >1 process)."""


class ModelConfig(Section):
    name: UserPath
    """A timm/torchvision model name (converted on the fly), or an EN .safetensors from convert."""
    checkpoint: UserPath | None = None
    """Source weights for on-the-fly conversion (state dict or .safetensors)."""
    pretrained: bool = False
    num_classes: int | None = Field(None, ge=1)
    norm: Literal["en", "sn", "bn"] = "en"
    """"en": Exemplar Normalization; "sn": Switchable Normalization (the baseline layer, same
    ``en`` settings for normalizers and margin); "bn": the source model as it is."""
    en: RecipeENSettings = RecipeENSettings()
    bn_stats: Literal["auto", "batch", "running", "renorm", "renorm_frozen"] = "auto"
    """Where the bn statistics come from while training (BatchNorm, and EN's/SN's bn member):
    "batch" as BatchNorm does; "running": the source's running statistics, frozen (as
    FrozenBatchNorm2d, mmdetection's norm_eval), while affines, IN/LN and the ratio branch
    learn; "renorm" (EN and SN only): Batch Renormalization (Ioffe 2017) of the bn member,
    the running statistics in the forward and the batch's in the backward, the running ones
    updated as BatchNorm does; "renorm_frozen" (EN and SN only): the same against the
    source's running statistics, which stay as they are, unclipped (``renorm_limits``: the
    forward is the frozen statistics' exactly); "auto" (the default):
    "renorm_frozen" for EN when one bn statistic covers at most ``SMALL_BATCH`` images, else
    "batch" (``resolve_bn_stats``). Measured in README, Stability."""

    @model_validator(mode="after")
    def _renorm_needs_mixed_layers(self) -> ModelConfig:
        if self.norm == "bn" and self.bn_stats in ("renorm", "renorm_frozen"):
            raise ValueError(
                f"model.bn_stats={self.bn_stats} renormalizes EN's and SN's bn member, and "
                "model.norm=bn keeps torch's BatchNorm: set model.norm=en or sn, or "
                "model.bn_stats=batch"
            )
        return self

    @model_validator(mode="after")
    def _layer_follows_norm(self) -> ModelConfig:
        if "layer" in self.en.model_fields_set and self.norm != "bn" and self.en.layer != self.norm:
            raise ValueError(
                f"model.en.layer={self.en.layer} differs from "
                f"model.norm={self.norm}: set model.norm"
            )
        return self

    @property
    def settings(self) -> ENSettings:
        """The conversion settings (EN for ``norm: bn`` too: what a checkpoint records)."""
        return ENSettings(
            **self.en.model_dump(exclude={"sync_stats", "layer"}),
            layer=self.norm if self.norm != "bn" else "en",
        )


SMALL_BATCH = 8
"""``bn_stats: auto`` batch-renormalizes EN's bn member against the source's statistics at
this many images per statistic or fewer. Measured (README, Stability: the one-machine grid of
2026-12-02): its best lr beats BatchNorm's best by 42.6 points at batch 4 and 10.7 at batch 8,
and EN's on batch statistics by 11.2 at batch 8, and it keeps learning at lr 0.01 where
frozen statistics collapse; batch statistics were better at 16 and 128 before the clips were
dropped (not re-measured since)."""

FROZEN_BN_STATS = ("running", "renorm_frozen")
"""``bn_stats`` modes that keep the source's running statistics (precise BN leaves them)."""


def resolve_bn_stats(model: ModelConfig, stats_batch: int) -> str:
    """``model.bn_stats`` with "auto" decided for bn statistics over ``stats_batch`` images
    (the per-process batch, times the processes when statistics are synced)."""
    if model.bn_stats != "auto":
        return model.bn_stats
    return "renorm_frozen" if model.norm == "en" and stats_batch <= SMALL_BATCH else "batch"


class DataConfig(Section):
    kind: Literal["imagefolder", "filelist", "fashion_mnist"]
    root: UserPath | None = None
    """Data folder; fashion_mnist: None = the user cache's data/ (``cache.py``)."""
    train: str | list[str] = "train"
    val: str = "val"
    train_prefix: str = ""
    """filelist: folder under root that train entries are relative to."""
    val_prefix: str = ""
    """filelist: folder under root that val entries are relative to (WebVision: val_images_256)."""
    first_classes: int | None = Field(None, ge=1)
    """Keep only labels < N (mini-WebVision: the first 50 classes)."""
    image_size: int = Field(224, ge=8)
    batch_size: int = Field(64, ge=1)
    workers: int = Field(2, ge=0)
    limit_train: int | None = Field(None, ge=1)
    limit_val: int | None = Field(None, ge=1)
    scale: list[float] = [0.08, 1.0]
    """RandomResizedCrop scale range for training."""
    hflip: float = Field(0.5, ge=0, le=1)
    color_jitter: float | None = None
    crop_pct: float | None = Field(None, gt=0, le=1)
    check_images: bool = True
    """Open every image file's header before training and skip those that are not images
    (counted in the log); false saves the scan on very large datasets."""


class OptimConfig(Section):
    name: str = "sgd"
    lr: float = Field(0.01, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    momentum: float = Field(0.9, ge=0)
    ratio_lr: float | None = Field(None, gt=0)
    """lr of the EN ratio branch (None: lr * ratio_lr_scale)."""
    ratio_lr_scale: float = Field(0.1, gt=0)
    ratio_weight_decay: float = Field(0.0, ge=0)
    affine_lr: float | None = Field(None, gt=0)
    """lr of the mixed layers' gammas and betas (None: lr * affine_lr_scale)."""
    affine_lr_scale: Annotated[float, Field(gt=0)] | Literal["auto"] = "auto"
    """"auto": 1 / lambda_src^2 for EN with SGD (1 / lambda_src with adaptive optimizers, 1 for
    SN), so the source's gain learns at the rate BN's gamma did (``enorm_cli.optim.affine_lr_scale``
    explains why)."""
    affine_weight_decay: float = Field(0.0, ge=0)


class ScheduleConfig(Section):
    name: Literal["cosine", "step", "multistep", "tanh", "poly"] = "cosine"
    epochs: int = Field(1, ge=1)
    warmup_epochs: float = Field(0, ge=0)
    warmup_lr: float = Field(1e-5, ge=0)
    min_lr: float = Field(0.0, ge=0)
    decay_epochs: float | None = None
    decay_milestones: list[int] = [30, 60, 90]
    decay_rate: float = 0.1


class TrainConfig(Section):
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    grad_accum: int = Field(1, ge=1)
    seed: int = 0
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    grad_clip: float | None = Field(None, gt=0)
    eval_every: int = Field(1, ge=1)
    """Evaluate every N epochs (and after the last)."""
    save_every_steps: int | None = Field(None, ge=1)
    """Also save a resumable state every N optimizer steps (None: at the end of each epoch)."""
    precise_bn: int = Field(0, ge=0)
    """Before training and before each eval, recompute the running statistics over this many
    training images with the current weights (``precise_bn.py``; for small batches); 0: off."""
    keep_states: int = Field(2, ge=1)
    log_every: int = Field(20, ge=1)
    log_with: list[str] = []
    """Accelerate trackers beside metrics.jsonl, e.g. [tensorboard] (logs in output_dir/logs)."""


class Recipe(Section):
    model: ModelConfig
    data: DataConfig
    optim: OptimConfig = OptimConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    train: TrainConfig = TrainConfig()
    output_dir: UserPath = "runs/finetune"


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], yaml-parsed value)."""
    key, sep, raw = item.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise EnormError(f"override {item!r} is not key=value: write e.g. optim.lr=0.01")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def _known_paths(model: type[BaseModel], prefix: str = "") -> list[str]:
    paths = []
    for name, field in model.model_fields.items():
        paths.append(prefix + name)
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            paths.extend(_known_paths(ann, prefix + name + "."))
    return paths


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set dotted keys in the raw recipe; unknown keys are refused with close names."""
    known = _known_paths(Recipe)
    for item in overrides:
        path, value = parse_override(item)
        dotted = ".".join(path)
        if dotted not in known:
            close = difflib.get_close_matches(dotted, known, n=2)
            hint = f"did you mean {' or '.join(close)}?" if close else "see the recipe's keys"
            raise EnormError(f"unknown override key {dotted!r}: {hint}")
        node = data
        for part in path[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[path[-1]] = value
    return data


def load_recipe(path: Path | None, overrides: list[str] | None = None) -> Recipe:
    """Read a YAML recipe (``yaml.safe_load``), apply overrides, validate."""
    data: dict[str, Any] = {}
    source = "overrides"
    if path is not None:
        source = f"recipe {str(path)!r}"
        if not Path(path).is_file():
            raise EnormError(
                f"recipe {str(path)!r} not found: check the path (recipes/ has examples)"
            )
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except yaml.YAMLError as exc:
            where = getattr(exc, "problem_mark", None)
            at = f" at line {where.line + 1}" if where is not None else ""
            raise EnormError(
                f"recipe {str(path)!r} is not valid YAML{at}: fix the syntax"
            ) from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise EnormError(
                f"recipe {str(path)!r} must be a mapping of sections (model:, data:, ...)"
            )
        data = loaded
    data = apply_overrides(data, overrides or [])
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise EnormError(f"{source}: " + validation_line(exc, str)) from None


def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe as YAML (what ``config.yaml`` in the output directory holds)."""
    data = recipe.model_dump(
        mode="json", exclude={"model": {"en": {"layer"}}}
    )  # model.norm says it
    return yaml.safe_dump(data, sort_keys=False)
