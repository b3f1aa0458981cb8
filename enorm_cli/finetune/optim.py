"""The optimizer and schedule of a recipe: timm's factories over EN-aware parameter groups."""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn

from ..config.recipe import OptimConfig, Recipe
from ..errors import EnormError
from ..layers import MixedNorm2d


def gradient_scaled(opt_name: str) -> bool:
    """Whether the optimizer's step grows with the gradient's scale (SGD and its momentum
    variants), rather than dividing it out (Adam, RMSprop, Lion, ...)."""
    name = opt_name.lower().split("_")[-1]  # timm's "lookahead_sgd"
    return "sgd" in name or name.startswith(("momentum", "nesterov"))


Scale = float | Literal["auto"]
"""An lr multiple, or "auto" (the layer's own, ``ratio_lr_scale``/``affine_lr_scale``)."""


ADAPTIVE_LOGIT_LR = 0.02
"""The lr EN's logits (FC2: the mean mixture and the per-sample weight) take under optimizers
that divide out the gradient's scale (Adam, Lion, ...), within ``ADAPTIVE_LOGIT_MULTIPLE``
(``logit_multiple``)."""
ADAPTIVE_LOGIT_MULTIPLE = (1.0, 10.0)
"""The least and most multiple of the network's lr the logits get there: never slower than the
network, at most ten times as fast, as BIN gives its gates."""


def logit_multiple(lr: float | None) -> float:
    """The multiple of the network's peak ``lr`` that EN's logits learn at under adaptive
    optimizers: ``ADAPTIVE_LOGIT_LR / lr`` within ``ADAPTIVE_LOGIT_MULTIPLE`` (the most where
    the lr is not known).

    Such an optimizer moves each parameter by about its lr a step whatever the gradient. The
    network's lr is picked for weights of size 1 / sqrt(fan_in); a logit's unit is 1 (one unit
    changes a ratio by a factor e). At AdamW's lr 0.001 the logits at that lr left EN's
    mixture at its start for a whole run; at 0.1 a step (ten times lr 0.01) most layers' mixtures
    fell onto one normalizer within the run; 0.02-0.05 a step did neither (docs/selection.md,
    "Under AdamW")."""
    low, high = ADAPTIVE_LOGIT_MULTIPLE
    return high if lr is None else min(high, max(low, ADAPTIVE_LOGIT_LR / lr))


def ratio_scale_of(
    module: MixedNorm2d, scale: Scale = "auto", opt: str = "sgd", lr: float | None = None
) -> float:
    """The lr factor of a mixed layer's ratio parameters (``optim.ratio_lr_scale``) under
    optimizer ``opt`` at the network's peak ``lr``.

    "auto" divides out how much further one step moves a sample's ratio logits than a plain
    logit (``MixedNorm2d.ratio_step_factor``: s^2 pi K for EN's branch, 1 for SN's logits),
    so EN's ratios are exactly as mobile as SN's under the network's lr, whatever the logit
    scale a layer was built with (1 at the default scale; 0.01 for a K=2, pi=50 checkpoint
    from before the scale, which trained at s = 1). Under optimizers that divide out the
    gradient's scale, the logits of a layer that starts as its source
    (``MixedNorm2d.starts_as_source``: EN's) get ``logit_multiple(lr)`` on top (up to ten
    times): there a step moves each parameter by about the lr whatever its gradient, and every
    other normalizer enters EN only once its logits or its gamma move, so at
    AdamW's lr 0.001 its mixture stayed at the start for a whole run while SN, which starts
    mixed, did not (docs/selection.md, "Under AdamW"). SN's logits keep the lr.
    """
    if scale != "auto":
        return scale
    base = 1.0 / module.ratio_step_factor()
    if module.starts_as_source and not gradient_scaled(opt):
        return base * logit_multiple(lr)
    return base


def hidden_scale_of(module: MixedNorm2d, scale: Scale = "auto", ratio: Scale = "auto") -> float:
    """The lr factor of EN's hidden layer, the conv and FC1 (``optim.hidden_lr_scale``).

    "auto": the ratio scale as SGD resolves it (``ratio``: ``optim.ratio_lr_scale``, so a
    recipe that sets that scale sets it for the whole branch), under any optimizer. The
    hidden units are features of the input, not logits: at ten times AdamW's lr 0.005 FC1's
    weights grew until tanh saturated, and only 10-15 of 52 layers kept their ratios apart
    over samples, against 35-40 at the lr (docs/selection.md, "Under AdamW").
    """
    if scale != "auto":
        return scale
    return ratio_scale_of(module, ratio, "sgd")


SAMPLE_LR_MULTIPLE = 300.0
"""How much faster than the rest of the branch a centered branch's FC2 weight learns under SGD
at a batch of ``SAMPLE_LR_BATCH`` or more (``sample_scale_of``); picked on the selection
benchmark (docs/selection.md)."""
SAMPLE_LR_BATCH = 64
"""The batch (images per optimizer step, all processes) from which the per-sample term learns
faster than the rest of the branch (under any optimizer); below it, at the ratio scale as SGD
resolves it."""


def sample_scale_of(
    module: MixedNorm2d,
    scale: Scale = "auto",
    opt: str = "sgd",
    batch_size: int | None = None,
    lr: float | None = None,
) -> float:
    """The lr factor of a centered EN branch's FC2 weight (``optim.sample_lr_scale``) under
    optimizer ``opt`` at ``batch_size`` images per optimizer step (all processes, all
    accumulated micro-batches) and the network's peak ``lr``.

    That weight sets only how each sample's logits differ from the layer's mean mixture (the
    branch reads h minus its running mean), so a fast rate cannot throw a whole layer onto a
    normalizer the way the uncentered branch could (docs/stability.md). Its gradient is an
    average over the batch of per-sample signals, noisy at small batches: "auto" speeds it up
    only from ``SAMPLE_LR_BATCH`` images per step, to ``SAMPLE_LR_MULTIPLE`` times the ratio lr
    under SGD (where that average is tiny next to the shared logits' gradient) and to the
    logits' lr under optimizers that divide out the gradient's scale (``logit_multiple``).
    Below, and without a batch size (a loop that does not say), the ratio scale as SGD resolves
    it: on the minimal recipe a multiple of 19 cost 30 points of top-1 at batch 4 (lr 0.01) and
    20 at batch 16 (lr 0.05) under SGD, and ten times AdamW's lr 0.002 cost 6-10 points at
    batch 16 against the lr (docs/stability.md).
    """
    if scale != "auto":
        return scale
    base = ratio_scale_of(module, "auto", "sgd")
    if batch_size is None or batch_size < SAMPLE_LR_BATCH:
        return base
    if gradient_scaled(opt):
        return base * SAMPLE_LR_MULTIPLE
    return ratio_scale_of(module, "auto", opt, lr)


def affine_scale_of(module: MixedNorm2d, scale: Scale = "auto", opt: str = "sgd") -> float:
    """The lr factor of a mixed layer's affines (``optim.affine_lr_scale``) under optimizer
    ``opt``.

    "auto" gives the source's gain its own rate back. A converted EN layer computes the
    source gain as lambda_src * (gamma / lambda_src), so an SGD step moves it lambda_src^2
    times as far as the same step moved BatchNorm's gamma (0.78 at the quickstart's margin
    2, K = 2), and EN learned slower than BN at low lrs (docs, Stability). Dividing the lr by
    lambda_src^2 (by lambda_src for optimizers that divide out the gradient's scale) puts it
    back. lambda_src comes from the margin the layer was converted with
    (``MixedNorm2d.source_gain_share``); SN's and shared affines carry the gain alone, and a
    layer built without a source has no source gain (share 1).
    """
    if scale != "auto":
        return scale
    share = module.source_gain_share()
    return share ** (-2 if gradient_scaled(opt) else -1)


def param_groups(
    model: nn.Module,
    lr: float,
    weight_decay: float = 0.0,
    *,
    opt: str = "sgd",
    ratio_lr_scale: Scale = "auto",
    affine_lr_scale: Scale = "auto",
    ratio_weight_decay: float = 0.0,
    affine_weight_decay: float = 0.0,
    sample_lr_scale: Scale = "auto",
    batch_size: int | None = None,
    hidden_lr_scale: Scale = "auto",
) -> list[dict[str, Any]]:
    """Optimizer groups for a model with EN/SN layers, for any ``torch.optim`` optimizer.

    The mixed layers' ratio parameters (EN's FC2 bias, SN's ratio logits), a centered EN
    branch's per-sample weight, EN's hidden layer and the affines get their own lr and decay
    (``MixedNorm2d.ratio_parameters``, ``sample_parameters``, ``hidden_parameters`` and
    ``affine_parameters``; one group per resolved scale: "ratio", "ratio_1", "sample",
    "hidden", "affine", ...), each scale read from its own layer (``ratio_scale_of``,
    ``sample_scale_of``, ``hidden_scale_of``, ``affine_scale_of``; ``opt`` names the optimizer,
    whose kind decides the ratio, sample and affine scales; ``batch_size``, the images per
    optimizer step over all processes, sets the sample scale). The per-sample weight and the
    hidden layer decay as the ratio parameters do. Each group carries its ``lr_multiple`` (what
    config.yaml records; timm's schedulers would apply a key named ``lr_scale`` a second time).
    Other 1-D parameters (biases, norm weights) get no weight decay, as timm does.
    """
    decays = {
        "ratio": ratio_weight_decay,
        "sample": ratio_weight_decay,
        "hidden": ratio_weight_decay,
        "affine": affine_weight_decay,
    }
    scale_of: dict[int, tuple[str, float]] = {}
    for module in model.modules():
        if isinstance(module, MixedNorm2d):
            ratio = ratio_scale_of(module, ratio_lr_scale, opt, lr)
            sample = sample_scale_of(module, sample_lr_scale, opt, batch_size, lr)
            hidden = hidden_scale_of(module, hidden_lr_scale, ratio_lr_scale)
            affine = affine_scale_of(module, affine_lr_scale, opt)
            scale_of.update((id(p), ("ratio", ratio)) for p in module.ratio_parameters())
            scale_of.update((id(p), ("sample", sample)) for p in module.sample_parameters())
            scale_of.update((id(p), ("hidden", hidden)) for p in module.hidden_parameters())
            scale_of.update((id(p), ("affine", affine)) for p in module.affine_parameters())
    groups: dict[str, dict[str, Any]] = {}
    names: dict[tuple[str, float], str] = {}
    for kind, scale in scale_of.values():
        if (kind, scale) not in names:
            count = sum(k == kind for k, _ in names)
            names[(kind, scale)] = name = kind if not count else f"{kind}_{count}"
            groups[name] = {
                "params": [],
                "lr": lr * scale,
                "lr_multiple": scale,  # not timm's "lr_scale", which its schedulers apply again
                "weight_decay": decays[kind],
            }
    groups["decay"] = {"params": [], "lr": lr, "weight_decay": weight_decay}
    groups["no_decay"] = {"params": [], "lr": lr, "weight_decay": 0.0}
    for p in model.parameters():
        if not p.requires_grad:
            continue
        if id(p) in scale_of:
            key = names[scale_of[id(p)]]
        else:
            key = "decay" if p.ndim > 1 else "no_decay"
        groups[key]["params"].append(p)
    return [{"name": k, **g} for k, g in groups.items() if g["params"]]


def recipe_param_groups(
    model: nn.Module, optim: OptimConfig, batch_size: int | None = None
) -> list[dict[str, Any]]:
    """``param_groups`` with a recipe's optim section (``batch_size``: images per optimizer
    step, all processes)."""
    return param_groups(
        model,
        optim.lr,
        optim.weight_decay,
        opt=optim.name,
        ratio_lr_scale=optim.ratio_lr_scale,
        affine_lr_scale=optim.affine_lr_scale,
        ratio_weight_decay=optim.ratio_weight_decay,
        affine_weight_decay=optim.affine_weight_decay,
        sample_lr_scale=optim.sample_lr_scale,
        batch_size=batch_size,
        hidden_lr_scale=optim.hidden_lr_scale,
    )


def resolved_scales(optimizer: torch.optim.Optimizer, kind: str) -> list[float]:
    """The distinct lr scales the optimizer's ``kind`` groups ("ratio", "sample", "hidden",
    "affine") run at."""
    return sorted(
        {g["lr_multiple"] for g in optimizer.param_groups if g.get("name", "").startswith(kind)}
    )


def network_lr(optimizer: torch.optim.Optimizer) -> float:
    """The lr logged: the network's (``optim.lr`` under the schedule), not the ratio or affine
    groups', which have their own scales (``optim.param_groups``)."""
    groups = optimizer.param_groups
    net = [g["lr"] for g in groups if g.get("name") in ("decay", "no_decay")]
    return max(net or [g["lr"] for g in groups])


def build_optimizer(model: nn.Module, recipe: Recipe, processes: int = 1) -> torch.optim.Optimizer:
    """timm's ``create_optimizer_v2`` over ``param_groups`` (each layer's scales read from the
    layer; the batch per optimizer step: the recipe's batch times ``processes`` times
    ``train.grad_accum``); a bad optim section is a user error."""
    from timm.optim import create_optimizer_v2

    o = recipe.optim
    try:
        return create_optimizer_v2(
            recipe_param_groups(
                model, o, recipe.data.batch_size * processes * recipe.train.grad_accum
            ),
            opt=o.name,
            lr=o.lr,
            weight_decay=o.weight_decay,
            momentum=o.momentum,
        )
    except (ValueError, AssertionError, TypeError) as exc:  # timm: unknown name, bad momentum, ...
        raise EnormError(
            f"optim: {exc or type(exc).__name__} (check optim.name and its settings)"
        ) from None


def build_scheduler(optimizer: torch.optim.Optimizer, recipe: Recipe, steps_per_epoch: int) -> Any:
    """timm's ``create_scheduler_v2`` for the recipe's schedule, stepped per optimizer update."""
    from timm.scheduler import create_scheduler_v2

    s = recipe.schedule
    scheduler, _ = create_scheduler_v2(
        optimizer,
        sched=s.name,
        num_epochs=s.epochs,
        warmup_epochs=s.warmup_epochs,
        warmup_lr=s.warmup_lr,
        min_lr=s.min_lr,
        decay_epochs=s.decay_epochs or max(s.epochs // 3, 1),
        decay_milestones=s.decay_milestones,
        decay_rate=s.decay_rate,
        step_on_epochs=False,
        updates_per_epoch=steps_per_epoch,
    )
    return scheduler
