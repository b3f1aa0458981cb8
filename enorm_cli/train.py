"""The Accelerate fine-tuning loop behind ``enorm finetune``, and evaluation.

One code path for CPU, one GPU, and many GPUs or nodes: plain ``enorm finetune``
runs one process; under ``accelerate launch`` or ``torchrun`` Accelerate sets up
torch.distributed and this loop shards data, gathers metrics exactly
(``gather_for_metrics``), synchronizes EN's bn statistics, and lets only the
main process write files.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .checkpoint import save_checkpoint
from .data import Split, build_transform, eval_data_config, infer_num_classes, load_split
from .errors import EnormError
from .fileio import atomic_path
from .finetune_model import prepare_model, set_sync_stats
from .layers import ExemplarNorm2d, SwitchableNorm2d
from .layers.base import MixedNorm2d
from .ratios import RatioRecorder, summarize
from .recipe import Recipe, dump_recipe
from .trackers import check_trackers, flat_config, scalars

STATE_DIR = "state"
LOGS_DIR = "logs"
"""Trackers' local files (TensorBoard: ``tensorboard --logdir OUTPUT_DIR/logs``)."""
PROGRESS_FILE = "progress.json"


@dataclass
class EvalResult:
    top1: float
    top5: float
    loss: float
    samples: int
    ratio_stats: dict[str, Any] | None


def param_groups(model: nn.Module, recipe: Recipe) -> list[dict[str, Any]]:
    """Optimizer groups: EN's ratio branch (SN's ratio logits) and affines get their own lr and decay.

    Other 1-D parameters (biases, norm weights) get no weight decay, as timm does.
    """
    o = recipe.optim
    ratio_ids: set[int] = set()
    affine_ids: set[int] = set()
    for module in model.modules():
        if isinstance(module, ExemplarNorm2d):
            ratio_ids.update(id(p) for p in module.ratio.parameters())
            affine_ids.update((id(module.weight), id(module.bias)))
        elif isinstance(module, SwitchableNorm2d):  # SN's static ratio logits are its "branch"
            ratio_ids.update((id(module.mean_weight), id(module.var_weight)))
            affine_ids.update((id(module.weight), id(module.bias)))
    groups: dict[str, dict[str, Any]] = {
        "ratio": {"params": [], "lr": o.ratio_lr or o.lr * o.ratio_lr_scale, "weight_decay": o.ratio_weight_decay},
        "affine": {"params": [], "lr": o.affine_lr or o.lr, "weight_decay": o.affine_weight_decay},
        "decay": {"params": [], "lr": o.lr, "weight_decay": o.weight_decay},
        "no_decay": {"params": [], "lr": o.lr, "weight_decay": 0.0},
    }
    for p in model.parameters():
        if not p.requires_grad:
            continue
        key = ("ratio" if id(p) in ratio_ids else "affine" if id(p) in affine_ids
               else "decay" if p.ndim > 1 else "no_decay")
        groups[key]["params"].append(p)
    return [{"name": k, **g} for k, g in groups.items() if g["params"]]


def build_optimizer(model: nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    """timm's ``create_optimizer_v2`` over ``param_groups``; a bad optim section is a user error."""
    from timm.optim import create_optimizer_v2

    o = recipe.optim
    try:
        return create_optimizer_v2(
            param_groups(model, recipe), opt=o.name, lr=o.lr, weight_decay=o.weight_decay, momentum=o.momentum,
        )
    except (ValueError, AssertionError, TypeError) as exc:  # timm: unknown name, bad momentum, ...
        raise EnormError(f"optim: {exc or type(exc).__name__} (check optim.name and its settings)") from None


def build_scheduler(optimizer: torch.optim.Optimizer, recipe: Recipe, steps_per_epoch: int) -> Any:
    """timm's ``create_scheduler_v2`` for the recipe's schedule, stepped per optimizer update."""
    from timm.scheduler import create_scheduler_v2

    s = recipe.schedule
    scheduler, _ = create_scheduler_v2(
        optimizer, sched=s.name, num_epochs=s.epochs, warmup_epochs=s.warmup_epochs, warmup_lr=s.warmup_lr,
        min_lr=s.min_lr, decay_epochs=s.decay_epochs or max(s.epochs // 3, 1), decay_milestones=s.decay_milestones,
        decay_rate=s.decay_rate, step_on_epochs=False, updates_per_epoch=steps_per_epoch,
    )
    return scheduler


def set_train_mode(model: nn.Module, bn_stats: str) -> None:
    """``model.train()``, then with frozen bn statistics every BatchNorm and EN/SN layer in eval mode.

    In eval mode these layers normalize with their running statistics and leave them
    as they are, while gradients still reach their affines (and EN's ratio branch; IN
    and LN are the same in both modes): BatchNorm becomes a frozen-statistics
    BatchNorm with a trainable affine, EN a per-sample normalizer with no batch dependence.
    """
    model.train()
    if bn_stats == "running":
        for module in model.modules():
            if isinstance(module, (nn.modules.batchnorm._BatchNorm, MixedNorm2d)):
                module.eval()


def _accuracy_counts(logits: torch.Tensor, target: torch.Tensor) -> tuple[float, float]:
    from timm.utils import accuracy

    k5 = min(5, logits.shape[1])
    top1, top5 = accuracy(logits, target, topk=(1, k5))
    n = target.shape[0]
    return top1.item() * n / 100.0, top5.item() * n / 100.0


@torch.no_grad()
def evaluate(model: nn.Module, loader: Any, accelerator: Any, record_ratios: bool = True) -> EvalResult:
    """Exact top-1/top-5 over the whole split, across processes (no padded duplicates)."""
    model.eval()
    unwrapped = accelerator.unwrap_model(model)
    recorder = RatioRecorder(unwrapped) if record_ratios else None
    if recorder is not None and not recorder.layers:
        recorder = None
    correct1 = correct5 = loss_sum = 0.0
    samples = 0
    ratio_batches = []
    ctx = recorder if recorder is not None else _null()
    with ctx:
        for x, y in loader:
            logits = model(x).float()
            extra = recorder.take().to(logits.device) if recorder is not None else None
            gathered = accelerator.gather_for_metrics((logits, y) if extra is None else (logits, y, extra))
            g_logits, g_y = gathered[0], gathered[1]
            c1, c5 = _accuracy_counts(g_logits, g_y)
            correct1 += c1
            correct5 += c5
            loss_sum += nn.functional.cross_entropy(g_logits, g_y, reduction="sum").item()
            samples += g_y.shape[0]
            if extra is not None:
                ratio_batches.append(gathered[2].cpu())
    stats = None
    if recorder is not None and ratio_batches:
        stats = summarize(recorder.names, recorder.normalizers, torch.cat(ratio_batches))
    return EvalResult(100.0 * correct1 / samples, 100.0 * correct5 / samples, loss_sum / samples, samples, stats)


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


def _latest_state(output_dir: Path) -> Path | None:
    """The newest complete state (its progress file is written last)."""
    states = sorted((output_dir / STATE_DIR).glob("step_*"), key=lambda p: int(p.name.split("_")[1]))
    complete = [p for p in states if (p / PROGRESS_FILE).is_file()]
    return complete[-1] if complete else None


def _check_output_dir(output_dir: Path, resume: bool, force: bool) -> None:
    has_run = (output_dir / "config.yaml").exists() or (output_dir / STATE_DIR).exists()
    if resume:
        if _latest_state(output_dir) is None:
            raise EnormError(
                f"--resume: no saved state under {str(output_dir / STATE_DIR)!r}: start without --resume"
            )
    elif has_run and not force:
        raise EnormError(
            f"output_dir {str(output_dir)!r} already holds a run: pass --resume to continue it, "
            "--force to start over, or set output_dir=another/path"
        )


def _write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


class MetricsLog:
    """metrics.jsonl: one JSON object per line (train steps and evals), main process only.

    ``tracker`` (Accelerate's ``log``) receives the same numbers (``trackers.scalars``).
    """

    def __init__(self, path: Path, enabled: bool, keep_until_step: int | None,
                 tracker: Callable[..., None] | None = None) -> None:
        self.path = path
        self.enabled = enabled
        self.tracker = tracker
        if enabled and keep_until_step is not None and path.exists():  # resume: drop what was redone
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= keep_until_step]
            _write_text(path, "".join(line + "\n" for line in kept))
        elif enabled and keep_until_step is None and path.exists():
            path.unlink()

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        if self.tracker is not None:  # Accelerate logs on the main process only
            self.tracker(scalars(record), step=record["step"])


def _cpu_only() -> bool:
    """True without a GPU: Accelerate only picks MULTI_CPU (gloo) under torchrun when told ``cpu=True``."""
    accel = getattr(torch, "accelerator", None)  # torch >= 2.6; older: CUDA is what Accelerate would use
    return not (accel.is_available() if accel is not None else torch.cuda.is_available())


def _make_loader(split: Split, batch_size: int, workers: int, train: bool) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(
        split.dataset, batch_size=batch_size, shuffle=train, num_workers=workers,
        drop_last=train and len(split.targets) >= batch_size, persistent_workers=workers > 0,
        pin_memory=torch.cuda.is_available(),
    )


def finetune(recipe: Recipe, resume: bool = False, force: bool = False, progress: bool = True) -> dict[str, Any]:
    """Run a recipe; returns the final summary (also the last line of metrics.jsonl)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
    output_dir = Path(recipe.output_dir)
    trackers = check_trackers(recipe.train.log_with)
    # Each run sets its own precision: Accelerate keeps the first run's in a process-wide
    # singleton and refuses another (a bf16 recipe, then an fp32 one, in one Python process).
    # The distributed environment (PartialState) is kept.
    AcceleratorState._reset_state()
    accelerator = Accelerator(
        cpu=_cpu_only(),
        log_with=trackers or None,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / LOGS_DIR)),
        mixed_precision=recipe.train.mixed_precision,
        gradient_accumulation_steps=recipe.train.grad_accum,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=recipe.train.seed),
    )
    main = accelerator.is_main_process
    _check_output_dir(output_dir, resume, force)  # every process: none may start alone
    if main:
        if force and not resume:
            for stale in (STATE_DIR, LOGS_DIR, "metrics.jsonl", "last.safetensors", "best.safetensors"):
                target = output_dir / stale
                shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
        output_dir.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    set_seed(recipe.train.seed)

    # Data first: a bad path fails before the model is built.
    train_probe = load_split(recipe.data, "train", None, recipe.data.limit_train, recipe.model.num_classes)
    num_classes = recipe.model.num_classes or infer_num_classes(train_probe)
    prepared = prepare_model(recipe, num_classes)
    train_tf = build_transform(recipe.data, prepared.mean, prepared.std, training=True)
    val_tf = build_transform(recipe.data, prepared.mean, prepared.std, training=False)
    train_probe.dataset = _with_transform(train_probe.dataset, train_tf)
    val_split = load_split(recipe.data, "val", val_tf, recipe.data.limit_val, num_classes)
    sync = recipe.model.en.sync_stats if recipe.model.en.sync_stats is not None else accelerator.num_processes > 1
    set_sync_stats(prepared.model, sync and accelerator.num_processes > 1)

    train_loader = _make_loader(train_probe, recipe.data.batch_size, recipe.data.workers, train=True)
    val_loader = _make_loader(val_split, recipe.data.batch_size, recipe.data.workers, train=False)
    optimizer = build_optimizer(prepared.model, recipe)
    model, optimizer, train_loader, val_loader = accelerator.prepare(
        prepared.model, optimizer, train_loader, val_loader
    )
    steps_per_epoch = max(len(train_loader) // recipe.train.grad_accum, 1)
    s = recipe.schedule
    scheduler = build_scheduler(optimizer, recipe, steps_per_epoch)
    criterion = nn.CrossEntropyLoss(label_smoothing=recipe.train.label_smoothing)
    data_cfg = eval_data_config(recipe.data, prepared.mean, prepared.std)

    start_epoch, start_batch, global_step, best_top1 = 0, 0, 0, -1.0
    if resume:
        state = _latest_state(output_dir)
        assert state is not None  # _check_output_dir made sure
        accelerator.load_state(str(state))
        progress_info = json.loads((state / PROGRESS_FILE).read_text())
        start_epoch, start_batch = progress_info["epoch"], progress_info["batch"]
        global_step, best_top1 = progress_info["global_step"], progress_info["best_top1"]
        # A state saved at an epoch's last batch resumes into that epoch with no batches
        # left, so its eval and checkpoints still happen.
        accelerator.print(f"resuming from {state} (epoch {start_epoch + 1}, step {global_step})")
    if main:
        _write_text(output_dir / "config.yaml", dump_recipe(recipe))
    if trackers:
        accelerator.init_trackers(output_dir.resolve().name, config=flat_config(recipe.model_dump(mode="json")))
    metrics = MetricsLog(output_dir / "metrics.jsonl", main, global_step if resume else None,
                         accelerator.log if trackers else None)
    scheduler.step_update(global_step)

    summary: dict[str, Any] = {}
    last_eval: EvalResult | None = None
    with _progress(enabled=progress and main) as bar:
        task = bar.add_task("train", total=steps_per_epoch * s.epochs, completed=global_step, info="")
        for epoch in range(start_epoch, s.epochs):
            set_train_mode(model, recipe.model.bn_stats)
            train_loader.set_epoch(epoch)
            if start_batch >= len(train_loader):
                loader: Any = []
            else:
                loader = accelerator.skip_first_batches(train_loader, start_batch) if start_batch else train_loader
            tick, images, window = time.perf_counter(), 0, []
            for batch_index, (x, y) in enumerate(loader, start=start_batch):
                with accelerator.accumulate(model):
                    loss = criterion(model(x), y)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and recipe.train.grad_clip:
                        accelerator.clip_grad_norm_(model.parameters(), recipe.train.grad_clip)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                images += y.shape[0] * accelerator.num_processes
                if not accelerator.sync_gradients:
                    continue
                global_step += 1
                scheduler.step_update(global_step)
                mean_loss = accelerator.gather(loss.detach().float().reshape(1)).mean().item()
                if not math.isfinite(mean_loss):
                    raise EnormError(
                        f"loss became {mean_loss} at step {global_step} (epoch {epoch + 1}); stopped, and "
                        f"the last good checkpoint in {str(output_dir)!r} is kept: lower optim.lr, set "
                        "train.grad_clip, or use train.mixed_precision=no"
                    )
                elapsed = time.perf_counter() - tick
                lr = max(group["lr"] for group in optimizer.param_groups)
                rate = images / max(elapsed, 1e-9)
                bar.update(task, advance=1, description=f"epoch {epoch + 1}/{s.epochs}",
                           info=f"loss {mean_loss:.3f} lr {lr:.2e} {rate:.0f} img/s")
                window.append(mean_loss)
                if global_step % recipe.train.log_every == 0 or batch_index + 1 == len(train_loader):
                    logged = sum(window) / len(window)  # mean over the steps since the last record
                    window.clear()
                    metrics.write({"step": global_step, "epoch": epoch + 1, "loss": logged, "lr": lr,
                                   "images_per_s": rate})
                    if not (progress and main):
                        accelerator.print(f"epoch {epoch + 1} step {global_step}: loss {logged:.4f} "
                                          f"lr {lr:.3e} {rate:.0f} img/s")
                if recipe.train.save_every_steps and global_step % recipe.train.save_every_steps == 0:
                    _save_state(accelerator, output_dir, recipe, epoch, batch_index + 1, global_step, best_top1)
            start_batch = 0
            if (epoch + 1) % recipe.train.eval_every == 0 or epoch + 1 == s.epochs:
                last_eval = evaluate(model, val_loader, accelerator)
                improved = last_eval.top1 > best_top1
                best_top1 = max(best_top1, last_eval.top1)
                summary = {"step": global_step, "epoch": epoch + 1, "eval": True, "top1": last_eval.top1,
                           "top5": last_eval.top5, "val_loss": last_eval.loss, "samples": last_eval.samples,
                           "best_top1": best_top1}
                metrics.write(summary)
                accelerator.print(
                    f"epoch {epoch + 1} step {global_step}: val top-1 {last_eval.top1:.2f}% top-5 "
                    f"{last_eval.top5:.2f}% loss {last_eval.loss:.4f} on {last_eval.samples} images "
                    f"(best {best_top1:.2f}%)"
                )
                if main:
                    extra = {"ratio_stats": last_eval.ratio_stats, "train": summary}
                    unwrapped = accelerator.unwrap_model(model)
                    meta = prepared.metadata(data_cfg, extra)
                    _save_model(unwrapped, output_dir / "last.safetensors", meta)
                    if improved:
                        _save_model(unwrapped, output_dir / "best.safetensors", meta)
                set_train_mode(model, recipe.model.bn_stats)
            _save_state(accelerator, output_dir, recipe, epoch + 1, 0, global_step, best_top1)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


def _with_transform(dataset: Any, transform: Any) -> Any:
    """Set the transform of a (possibly Subset-wrapped) dataset."""
    base = dataset
    while hasattr(base, "dataset"):
        base = base.dataset
    base.transform = transform
    return dataset


def _save_model(model: nn.Module, path: Path, metadata: dict[str, str]) -> None:
    try:
        save_checkpoint(model, path, metadata)
    except OSError as exc:
        raise EnormError(f"could not save {str(path)!r} ({exc}); the previous checkpoint is intact") from None


def _save_state(accelerator: Any, output_dir: Path, recipe: Recipe, epoch: int, batch: int,
                global_step: int, best_top1: float) -> None:
    """A resumable state: Accelerate's save_state, then our progress file (its completeness mark)."""
    state = output_dir / STATE_DIR / f"step_{global_step:08d}"
    if (state / PROGRESS_FILE).is_file():
        return
    accelerator.save_state(str(state))
    if accelerator.is_main_process:
        info = {"epoch": epoch, "batch": batch, "global_step": global_step, "best_top1": best_top1}
        _write_text(state / PROGRESS_FILE, json.dumps(info))
        states = sorted((output_dir / STATE_DIR).glob("step_*"), key=lambda p: int(p.name.split("_")[1]))
        for old in states[: -recipe.train.keep_states]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def _progress(enabled: bool) -> Any:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
        TimeRemainingColumn(), disable=not enabled, transient=False,
    )


def evaluate_checkpoint(path: Path, data: Any, batch_size: int, workers: int, limit: int | None) -> EvalResult:
    """``enorm eval``: top-1/top-5 of a checkpoint on one split, with its own data config."""
    from accelerate import Accelerator

    from .checkpoint import load_model, read_info
    from .data import checkpoint_split

    info = read_info(path)
    split = checkpoint_split(data, info.data_config, info.num_classes, limit)
    model = load_model(path)
    accelerator = Accelerator(cpu=_cpu_only())
    loader = _make_loader(split, batch_size, workers, train=False)
    model, loader = accelerator.prepare(model, loader)
    return evaluate(model, loader, accelerator, record_ratios=False)
