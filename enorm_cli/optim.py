"""The optimizer and schedule of a recipe: timm's factories over EN-aware parameter groups."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .errors import EnormError
from .layers import MixedNorm2d
from .recipe import Recipe


def gradient_scaled(opt_name: str) -> bool:
    """Whether the optimizer's step grows with the gradient's scale (SGD and its momentum
    variants), rather than dividing it out (Adam, RMSprop, Lion, ...)."""
    name = opt_name.lower().split("_")[-1]  # timm's "lookahead_sgd"
    return "sgd" in name or name.startswith(("momentum", "nesterov"))


def affine_lr_scale(module: MixedNorm2d, recipe: Recipe) -> float:
    """The lr factor of a mixed layer's affines (``optim.affine_lr_scale``).

    "auto" gives the source's gain its own rate back. A converted EN layer computes the
    source gain as lambda_src * (gamma / lambda_src), so an SGD step moves it lambda_src^2
    times as far as the same step moved BatchNorm's gamma (0.78 at the quickstart's margin
    2, K = 2), and EN learned slower than BN at low lrs (README, Stability). Dividing the lr by
    lambda_src^2 (by lambda_src for optimizers that divide out the gradient's scale) puts it
    back; SN's and shared affines carry the gain alone (share 1).
    """
    o = recipe.optim
    if o.affine_lr_scale != "auto":
        return o.affine_lr_scale
    share = module.source_gain_share(recipe.model.en.margin)
    return share ** (-2 if gradient_scaled(o.name) else -1)


def param_groups(model: nn.Module, recipe: Recipe) -> list[dict[str, Any]]:
    """Optimizer groups: the mixed layers' ratio parameters (EN's branch, SN's ratio logits)
    and affines get their own lr and decay (``MixedNorm2d.ratio_parameters`` and
    ``affine_parameters``; one affine group per ``affine_lr_scale``, "affine" for the first).

    Other 1-D parameters (biases, norm weights) get no weight decay, as timm does.
    """
    o = recipe.optim
    ratio_ids: set[int] = set()
    affine_scale: dict[int, float] = {}
    for module in model.modules():
        if isinstance(module, MixedNorm2d):
            ratio_ids.update(id(p) for p in module.ratio_parameters())
            scale = affine_lr_scale(module, recipe)
            affine_scale.update((id(p), scale) for p in module.affine_parameters())
    groups: dict[str, dict[str, Any]] = {
        "ratio": {
            "params": [],
            "lr": o.ratio_lr or o.lr * o.ratio_lr_scale,
            "weight_decay": o.ratio_weight_decay,
        },
    }
    affine_names: dict[float, str] = {}
    for scale in affine_scale.values():
        if scale not in affine_names:
            name = "affine" if not affine_names else f"affine_{len(affine_names)}"
            affine_names[scale] = name
            groups[name] = {
                "params": [],
                "lr": o.affine_lr or o.lr * scale,
                "weight_decay": o.affine_weight_decay,
            }
    groups["decay"] = {"params": [], "lr": o.lr, "weight_decay": o.weight_decay}
    groups["no_decay"] = {"params": [], "lr": o.lr, "weight_decay": 0.0}
    for p in model.parameters():
        if not p.requires_grad:
            continue
        if id(p) in ratio_ids:
            key = "ratio"
        elif id(p) in affine_scale:
            key = affine_names[affine_scale[id(p)]]
        else:
            key = "decay" if p.ndim > 1 else "no_decay"
        groups[key]["params"].append(p)
    return [{"name": k, **g} for k, g in groups.items() if g["params"]]


def network_lr(optimizer: torch.optim.Optimizer) -> float:
    """The lr logged: the network's (``optim.lr`` under the schedule), not the ratio or affine
    groups', which have their own scales (``optim.param_groups``)."""
    groups = optimizer.param_groups
    net = [g["lr"] for g in groups if g.get("name") in ("decay", "no_decay")]
    return max(net or [g["lr"] for g in groups])


def build_optimizer(model: nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    """timm's ``create_optimizer_v2`` over ``param_groups``; a bad optim section is a user error."""
    from timm.optim import create_optimizer_v2

    o = recipe.optim
    try:
        return create_optimizer_v2(
            param_groups(model, recipe),
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
