"""Helpers shared by several test modules (fixtures live in conftest.py)."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]
QUICK = ROOT / "recipes" / "quickstart.yaml"
runner = CliRunner()


def invoke(*args: str):
    """``enorm ARGS`` through Typer's CliRunner (stdout and stderr apart)."""
    from enorm_cli.cli.main import app

    return runner.invoke(app, list(args))


def one_error_line(result, expected: str) -> None:
    """A user mistake: non-zero exit, one ``error: ...`` line naming ``expected``, no traceback."""
    assert result.exit_code not in (0, None), result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], (
        result.stderr
    )
    assert "Traceback" not in result.output


def write_crops(
    photo_dir: Path, root: Path, per_class: int = 6, size: int = 40
) -> dict[str, list[str]]:
    """Crops of the real photos, one class per photo: root/<split>/<class>/<n>.png."""
    rng = np.random.default_rng(0)
    photos = sorted(p for p in photo_dir.rglob("*.*"))[:3]
    made: dict[str, list[str]] = {"train": [], "val": []}
    for label, photo in enumerate(photos):
        image = np.asarray(Image.open(photo).convert("RGB"))
        for split, count in (("train", per_class), ("val", per_class // 2)):
            folder = root / split / f"class{label}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                y = rng.integers(0, image.shape[0] - size)
                x = rng.integers(0, image.shape[1] - size)
                rel = f"{split}/class{label}/{i}.png"
                Image.fromarray(image[y : y + size, x : x + size]).save(root / rel)
                made[split].append(f"{rel} {label}")
    return made


def crop_dataset(photo_dir: Path, root: Path, per_class: int = 6) -> Path:
    """``write_crops`` plus filelists of the same images under root/info/{train,val}_list.txt."""
    made = write_crops(photo_dir, root, per_class=per_class)
    (root / "info").mkdir()
    for split, lines in made.items():
        (root / "info" / f"{split}_list.txt").write_text("\n".join(lines) + "\n")
    return root


def tiny_recipe(root: Path, out: Path, kind: str, *extra: str) -> list[str]:
    """Overrides that turn the quickstart recipe into a seconds-long test_resnet run on ``root``."""
    data = (
        ["data.kind=imagefolder"]
        if kind == "imagefolder"
        else ["data.kind=filelist", "data.train=info/train_list.txt", "data.val=info/val_list.txt"]
    )
    return [
        "model.name=test_resnet",
        "model.checkpoint=null",
        "model.num_classes=3",
        f"data.root={root}",
        *data,
        "data.image_size=32",
        "data.batch_size=4",
        "data.workers=0",
        "data.limit_train=null",
        "data.limit_val=null",
        "optim.lr=0.05",
        "schedule.epochs=2",
        f"output_dir={out}",
        *extra,
    ]


@torch.no_grad()
def randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every norm layer non-trivial statistics and affine parameters.

    Freshly built models have mean 0, var 1, gamma 1, beta 0, under which a
    conversion that forgot to copy something would still look right.
    """
    g = torch.Generator().manual_seed(seed)
    for module in model.modules():
        for name in ("weight", "bias", "running_mean", "running_var"):
            t = getattr(module, name, None)
            if (
                not isinstance(t, torch.Tensor)
                or t.dim() != 1
                or "Norm" not in type(module).__name__
            ):
                continue
            noise = torch.rand(t.shape, generator=g)
            if name == "weight":
                t.copy_(0.5 + noise)
            elif name == "running_var":
                t.copy_(0.5 + noise)
            else:
                t.copy_((noise - 0.5) * 0.4)
    return model


def anchor(layer: nn.Module, seed: int | None = None) -> nn.Module:
    """Give an EN layer a mixing offset as an anchored conversion makes one (the first
    normalizer's one-hot minus a softmax, so the mixing weights still sum to 1), drawn at
    random so a path that drops the offset or uses it in place of lambda shows."""
    g = None if seed is None else torch.Generator().manual_seed(seed)
    k = layer.mix_offset.numel()
    prior = torch.softmax(torch.randn(k, generator=g), 0)
    with torch.no_grad():
        layer.mix_offset.copy_(torch.eye(k)[0] - prior)
    return layer


def max_relative_delta(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / a.abs().max().clamp_min(1e-12)).item()


def assert_moments_match_float64(rows: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> None:
    """Instance mean and biased variance of rows (N x C x L) as float64 computes them; rows of
    one value have exactly zero variance."""
    ref_var, ref_mean = torch.var_mean(rows.double(), dim=-1, correction=0)
    torch.testing.assert_close(mean.double(), ref_mean, rtol=1e-6, atol=1e-5)
    scale = float(ref_var.max()) if rows.shape[-1] > 1 else 1.0
    torch.testing.assert_close(var.double(), ref_var, rtol=1e-4, atol=1e-5 * scale)
    if rows.shape[-1] == 1:
        assert (var == 0).all()


def assert_paths_agree(results: list[tuple], tol: float = 1e-5) -> None:
    """Two runs of a layer, (y, input grad, parameter grads, running_var) each: the one-node
    path and the autograd reference agree (y and the gradients within ``tol``, the parameter
    gradients at least to 1e-5)."""
    (y1, gx1, gp1, rv1), (y2, gx2, gp2, rv2) = results
    torch.testing.assert_close(y1, y2, rtol=tol, atol=tol)
    torch.testing.assert_close(gx1, gx2, rtol=max(tol, 1e-4), atol=tol)
    for g1, g2 in zip(gp1, gp2):
        torch.testing.assert_close(g1, g2, rtol=1e-4, atol=max(tol, 1e-5))
    torch.testing.assert_close(rv1, rv2)


def free_port() -> int:
    """A TCP port nothing listens on now, for a process group's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join_gloo(rank: int, port: int) -> None:
    """Join the 2-process gloo group on this machine (in an ``mp.spawn`` worker)."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)


def torchrun(processes: int = 2) -> list[str]:
    """The command prefix of ``torchrun --standalone --nproc_per_node N`` in this Python."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(processes),
    ]


def frozen_layer(cls: type | None = None, normalizers: tuple[str, ...] = ("bn", "ln"), gains=False):
    """An EN (or ``cls``) layer training in renorm_frozen against source statistics of spread 5
    (a new domain's batches have spread about 1: far from the source's, as on a real
    fine-tune, and fine); ``gains``: gamma drawn from U(0.5, 1.5), so a lost gain shows."""
    from enorm_cli.layers import ExemplarNorm2d

    layer = (cls or ExemplarNorm2d)(16, normalizers=normalizers)
    with torch.no_grad():
        layer.running_var.fill_(25.0)
        layer.running_mean.fill_(0.3)
        if gains:
            layer.weight.uniform_(0.5, 1.5)
    layer.train()
    layer.renorm = layer.frozen_stats = True
    return layer


def run_records(out: Path) -> list[dict]:
    """A run's metrics.jsonl records, less the timing (which varies)."""
    import json

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "images_per_s"} for r in rows]


def assert_same_run(out: Path, reference: Path) -> None:
    """The run in ``out`` wrote the reference run's records and last weights, exactly."""
    from safetensors.torch import load_file

    assert run_records(out) == run_records(reference)
    weights, expected = (
        load_file(out / "last.safetensors"),
        load_file(reference / "last.safetensors"),
    )
    assert weights.keys() == expected.keys()
    assert all(torch.equal(weights[k], expected[k]) for k in weights)
