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
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from ..cache import expand_path
from ..errors import EnormError
from .settings import ABLATION_FIELDS, TUNED_FIELDS, ENSettings, fields_of, validation_line

UserPath = Annotated[str, AfterValidator(expand_path)]
"""A path in a recipe: ``${ENORM_HOME}`` (the user cache, ``cache.py``), ``$VARS`` and ``~``
expand."""


class Section(BaseModel):
    model_config = ConfigDict(
        extra="forbid", protected_namespaces=(), use_attribute_docstrings=True
    )


AblationSettings = create_model(
    "AblationSettings",
    __base__=Section,
    __doc__="The paper's ablation switches and the ratio branch's logit scale (``model.en."
    "ablation``): EN's published architecture, not what a fine-tuning recipe tunes.",
    **fields_of(ABLATION_FIELDS),
)

_TunedSettings = create_model("_TunedSettings", __base__=Section, **fields_of(TUNED_FIELDS))


class RecipeENSettings(_TunedSettings):  # type: ignore[misc,valid-type]
    """A recipe's ``model.en``: the conversion settings a user tunes, how training syncs the
    bn statistics, and the ablation switches apart (``ablation``). The layer is
    ``model.norm``: one name for one choice."""

    sync_stats: bool | Literal["auto"] = "auto"
    """Synchronize the bn member's statistics across processes ("auto": when there is more than
    one; config.yaml records what it resolved to)."""
    ablation: AblationSettings = AblationSettings()  # type: ignore[valid-type]

    @model_validator(mode="before")
    @classmethod
    def _one_place_per_key(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key in data:
                if f"model.en.{key}" in MOVED_KEYS:
                    raise ValueError(f"{key} is {MOVED_KEYS['model.en.' + key]} now")
        return data

    def conversion(self, layer: str) -> ENSettings:
        """The flat ``ENSettings`` that convert and checkpoints use."""
        tuned = {name: getattr(self, name) for name in TUNED_FIELDS}
        return ENSettings(**tuned, **self.ablation.model_dump(), layer=layer)


class ModelConfig(Section):
    name: UserPath
    """A timm/torchvision model name (converted on the fly), or an EN .safetensors from convert."""
    checkpoint: UserPath | None = None
    """Source weights for on-the-fly conversion (state dict or .safetensors)."""
    pretrained: bool = False
    """Source weights from the hub (timm/torchvision); offline it fails fast with one line."""
    num_classes: int | None = Field(None, ge=1)
    """Replace the head with this many classes (None: the train split's class count)."""
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
    forward is the frozen statistics' exactly; at 2 values per channel the backward takes
    0.5 of the frozen statistics', ``statistics.frozen_gradient_share``), each layer falling
    back to batch statistics once its features run away from them
    (``statistics.watch_frozen_stats``); "auto" (the default): "renorm_frozen" for EN when
    one bn statistic covers at most ``SMALL_BATCH`` images, else "batch"
    (``resolve_bn_stats``). Measured in docs/stability.md."""

    @model_validator(mode="after")
    def _renorm_needs_mixed_layers(self) -> ModelConfig:
        if self.norm == "bn" and self.bn_stats in ("renorm", "renorm_frozen"):
            raise ValueError(
                f"model.bn_stats={self.bn_stats} renormalizes EN's and SN's bn member, and "
                "model.norm=bn keeps torch's BatchNorm: set model.norm=en or sn, or "
                "model.bn_stats=batch"
            )
        return self

    @property
    def settings(self) -> ENSettings:
        """The conversion settings (EN for ``norm: bn`` too: what a checkpoint records)."""
        return self.en.conversion(self.norm if self.norm != "bn" else "en")


SMALL_BATCH = 8
"""``bn_stats: auto`` batch-renormalizes EN's bn member against the source's statistics at
this many images per statistic or fewer. Measured from a minimal recipe (docs/stability.md,
3 seeds per cell): at its best lr EN beats BatchNorm's best by 43.2 points at batch 4 and 17.6
at batch 8, and frozen-statistics BatchNorm's by 5.4 and 1.8; at lr 0.05, where frozen
statistics collapse, the guard on them (``statistics.watch_frozen_stats``) keeps EN above
BatchNorm (36.5 against 32.6 at batch 8)."""

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
    """"imagefolder": root/train/<class>/*, root/val/<class>/*; "filelist": text files of
    ``relative/path label`` lines (WebVision, ImageNet lists); "fashion_mnist": from the cache."""
    root: UserPath | None = None
    """Data folder; fashion_mnist: None = the user cache's data/ (``cache.py``)."""
    train: str | list[str] = "train"
    """Train folder under root (imagefolder) or list file(s) (filelist)."""
    val: str = "val"
    """Val folder under root (imagefolder) or list file (filelist)."""
    train_prefix: str = ""
    """filelist: folder under root that train entries are relative to."""
    val_prefix: str = ""
    """filelist: folder under root that val entries are relative to (WebVision: val_images_256)."""
    first_classes: int | None = Field(None, ge=1)
    """Keep only labels < N (mini-WebVision: the first 50 classes)."""
    image_size: int = Field(224, ge=8)
    """Input size in pixels (square)."""
    batch_size: int = Field(64, ge=1)
    """Images per step per process."""
    workers: int = Field(2, ge=0)
    """DataLoader worker processes (0: load in the training process)."""
    limit_train: int | None = Field(None, ge=1)
    """Train on a fixed random subset of this many images (None: all)."""
    limit_val: int | None = Field(None, ge=1)
    """Evaluate on a fixed random subset of this many images (None: all)."""
    scale: list[float] = [0.08, 1.0]
    """RandomResizedCrop scale range for training."""
    hflip: float = Field(0.5, ge=0, le=1)
    """Probability of a horizontal flip in training."""
    color_jitter: float | None = None
    """timm's color jitter strength in training (None: off)."""
    crop_pct: float | None = Field(None, gt=0, le=1)
    """Eval center-crop fraction (None: timm's 0.875; 1.0: the whole image)."""
    check_images: bool = True
    """Open every image file's header before training and skip those that are not images
    (counted in the log); false saves the scan on very large datasets."""
    label_noise: float = Field(0.0, ge=0, lt=1)
    """Fraction of training labels replaced by another class drawn uniformly (symmetric
    label noise, for robustness studies; val stays clean)."""
    label_noise_seed: int = 0
    """Which labels the noise flips, and to what (the same for every normalizer)."""
    shift: str | None = None
    """Per-image appearance shift of the val split, ``KIND:SEVERITY`` with KIND contrast,
    brightness or gamma and SEVERITY 0-5 (``enorm_cli.data.shift``; None: off)."""

    @field_validator("shift")
    @classmethod
    def _shift_spec(cls, value: str | None) -> str | None:
        if value is not None:
            from ..data.shift import parse_shift

            try:
                parse_shift(value)
            except EnormError as exc:
                raise ValueError(str(exc)) from None
        return value


class OptimConfig(Section):
    @model_validator(mode="before")
    @classmethod
    def _scales_not_rates(cls, data: Any) -> Any:
        for key in ("ratio_lr", "affine_lr"):
            if isinstance(data, dict) and key in data:
                raise ValueError(f"{key} is {MOVED_KEYS['optim.' + key]} now")
        return data

    name: str = "sgd"
    """Any ``timm.optim.create_optimizer_v2`` name (sgd, adamw, lamb, lion, ...)."""
    lr: float = Field(0.01, gt=0)
    """The network's learning rate (peak, under the schedule)."""
    weight_decay: float = Field(1e-4, ge=0)
    """Weight decay of the weights (not of biases, norms, ratio branch or affines)."""
    momentum: float = Field(0.9, ge=0)
    """SGD momentum (where the optimizer has one)."""
    ratio_lr_scale: Annotated[float, Field(gt=0)] | Literal["auto"] = "auto"
    """lr multiple of EN's ratio logits (FC2's bias) and SN's ratio logits. "auto": 1 / (s^2 pi K)
    for EN, with s its logit scale (1 at the default s = 1 / sqrt(pi K): one step moves a
    sample's ratio logits no further than a plain logit's, as SN's move); with adaptive
    optimizers (Adam, ...), where a step moves every parameter by about the lr, that times
    0.02 / lr within 1-10 (``enorm_cli.finetune.optim.logit_multiple``); 1 for SN
    (``enorm_cli.finetune.optim.ratio_scale_of``)."""
    ratio_weight_decay: float = Field(0.0, ge=0)
    """Weight decay of the ratio parameters."""
    sample_lr_scale: Annotated[float, Field(gt=0)] | Literal["auto"] = "auto"
    """lr multiple of a centered EN branch's FC2 weight, the per-sample term. "auto": from 64 images
    per optimizer step (all processes) 300 times the ratio scale with SGD and the logits' rate
    (``ratio_lr_scale``'s auto) with adaptive optimizers; below (a noisier per-sample gradient),
    the ratio scale as SGD resolves it (``enorm_cli.finetune.optim.sample_scale_of``)."""
    hidden_lr_scale: Annotated[float, Field(gt=0)] | Literal["auto"] = "auto"
    """lr multiple of EN's hidden layer (the branch's conv and FC1). "auto": ``ratio_lr_scale``
    as SGD resolves it, with any optimizer: faster, adaptive optimizers saturate its tanh
    (``enorm_cli.finetune.optim.hidden_scale_of``)."""
    affine_lr_scale: Annotated[float, Field(gt=0)] | Literal["auto"] = "auto"
    """lr multiple of the mixed layers' gammas and betas. "auto": 1 / lambda_src^2 for EN with
    SGD (1 / lambda_src with adaptive optimizers, 1 for SN), so the source's gain learns at the
    rate BN's gamma did (``enorm_cli.finetune.optim.affine_scale_of``)."""
    affine_weight_decay: float = Field(0.0, ge=0)
    """Weight decay of the mixed layers' gammas and betas."""


class ScheduleConfig(Section):
    name: Literal["cosine", "step", "multistep", "tanh", "poly"] = "cosine"
    """timm's ``create_scheduler_v2`` schedule, stepped per optimizer update."""
    epochs: int = Field(1, ge=1)
    """Passes over the training split."""
    warmup_epochs: float = Field(0, ge=0)
    """Linear warm-up from warmup_lr, in epochs."""
    warmup_lr: float = Field(1e-5, ge=0)
    """The lr warm-up starts from."""
    min_lr: float = Field(0.0, ge=0)
    """The lr the schedule ends at."""
    decay_epochs: float | None = None
    """step: epochs between decays (None: a third of the epochs)."""
    decay_milestones: list[int] = [30, 60, 90]
    """multistep: the epochs at which the lr decays."""
    decay_rate: float = 0.1
    """step/multistep: the factor of each decay."""


class TrainConfig(Section):
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    """Accelerate's autocast precision (EN's statistics and ratios stay float32)."""
    grad_accum: int = Field(1, ge=1)
    """Accumulate gradients over this many steps per optimizer update."""
    seed: int = 0
    """Seeds the model's RNG, the sampler and the per-sample augmentation."""
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    """Cross-entropy label smoothing."""
    grad_clip: float | None = Field(5.0, gt=0)
    """Clip the whole model's gradient norm at this value (null: no clipping), for every
    ``model.norm``. A new head's first steps at a high lr or a small batch reach norms of
    40-600; unclipped, BatchNorm's loss explodes and EN's last layer escapes onto a normalizer
    whose gamma is still 0. 5 is about the median norm of a healthy batch-128 step (docs,
    Stability)."""
    eval_every: int = Field(1, ge=1)
    """Evaluate every N epochs (and after the last)."""
    save_every_steps: int | None = Field(None, ge=1)
    """Also save a resumable state every N optimizer steps (None: at the end of each epoch)."""
    precise_bn: int = Field(0, ge=0)
    """Before training and before each eval, recompute the running statistics over this many
    training images with the current weights (``precise_bn.py``; for small batches); 0: off."""
    keep_states: int = Field(2, ge=1)
    """Resumable states kept on disk (the newest ones)."""
    log_every: int = Field(20, ge=1)
    """Write a metrics record (and a log line) every N optimizer steps."""
    log_with: list[str] = []
    """Accelerate trackers beside metrics.jsonl, e.g. [tensorboard] (logs in output_dir/logs)."""
    compile: bool = False
    """``torch.compile`` the model in place before training (``nn.Module.compile``: state dict
    and checkpoints unchanged). EN compiles as one graph on one process and synced on many.
    Off by default: compiling takes minutes on CPU, which a short run does not win back
    (measured in docs, Performance)."""
    compile_backend: str = "inductor"
    """The ``torch.compile`` backend with ``compile`` (as timm's ``--torchcompile``):
    "inductor" generates kernels; "aot_eager" traces forward and backward without them."""


class Recipe(Section):
    model: ModelConfig
    data: DataConfig
    optim: OptimConfig = OptimConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    train: TrainConfig = TrainConfig()
    output_dir: UserPath = "runs/finetune"
    """Where the run writes config.yaml, metrics.jsonl, checkpoints and states."""


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


MOVED_KEYS = {
    "model.en.layer": "model.norm",
    "optim.ratio_lr": "optim.ratio_lr_scale (a multiple of optim.lr)",
    "optim.affine_lr": "optim.affine_lr_scale (a multiple of optim.lr)",
    **{f"model.en.{name}": f"model.en.ablation.{name}" for name in ABLATION_FIELDS},
}
"""Keys of earlier recipes and where their setting is now: one place per setting."""


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set dotted keys in the raw recipe; unknown keys are refused with close names."""
    known = _known_paths(Recipe)
    for item in overrides:
        path, value = parse_override(item)
        dotted = ".".join(path)
        if dotted not in known:
            close = difflib.get_close_matches(dotted, known, n=2)
            hint = f"did you mean {' or '.join(close)}?" if close else "see the recipe's keys"
            if dotted in MOVED_KEYS:
                hint = f"it is {MOVED_KEYS[dotted]} now"
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


def dump_recipe(recipe: Recipe, header: list[str] | None = None) -> str:
    """The resolved recipe as YAML (what ``config.yaml`` in the output directory holds), with
    ``header`` lines as comments above it."""
    data = recipe.model_dump(mode="json")
    comments = "".join(f"# {line}\n" for line in header or [])
    return comments + yaml.safe_dump(data, sort_keys=False)


def resolve_autos(
    recipe: Recipe,
    bn_stats: str,
    sync_stats: bool,
    ratio_lr_scales: list[float],
    affine_lr_scales: list[float],
    sample_lr_scales: list[float] | None = None,
    anchored: list[bool] | None = None,
    hidden_lr_scales: list[float] | None = None,
) -> tuple[Recipe, list[str]]:
    """The recipe with each "auto" replaced by what it resolved to in this run, and one line per
    auto saying so: config.yaml repeats the run without the rules. A scale that resolved to
    several values (layers with different K, from GroupNorm sources), or EN starts that differ
    between layers (``anchored``: the distinct values), stay "auto", listed."""
    lines = []
    model, optim = recipe.model, recipe.optim
    en_update: dict[str, Any] = {}
    model_update: dict[str, Any] = {}
    optim_update: dict[str, Any] = {}
    if model.bn_stats == "auto":
        model_update["bn_stats"] = bn_stats
        lines.append(f"model.bn_stats: auto -> {bn_stats}")
    if model.en.sync_stats == "auto":
        en_update["sync_stats"] = sync_stats
        lines.append(f"model.en.sync_stats: auto -> {str(sync_stats).lower()}")
    for key, scales in (
        ("ratio_lr_scale", ratio_lr_scales),
        ("sample_lr_scale", sample_lr_scales or []),
        ("hidden_lr_scale", hidden_lr_scales or []),
        ("affine_lr_scale", affine_lr_scales),
    ):
        if getattr(optim, key) != "auto" or not scales:
            continue
        if len(scales) == 1:
            optim_update[key] = scales[0]
        lines.append(f"optim.{key}: auto -> {', '.join(f'{v:.6g}' for v in scales)}")
    if model.en.ablation.anchored == "auto" and anchored:
        if len(anchored) == 1:
            en_update["ablation"] = model.en.ablation.model_copy(update={"anchored": anchored[0]})
        listed = ", ".join(str(a).lower() for a in anchored)
        lines.append(f"model.en.ablation.anchored: auto -> {listed}")
    if en_update:
        model_update["en"] = model.en.model_copy(update=en_update)
    update = {
        "model": model.model_copy(update=model_update),
        "optim": optim.model_copy(update=optim_update),
    }
    return recipe.model_copy(update=update), lines
