"""The Accelerate fine-tuning loop behind ``enorm finetune``, as a recipe class.

One code path for CPU, one GPU, and many GPUs or nodes: plain ``enorm finetune``
runs one process; under ``accelerate launch`` or ``torchrun`` Accelerate sets up
torch.distributed and this loop shards data, gathers metrics exactly
(``gather_for_metrics``), synchronizes EN's bn statistics, and lets only the
main process write files.

``FinetuneRecipe`` has torchtune's ``FTRecipeInterface`` shape: ``setup`` (data, model,
optimizer, a resumed state), ``train``, ``save_checkpoint``/``load_checkpoint`` (the
resumable state and its ``TrainingProgress``), ``cleanup``. Its outputs are named in
``run_layout.py``; ``finetune`` runs one recipe start to end.

Resume reproduces the uninterrupted run (the same metrics.jsonl records, the same final
weights, on the same machine and thread count): the state holds the model (EN's running
statistics too), optimizer, sampler and every RNG (Accelerate), and the progress record
the loop's position, its metrics count and the losses since the last record; augmentation
is seeded per sample (``sample_seeds.py``) and the loaders have their own generators, so
nothing but the model draws from the global RNG. SIGTERM/SIGUSR1 stop it cleanly after a
step with a state saved (``preemption.py``).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from ..checkpoint import save_checkpoint
from ..config.recipe import (
    FROZEN_BN_STATS,
    SMALL_BATCH,
    Recipe,
    dump_recipe,
    resolve_autos,
    resolve_bn_stats,
)
from ..data.datasets import (
    build_transform,
    eval_data_config,
    infer_num_classes,
    load_split,
    make_loader,
    with_transform,
)
from ..errors import EnormError
from ..evaluate import EvalResult, cpu_only, evaluate
from ..faults import crash_point, write_fault
from ..fileio import refused, write_text_atomic
from ..inspect.recorder import selection_scalars
from ..layers.modes import set_bn_stats, set_sync_stats
from .metrics_log import MetricsLog
from .model import PreparedModel, prepare_model, resolved_starts, sync_batchnorm
from .optim import build_optimizer, build_scheduler, network_lr, resolved_scales
from .precise_bn import recompute_running_stats
from .preemption import Preempted, PreemptionGuard
from .progress import TrainingProgress
from .run_layout import RunLayout
from .sample_seeds import PerSampleSeeds
from .trackers import check_trackers, flat_config


def check_compile_backend(name: str) -> None:
    """A ``train.compile_backend`` torch.compile knows, else one line naming the choices (a typo
    would otherwise surface minutes later, deep in the first step)."""
    import torch._dynamo

    known = torch._dynamo.list_backends(exclude_tags=())
    if name not in known:
        common = [b for b in ("inductor", "aot_eager", "eager", "cudagraphs") if b in known]
        raise EnormError(
            f"train.compile_backend {name!r} is not a torch.compile backend: use one of "
            f"{', '.join(common)} (all: torch._dynamo.list_backends(exclude_tags=()))"
        )


class FinetuneRecipe:
    """One fine-tuning run of a ``Recipe``: ``setup()``, ``train()``, ``cleanup()``."""

    def __init__(
        self, recipe: Recipe, resume: bool = False, force: bool = False, progress: bool = True
    ) -> None:
        self.recipe = recipe
        self.resume = resume
        self.force = force
        self.layout = RunLayout(Path(recipe.output_dir))
        self.show_progress = progress
        self.progress = TrainingProgress()
        self.guard = PreemptionGuard()
        self.grad_norm = 0.0
        """The global gradient norm of the last step, before clipping (with train.grad_clip)."""
        self.saved_step: int | None = None
        """The step of the newest state this run saved or resumed from (the same on every
        process, unlike what the file system shows each of them at a given moment)."""

    # -- setup ---------------------------------------------------------------------------

    def setup(self) -> None:
        """Accelerator, the train split, the output folder, then model and optimizer (bad data
        fails before anything is written or built), then the saved state when resuming."""
        from accelerate.utils import set_seed

        self.trackers = check_trackers(self.recipe.train.log_with)
        if self.recipe.train.compile:
            check_compile_backend(self.recipe.train.compile_backend)
        self.accelerator = self._setup_accelerator()
        self.main = self.accelerator.is_main_process
        self.layout.check(self.resume, self.force)  # every process: none may start alone
        set_seed(self.recipe.train.seed)
        self._setup_data()  # a bad data path or file fails before anything is written
        self._setup_output_dir()
        self._setup_model()
        self._setup_optimizer()
        if self.resume:
            self.load_checkpoint(self.layout.latest_state())  # layout.check made sure there is one
        config = self._resolved_config()
        self._agree(
            self._attempt(
                lambda: write_text_atomic(self.layout.config, config),
                self.layout.config,
                fix="{fix}, then run it again",
            )
        )
        if self.trackers:
            config = flat_config(self.recipe.model_dump(mode="json"))
            self.accelerator.init_trackers(self.layout.root.resolve().name, config=config)
        self.metrics = MetricsLog(
            self.layout.metrics,
            self.main,
            self.progress if self.resume else None,
            self.accelerator.log if self.trackers else None,
        )
        self.scheduler.step_update(self.progress.global_step)

    def _resolved_config(self) -> str:
        """config.yaml: the recipe with every "auto" as this run resolved it (header lines say
        which), so the file repeats the run on the same number of processes."""
        resolved, lines = resolve_autos(
            self.recipe,
            bn_stats=self.bn_stats,
            sync_stats=self.synced,
            ratio_lr_scales=resolved_scales(self.optimizer, "ratio"),
            affine_lr_scales=resolved_scales(self.optimizer, "affine"),
            sample_lr_scales=resolved_scales(self.optimizer, "sample"),
            hidden_lr_scales=resolved_scales(self.optimizer, "hidden"),
            anchored=resolved_starts(self.accelerator.unwrap_model(self.model)),
        )
        return dump_recipe(resolved, ["auto resolved in this run:", *lines] if lines else None)

    def _setup_accelerator(self) -> Any:
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState
        from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration

        train = self.recipe.train
        # Each run sets its own precision: Accelerate keeps the first run's in a process-wide
        # singleton and refuses another (a bf16 recipe, then an fp32 one, in one Python process).
        # The distributed environment (PartialState) is kept.
        AcceleratorState._reset_state()
        return Accelerator(
            cpu=cpu_only(),
            log_with=self.trackers or None,
            project_config=ProjectConfiguration(
                project_dir=str(self.layout.root), logging_dir=str(self.layout.logs)
            ),
            mixed_precision=train.mixed_precision,
            gradient_accumulation_steps=train.grad_accum,
            dataloader_config=DataLoaderConfiguration(
                use_seedable_sampler=True, data_seed=train.seed
            ),
        )

    def _setup_output_dir(self) -> None:
        if self.main:
            if self.force and not self.resume:
                self.layout.clear()
            self.layout.root.mkdir(parents=True, exist_ok=True)
            self.layout.remove_partial_states()  # a kill's leftovers: never a resume point
        self.accelerator.wait_for_everyone()

    def _setup_data(self) -> None:
        """The train split (its classes size the head); transforms come with the model."""
        data, model = self.recipe.data, self.recipe.model
        self.train_split = load_split(data, "train", None, data.limit_train, model.num_classes)
        self.num_classes = model.num_classes or infer_num_classes(self.train_split)

    def _setup_model(self) -> None:
        """The recipe's model (converted or loaded), the transforms its data config asks for,
        the val split, and EN's synced statistics with more than one process."""
        data = self.recipe.data
        self.prepared: PreparedModel = prepare_model(self.recipe, self.num_classes)
        mean, std = self.prepared.mean, self.prepared.std
        train_tf = build_transform(data, mean, std, training=True)
        val_tf = build_transform(data, mean, std, training=False)
        self.train_split.dataset = PerSampleSeeds(
            with_transform(self.train_split.dataset, train_tf), self.recipe.train.seed
        )
        self.val_split = load_split(data, "val", val_tf, data.limit_val, self.num_classes)
        for split, label in ((self.train_split, "data.train"), (self.val_split, "data.val")):
            line = split.skipped_line(label)
            if line:
                self.accelerator.print(line)
        processes = self.accelerator.num_processes
        sync = self.recipe.model.en.sync_stats
        synced = (processes > 1 if sync == "auto" else sync) and processes > 1
        set_sync_stats(self.prepared.model, synced)
        if synced and self.prepared.norm == "bn":
            self.prepared.model = sync_batchnorm(self.prepared.model, self.accelerator.device.type)
        self.synced = synced
        stats_batch = data.batch_size * (processes if synced else 1)
        self.bn_stats = resolve_bn_stats(self.recipe.model, stats_batch)
        if self.recipe.model.bn_stats == "auto" and self.bn_stats != "batch":
            self.accelerator.print(
                f"model.bn_stats=auto: {self.bn_stats} (bn statistics over {stats_batch} "
                f"images per step, at most {SMALL_BATCH}; docs/stability.md)"
            )
        self.data_config = eval_data_config(data, mean, std)

    def _setup_optimizer(self) -> None:
        """Loaders, optimizer, ``accelerator.prepare``, then the per-step scheduler."""
        data, seed = self.recipe.data, self.recipe.train.seed
        train_loader = make_loader(self.train_split, data.batch_size, data.workers, True, seed)
        val_loader = make_loader(self.val_split, data.batch_size, data.workers, False, seed)
        optimizer = build_optimizer(
            self.prepared.model, self.recipe, self.accelerator.num_processes
        )
        if self.recipe.train.compile:
            # in place: the same module, state dict and names
            self.prepared.model.compile(backend=self.recipe.train.compile_backend)
        self.model, self.optimizer, self.train_loader, self.val_loader = self.accelerator.prepare(
            self.prepared.model, optimizer, train_loader, val_loader
        )
        self.steps_per_epoch = max(len(self.train_loader) // self.recipe.train.grad_accum, 1)
        self.scheduler = build_scheduler(self.optimizer, self.recipe, self.steps_per_epoch)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=self.recipe.train.label_smoothing)

    # -- checkpoints ---------------------------------------------------------------------

    def load_checkpoint(self, state: Path | None) -> None:
        """Model, optimizer, scheduler, sampler and RNG states (Accelerate), and the progress."""
        if state is None:
            raise EnormError(f"--resume: no saved state under {str(self.layout.states)!r}")
        self.accelerator.load_state(str(state))
        self.progress = TrainingProgress.load(self.layout.progress_file(state))
        self.saved_step = self.progress.global_step
        p = self.progress
        self.accelerator.print(f"resuming from {state} (epoch {p.epoch + 1}, step {p.global_step})")

    def save_checkpoint(self, epoch: int, batch: int) -> None:
        """A resumable state, written whole or not at all: Accelerate's ``save_state`` into a
        partial folder, then the progress file, then one rename into place; older states beyond
        ``keep_states`` go only after. A write the file system refuses (full, quota, read-only)
        stops every process with one line, its partial folder removed (``_agree``).

        At most one state per step (an epoch's end after a state saved at its last step
        adds none), decided from ``saved_step``: every process decides alike, where a file
        check would race the main process's write and leave one process at a barrier.
        """
        if self.saved_step == self.progress.global_step:
            return
        self.saved_step = self.progress.global_step
        self.progress.epoch, self.progress.batch = epoch, batch
        self.progress.metrics_rows = self.metrics.rows
        step = self.progress.global_step
        state, partial = self.layout.state(step), self.layout.partial_state(step)
        if self.main:
            self.layout.remove(partial)  # a kill's leftover of this very step
        self.accelerator.wait_for_everyone()  # every process writes into the clean folder

        def write_files() -> None:
            self.accelerator.save_state(str(partial))
            crash_point("save")
            write_fault("state")

        def finish() -> None:
            self.progress.save(self.layout.progress_file(partial))
            self.layout.remove(state)  # a state of this step from before a resume
            partial.rename(state)
            self.layout.prune_states(self.recipe.train.keep_states)

        try:
            self._agree(self._attempt(write_files, partial, everywhere=True))
            self._agree(self._attempt(finish, partial))
        except EnormError:
            if self.main:
                self.layout.remove(partial)
            raise

    def save_model(
        self, summary: dict[str, Any], ratio_stats: dict[str, Any] | None, improved: bool
    ) -> None:
        """last.safetensors (and best.safetensors when top-1 improved): enorm checkpoints
        with the last eval's ratio statistics, for ``enorm inspect``."""
        meta = self.prepared.metadata(
            self.data_config, {"ratio_stats": ratio_stats, "train": summary}
        )
        unwrapped = self.accelerator.unwrap_model(self.model)
        for path, wanted in ((self.layout.last, True), (self.layout.best, improved)):
            if wanted:

                def write(path: Path = path) -> None:
                    save_checkpoint(unwrapped, path, meta, fault="checkpoint")

                fix = "{fix}, then run the same command with --resume (the previous file is intact)"
                self._agree(self._attempt(write, path, fix=fix))

    def _attempt(
        self,
        write: Callable[[], None],
        path: Path,
        everywhere: bool = False,
        fix: str = "{fix}, then run the same command with --resume",
    ) -> str | None:
        """Run a write of the main process (``everywhere``: of every process) and return the one
        line for a refusal of the file system (``fileio.refused``), None when it went through.
        Anything else is a bug and propagates."""
        if not (everywhere or self.main):
            return None
        try:
            write()
        except Exception as exc:
            error = refused(exc, path, fix)
            if error is None:
                raise
            return str(error)
        return None

    def _agree(self, error: str | None) -> None:
        """Every process learns whether any write failed and stops with the same line: none
        waits at the next collective for one that has left, and none reports success."""
        if self.accelerator.num_processes > 1:
            import torch.distributed as dist

            errors: list[str | None] = [None] * self.accelerator.num_processes
            dist.all_gather_object(errors, error)
            error = next((e for e in errors if e), None)
        if error:
            raise EnormError(error, collective=True)

    def _write_metrics(self, record: dict[str, Any]) -> None:
        """A metrics.jsonl record (and the trackers'), through ``_attempt``/``_agree``."""
        self._agree(self._attempt(lambda: self.metrics.write(record), self.layout.metrics))

    # -- training ------------------------------------------------------------------------

    def train(self) -> dict[str, Any]:
        """Every epoch from the saved progress on; returns the last eval's summary."""
        summary: dict[str, Any] = {}
        epochs = self.recipe.schedule.epochs
        with self.guard, _progress_bar(enabled=self.show_progress and self.main) as bar:
            task = bar.add_task(
                "train",
                total=self.steps_per_epoch * epochs,
                completed=self.progress.global_step,
                info="",
            )
            start_epoch, start_batch = self.progress.epoch, self.progress.batch
            if self.progress.global_step == 0:
                self._precise_bn(0)  # renorm's and eval's statistics from the new data
            for epoch in range(start_epoch, epochs):
                self._train_epoch(epoch, start_batch if epoch == start_epoch else 0, bar, task)
                if (epoch + 1) % self.recipe.train.eval_every == 0 or epoch + 1 == epochs:
                    summary = self._evaluate(epoch)
                self.save_checkpoint(epoch + 1, 0)
        return summary

    def _train_epoch(self, epoch: int, start_batch: int, bar: Any, task: Any) -> None:
        """One epoch from batch ``start_batch`` on (a resumed one skips what was done)."""
        accelerator, train = self.accelerator, self.recipe.train
        epochs = self.recipe.schedule.epochs
        set_bn_stats(self.model, self.bn_stats)
        self.train_loader.set_epoch(epoch)
        self.train_split.dataset.set_epoch(epoch)  # Accelerate sets the sampler's only
        if start_batch >= len(self.train_loader):
            loader: Any = []
        elif start_batch:
            loader = accelerator.skip_first_batches(self.train_loader, start_batch)
        else:
            loader = self.train_loader
        tick, images, window = time.perf_counter(), 0, self.progress.loss_window
        for batch_index, (x, y) in enumerate(loader, start=start_batch):
            mean_loss = self._train_step(x, y, epoch)
            images += y.shape[0] * accelerator.num_processes
            if mean_loss is None:  # accumulating gradients
                continue
            crash_point("step")
            step = self.progress.global_step
            lr = network_lr(self.optimizer)
            rate = images / max(time.perf_counter() - tick, 1e-9)
            bar.update(
                task,
                advance=1,
                description=f"epoch {epoch + 1}/{epochs}",
                info=f"loss {mean_loss:.3f} lr {lr:.2e} {rate:.0f} img/s",
            )
            window.append(mean_loss)
            if step % train.log_every == 0 or batch_index + 1 == len(self.train_loader):
                logged = sum(window) / len(window)  # mean over the steps since the last record
                window.clear()
                self._write_metrics(
                    {
                        "step": step,
                        "epoch": epoch + 1,
                        "loss": logged,
                        "lr": lr,
                        "images_per_s": rate,
                        **({"grad_norm": self.grad_norm} if train.grad_clip else {}),
                    }
                )
                if not (self.show_progress and self.main):
                    clip = f" grad norm {self.grad_norm:.3g}" if train.grad_clip else ""
                    accelerator.print(
                        f"epoch {epoch + 1} step {step}: loss "
                        f"{logged:.4f} lr {lr:.3e}{clip} {rate:.0f} img/s"
                    )
            if train.save_every_steps and step % train.save_every_steps == 0:
                self.save_checkpoint(epoch, batch_index + 1)
            if self._preempted():
                self.save_checkpoint(epoch, batch_index + 1)
                raise Preempted(
                    f"stopped by {self.guard.signal_name} after step {step}: state saved in "
                    f"{str(self.layout.state(step))!r}; resume with the same command and --resume"
                )

    def _preempted(self) -> bool:
        """Whether a stop signal came, to any process (all stop at the same step)."""
        if self.accelerator.num_processes == 1:
            return self.guard.signal_name is not None
        import torch

        flag = torch.tensor(
            [float(self.guard.signal_name is not None)], device=self.accelerator.device
        )
        stop = bool(self.accelerator.reduce(flag, reduction="sum").item() > 0)
        if stop and self.guard.signal_name is None:
            self.guard.signal_name = "a signal to another process"
        return stop

    def _train_step(self, x: Any, y: Any, epoch: int) -> float | None:
        """Forward, backward, and (when gradients are synced) one optimizer and scheduler
        step; returns the loss averaged over processes then, None while accumulating."""
        accelerator = self.accelerator
        with accelerator.accumulate(self.model):
            loss = self.criterion(self.model(x), y)
            accelerator.backward(loss)
            if accelerator.sync_gradients and self.recipe.train.grad_clip:
                norm = accelerator.clip_grad_norm_(
                    self.model.parameters(), self.recipe.train.grad_clip
                )
                # before clipping, as HF's Trainer logs it (None from some distributed engines)
                self.grad_norm = float("nan") if norm is None else float(norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        if not accelerator.sync_gradients:
            return None
        self.progress.global_step += 1
        self.scheduler.step_update(self.progress.global_step)
        mean_loss = accelerator.gather(loss.detach().float().reshape(1)).mean().item()
        if not math.isfinite(mean_loss):
            raise EnormError(
                f"loss became {mean_loss} at step {self.progress.global_step} (epoch {epoch + 1}); "
                "stopped, and the last good checkpoint in "
                f"{str(self.layout.root)!r} is kept: lower "
                "optim.lr, set train.grad_clip, or use train.mixed_precision=no"
            )
        return mean_loss

    def _precise_bn(self, epoch: int) -> None:
        """With ``train.precise_bn``: running statistics recomputed over that many training
        images (``precise_bn.py``), before training (epoch 0) and before each eval; not with
        frozen statistics (``bn_stats: running`` and ``renorm_frozen`` keep the source's)."""
        images = self.recipe.train.precise_bn
        if images and self.bn_stats in FROZEN_BN_STATS and epoch == 0:
            self.accelerator.print(
                f"precise BN: off with model.bn_stats={self.bn_stats} (the source's running "
                "statistics are kept)"
            )
        if not images or self.bn_stats in FROZEN_BN_STATS:
            return
        data, seed = self.recipe.data, self.recipe.train.seed
        loader = make_loader(self.train_split, data.batch_size, data.workers, True, seed + epoch)
        seen = recompute_running_stats(self.accelerator.unwrap_model(self.model), loader, images)
        self.accelerator.print(f"precise BN: running statistics from {seen} training images")

    def _evaluate(self, epoch: int) -> dict[str, Any]:
        """Eval on the val split, its metrics record, last/best checkpoints; back to training
        mode."""
        self._precise_bn(epoch + 1)
        result: EvalResult = evaluate(self.model, self.val_loader, self.accelerator)
        p = self.progress
        improved = result.top1 > p.best_top1
        p.best_top1 = best = max(p.best_top1, result.top1)
        summary = {
            "step": p.global_step,
            "epoch": epoch + 1,
            "eval": True,
            "top1": result.top1,
            "top5": result.top5,
            "val_loss": result.loss,
            "samples": result.samples,
            "best_top1": best,
            **(selection_scalars(result.ratio_stats) if result.ratio_stats else {}),
        }
        self._write_metrics(summary)
        self.accelerator.print(
            f"epoch {epoch + 1} step {p.global_step}: val top-1 {result.top1:.2f}% top-5 "
            f"{result.top5:.2f}% loss {result.loss:.4f} on "
            f"{result.samples} images (best {best:.2f}%)"
        )
        self.save_model(summary, result.ratio_stats, improved)
        set_bn_stats(self.model, self.bn_stats)
        return summary

    def cleanup(self) -> None:
        """Wait for every process, close the trackers."""
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()


def finetune(
    recipe: Recipe, resume: bool = False, force: bool = False, progress: bool = True
) -> dict[str, Any]:
    """Run a recipe; returns the final summary (also the last line of metrics.jsonl)."""
    run = FinetuneRecipe(recipe, resume=resume, force=force, progress=progress)
    run.setup()
    try:
        summary = run.train()
    except Preempted:
        run.cleanup()  # every process stopped at the same step: trackers flush, then exit
        raise
    except EnormError as exc:
        if exc.collective:  # every process stopped at the same write (``_agree``)
            with contextlib.suppress(Exception):  # the trackers may share the full disk
                run.cleanup()
        raise
    run.cleanup()
    return summary


def _progress_bar(enabled: bool) -> Any:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeRemainingColumn(),
        disable=not enabled,
        transient=False,
    )
