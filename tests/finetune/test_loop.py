"""Fine-tuning end to end: real data, real models, real processes (gloo on CPU)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import QUICK, ROOT, tiny_recipe, torchrun

from enorm_cli import load_model
from enorm_cli.checkpoint import read_info
from enorm_cli.config.recipe import load_recipe
from enorm_cli.errors import EnormError
from enorm_cli.finetune.loop import finetune
from enorm_cli.layers import ExemplarNorm2d
from enorm_cli.layers.modes import set_bn_stats

LAMBDA_SRC = math.exp(2.0) / (math.exp(2.0) + 1)  # margin 2 over the quickstart's [bn, ln]


def small_quickstart(out: Path, *extra: str) -> list[str]:
    return [
        "data.limit_train=2048",
        "data.limit_val=512",
        "data.batch_size=64",
        "data.workers=0",
        f"output_dir={out}",
        *extra,
    ]


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_quickstart_subset_learns_and_ratios_move(tmp_path: Path, mobilenet_weights: Path) -> None:
    out = tmp_path / "run"
    # a clip that never binds: the norm is logged, and the ratios move within these 32 steps
    # (the recipe's clip at 5 slows them: the full quickstart moves features.18.1 to bn 0.68)
    recipe = load_recipe(
        QUICK,
        small_quickstart(out, f"model.checkpoint={mobilenet_weights}", "train.grad_clip=1000"),
    )
    summary = finetune(recipe, progress=False)
    assert summary["top1"] > 40.0, summary  # chance is 10%
    assert summary["samples"] == 512
    for name in ("config.yaml", "metrics.jsonl", "last.safetensors", "best.safetensors"):
        assert (out / name).is_file(), name
    records = read_metrics(out)
    assert any("loss" in r and "images_per_s" in r for r in records) and records[-1]["eval"]
    steps = [r for r in records if "loss" in r and not r.get("eval")]
    assert all(0 < r["grad_norm"] < 1000 for r in steps)  # before clipping
    info = read_info(out / "last.safetensors")
    stats = info.extra["ratio_stats"]
    assert stats["samples"] == 512 and len(stats["layers"]) == 52
    k = len(info.settings["normalizers"])
    prior = math.exp(2.0) / (
        math.exp(2.0) + k - 1
    )  # the margin-2 prior that conversion starts from
    moved = max(abs(layer["mean"][0] - prior) for layer in stats["layers"])
    spread = max(max(layer["std"]) for layer in stats["layers"])
    assert moved > 0.01 and spread > 1e-3, (moved, spread)
    for layer in stats["layers"]:
        assert abs(sum(layer["mean"]) - 1) < 1e-4
    model = load_model(out / "best.safetensors")
    assert model.classifier[1].out_features == 10


@pytest.mark.parametrize("norm", ["bn", "en"])
def test_running_bn_stats_freeze_statistics_while_affines_learn(norm: str) -> None:
    """model.bn_stats=running: BatchNorm (and EN's bn member) normalize with the source's running
    statistics and never change them, as FrozenBatchNorm2d; affines still get gradients."""
    import torch

    from enorm_cli.finetune.model import prepare_model

    recipe = load_recipe(
        QUICK,
        [
            "model.name=test_resnet",
            "model.checkpoint=null",
            f"model.norm={norm}",
            "model.bn_stats=running",
        ],
    )
    model = prepare_model(recipe, 10).model
    norms = [m for m in model.modules() if isinstance(m, (torch.nn.BatchNorm2d, ExemplarNorm2d))]
    before = [m.running_mean.clone() for m in norms]
    set_bn_stats(model, recipe.model.bn_stats)
    assert model.training and not any(m.training for m in norms)
    x = torch.randn(4, 3, 32, 32)
    eval_out = model.eval()(x).detach()
    set_bn_stats(model, "running")
    out = model(x)
    torch.testing.assert_close(out, eval_out)  # the function does not depend on the batch
    out.square().mean().backward()
    assert all(m.weight.grad is not None for m in norms)  # (zero-init residual gammas stop some)
    assert sum(bool(m.weight.grad.abs().sum() > 0) for m in norms) > len(norms) // 2
    assert all(torch.equal(m.running_mean, b) for m, b in zip(norms, before))
    set_bn_stats(model, "batch")
    assert all(m.training for m in norms)


@pytest.mark.parametrize("norm", ["en", "sn"])
def test_renorm_bn_stats_set_the_layers_renorm_in_training_only(norm: str) -> None:
    """model.bn_stats=renorm: every EN/SN layer batch-renormalizes in training; eval and the
    other settings leave it off."""
    from enorm_cli.finetune.model import prepare_model
    from enorm_cli.layers import MixedNorm2d

    recipe = load_recipe(
        QUICK,
        ["model.name=test_resnet", "model.checkpoint=null", f"model.norm={norm}"],
    )
    model = prepare_model(recipe, 10).model
    layers = [m for m in model.modules() if isinstance(m, MixedNorm2d)]
    set_bn_stats(model, "renorm")
    assert layers and all(m.renorm and m.training for m in layers)
    set_bn_stats(model, "batch")
    assert not any(m.renorm for m in layers)


def test_precise_bn_runs_before_training_and_eval_unless_statistics_are_frozen(
    crops: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for stats, count in (("batch", 2), ("renorm_frozen", 0)):
        extra = ("schedule.epochs=1", "train.precise_bn=8", f"model.bn_stats={stats}")
        finetune(
            load_recipe(QUICK, tiny_recipe(crops, tmp_path / stats, "imagefolder", *extra)),
            progress=False,
        )
        out = capsys.readouterr().out
        assert out.count("precise BN: running statistics from 8 training images") == count, out


@pytest.mark.parametrize("norm", ["en", "sn"])
def test_renorm_frozen_renormalizes_against_statistics_it_never_changes(norm: str) -> None:
    """model.bn_stats=renorm_frozen: the bn member batch-renormalized against the source's
    running statistics, which training leaves as they are (renorm updates them)."""
    import torch

    from enorm_cli.finetune.model import prepare_model
    from enorm_cli.layers import MixedNorm2d

    recipe = load_recipe(
        QUICK, ["model.name=test_resnet", "model.checkpoint=null", f"model.norm={norm}"]
    )
    model = prepare_model(recipe, 10).model
    layers = [m for m in model.modules() if isinstance(m, MixedNorm2d)]
    before = [(m.running_mean.clone(), m.running_var.clone()) for m in layers]
    x = torch.randn(4, 3, 32, 32)
    set_bn_stats(model, "renorm_frozen")
    assert all(m.renorm and m.frozen_stats and m.training for m in layers)
    model(x).square().mean().backward()
    for m, (mean, var) in zip(layers, before):
        assert torch.equal(m.running_mean, mean) and torch.equal(m.running_var, var)
    assert sum(bool(m.weight.grad.abs().sum() > 0) for m in layers) > len(layers) // 2
    set_bn_stats(model, "renorm")
    assert not any(m.frozen_stats for m in layers)
    model(x)
    assert not torch.equal(layers[0].running_mean, before[0][0])


@pytest.mark.parametrize("kind", ["imagefolder", "filelist"])
def test_finetune_on_image_files(crops: Path, tmp_path: Path, kind: str) -> None:
    out = tmp_path / kind
    summary = finetune(load_recipe(QUICK, tiny_recipe(crops, out, kind)), progress=False)
    assert summary["samples"] == 12 and summary["epoch"] == 2
    assert [r["epoch"] for r in read_metrics(out) if r.get("eval")] == [1, 2]
    assert load_model(out / "last.safetensors") is not None
    with pytest.raises(EnormError, match="already holds a run"):
        finetune(load_recipe(QUICK, tiny_recipe(crops, out, kind)), progress=False)


def test_config_yaml_records_what_every_auto_resolved_to_and_repeats_the_run(
    crops: Path, tmp_path: Path
) -> None:
    """config.yaml holds the values each "auto" resolved to (header lines say which), so the
    file repeats the run without the rules: the same final weights."""
    import yaml
    from safetensors.torch import load_file

    first = tmp_path / "first"
    finetune(load_recipe(QUICK, tiny_recipe(crops, first, "imagefolder")), progress=False)
    text = (first / "config.yaml").read_text()
    config = yaml.safe_load(text)
    assert "# model.bn_stats: auto -> renorm_frozen" in text  # 4 images per statistic
    assert config["model"]["bn_stats"] == "renorm_frozen"
    assert config["model"]["en"]["sync_stats"] is False
    assert config["optim"]["ratio_lr_scale"] == 1.0
    assert config["optim"]["hidden_lr_scale"] == 1.0
    assert "# model.en.ablation.anchored: auto -> true" in text  # a random-init source
    assert config["model"]["en"]["ablation"]["anchored"] is True
    assert config["optim"]["affine_lr_scale"] == 1.0  # anchored: the source row at weight 1
    assert "auto" not in yaml.safe_dump(config)
    again = tmp_path / "again"
    finetune(load_recipe(first / "config.yaml", [f"output_dir={again}"]), progress=False)
    weights = [load_file(out / "last.safetensors") for out in (first, again)]
    assert weights[0].keys() == weights[1].keys()
    assert all(weights[0][k].equal(weights[1][k]) for k in weights[0])


def test_a_checkpoints_margin_sets_the_affine_lr_scale(crops: Path, tmp_path: Path) -> None:
    """Fine-tuning a margin-3 EN checkpoint (paper-style start) from a recipe that names
    neither the margin nor the start: ``affine_lr_scale: auto`` follows the file's, not the
    recipe defaults'."""
    first = tmp_path / "m3"
    unanchored = ("model.en.margin=3.0", "model.en.ablation.anchored=false")
    finetune(
        load_recipe(QUICK, tiny_recipe(crops, first, "imagefolder", *unanchored)),
        progress=False,
    )
    again = tmp_path / "again"
    overrides = tiny_recipe(crops, again, "imagefolder", "schedule.epochs=1")
    overrides = [o for o in overrides if not o.startswith(("model.name", "model.checkpoint"))]
    finetune(
        load_recipe(QUICK, [*overrides, f"model.name={first / 'last.safetensors'}"]),
        progress=False,
    )
    lam3 = math.exp(3.0) / (math.exp(3.0) + 1)
    config = (again / "config.yaml").read_text()
    assert f"optim.affine_lr_scale: auto -> {1 / lam3**2:.6g}" in config


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(crops: Path, tmp_path: Path) -> None:
    out = tmp_path / "nan"
    finetune(
        load_recipe(QUICK, tiny_recipe(crops, out, "imagefolder", "schedule.epochs=1")),
        progress=False,
    )
    good = (out / "last.safetensors").read_bytes()
    recipe = load_recipe(
        QUICK, tiny_recipe(crops, out, "imagefolder", "schedule.epochs=2", "optim.lr=1e30")
    )
    with pytest.raises(EnormError, match=r"loss became (nan|inf) at step \d+ \(epoch 2\)"):
        finetune(recipe, resume=True, progress=False)
    assert (out / "last.safetensors").read_bytes() == good


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}


def test_unknown_compile_backend_fails_before_any_work(crops: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    extra = ("train.compile=true", "train.compile_backend=nope")
    args = tiny_recipe(crops, out, "imagefolder", *extra)
    with pytest.raises(EnormError, match=r"'nope' is not a torch\.compile backend: use one of"):
        finetune(load_recipe(QUICK, args), progress=False)
    assert not out.exists()


@pytest.mark.slow
def test_compile_trains_the_same_model_and_checkpoint(crops: Path, tmp_path: Path) -> None:
    """train.compile: the module compiled in place, so checkpoints keep their names and the
    weights follow the eager run's. aot_eager traces the forward and backward as inductor
    does, without generating kernels (minutes on CPU)."""
    from safetensors.torch import load_file

    runs = {}
    for mode in ("false", "true"):
        out = tmp_path / mode
        args = tiny_recipe(
            crops,
            out,
            "imagefolder",
            "schedule.epochs=1",
            f"train.compile={mode}",
            "train.compile_backend=aot_eager",
        )
        finetune(load_recipe(QUICK, args), progress=False)
        runs[mode] = load_file(out / "last.safetensors")
        assert load_model(out / "last.safetensors") is not None
    eager, compiled = runs["false"], runs["true"]
    assert eager.keys() == compiled.keys()
    for key in eager:
        torch.testing.assert_close(compiled[key], eager[key], rtol=1e-3, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("norm", ["en", "bn"])
def test_torchrun_two_processes_exact_eval(crops: Path, tmp_path: Path, norm: str) -> None:
    """MULTI_CPU over gloo: synced EN statistics (and BatchNorm's, as the baseline follows
    EN's rule), gather_for_metrics counts each image once."""
    out = tmp_path / "ddp"
    args = tiny_recipe(
        crops, out, "filelist", "schedule.epochs=1", "data.limit_val=9", f"model.norm={norm}"
    )
    cmd = [
        *torchrun(2),
        "-m",
        "enorm_cli",
        "finetune",
        "--recipe",
        str(QUICK),
        "--no-progress",
        *args,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    evals = [r for r in read_metrics(out) if r.get("eval")]
    assert evals[-1]["samples"] == 9  # 9 val images over 2 processes: none counted twice
    assert proc.stdout.count("val top-1") == 1  # only the main process prints
    assert (out / "last.safetensors").is_file()


@pytest.mark.slow
def test_resume_after_kill_9(crops: Path, tmp_path: Path) -> None:
    out = tmp_path / "killed"
    args = tiny_recipe(
        crops,
        out,
        "imagefolder",
        "schedule.epochs=3",
        "train.save_every_steps=2",
        "data.batch_size=2",
    )
    base = [sys.executable, "-m", "enorm_cli", "finetune", "--recipe", str(QUICK), "--no-progress"]
    proc = subprocess.Popen(
        [*base, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_env(), cwd=ROOT
    )
    deadline = time.time() + 300
    while time.time() < deadline and not list((out / "state").glob("step_*/progress.json")):
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert list((out / "state").glob("step_*/progress.json")), "killed before any state was saved"
    done = subprocess.run(
        [*base, "--resume", *args],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=ROOT,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming from" in done.stdout
    evals = [r for r in read_metrics(out) if r.get("eval")]
    assert [r["epoch"] for r in evals][-1] == 3 and evals[-1]["step"] == 3 * 12
    steps = [r["step"] for r in read_metrics(out)]
    assert steps == sorted(steps)
    assert len(list((out / "state").glob("step_*"))) <= 2  # keep_states


def test_failed_save_keeps_the_previous_checkpoint(
    crops: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "disk_full"
    finetune(
        load_recipe(QUICK, tiny_recipe(crops, out, "imagefolder", "schedule.epochs=1")),
        progress=False,
    )
    good = (out / "last.safetensors").read_bytes()

    def disk_full(
        model, filename, metadata=None
    ):  # writes half a file, then fails as a full disk does
        Path(filename).write_bytes(b"\0" * 100)
        raise OSError(28, "No space left on device")

    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "save_model", disk_full)
    recipe = load_recipe(QUICK, tiny_recipe(crops, out, "imagefolder", "schedule.epochs=2"))
    with pytest.raises(
        EnormError,
        match=r"could not write .*last\.safetensors.*no space left on the device; free space "
        r"under .*--resume \(the previous file is intact\)",
    ):
        finetune(recipe, resume=True, progress=False)
    assert (out / "last.safetensors").read_bytes() == good
    assert not [p for p in out.iterdir() if ".tmp" in p.name]
