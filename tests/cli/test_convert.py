"""``enorm convert`` as a user calls it: the real MobileNetV2, and every bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from enorm_cli import load_model
from enorm_cli.cli.main import app
from enorm_cli.convert.verify import calibration_batch
from enorm_cli.models import create_source_model, data_config

runner = CliRunner()
IMAGENET_CATS = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat


def invoke(*args: str):
    return runner.invoke(app, list(args))


def test_help_and_version() -> None:
    result = invoke("--help")
    assert result.exit_code == 0 and "convert" in result.stdout
    result = invoke("--version")
    assert result.exit_code == 0 and result.stdout.startswith("enorm ")
    result = invoke("convert", "--help")
    assert result.exit_code == 0 and "Examples" in result.stdout


@pytest.mark.slow
def test_real_mobilenet_v2_keeps_top1_on_real_photos(
    tmp_path: Path, mobilenet_weights: Path, photo_dir: Path
) -> None:
    out = tmp_path / "mnv2_en.safetensors"
    result = invoke(
        "convert",
        "torchvision:mobilenet_v2",
        "--checkpoint",
        str(mobilenet_weights),
        "--calib",
        str(photo_dir),
        "--out",
        str(out),
        "--json",
    )
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["verified"] and report["verification"]["float32"]["top1_agreement"] == 1.0
    assert report["verification"]["float64"]["samples"] == 6 and report["verification"]["passed"]
    assert report["converted_by_type"] == {"BatchNorm2d": 52}
    _, source = create_source_model("torchvision:mobilenet_v2", checkpoint=mobilenet_weights)
    images = calibration_batch(photo_dir, data_config(load_model_name(), source))
    converted = load_model(out)
    with torch.no_grad():
        a, b = source(images), converted(images)
    assert torch.equal(a.argmax(1), b.argmax(1))
    assert ((a - b).abs().max() / a.abs().max()) < 1e-4
    files = sorted(p.relative_to(photo_dir).as_posix() for p in photo_dir.rglob("*.*"))
    assert (
        a.argmax(1)[files.index("cat/chelsea.png")].item() in IMAGENET_CATS
    )  # the weights are real


def load_model_name():
    from enorm_cli.models import parse_model_name

    return parse_model_name("torchvision:mobilenet_v2")


def test_table_output_and_force(tmp_path: Path) -> None:
    out = tmp_path / "r.safetensors"
    result = invoke("convert", "test_resnet", "--no-pretrained", "--out", str(out))
    assert result.exit_code == 0, result.stderr
    assert (
        "BatchNorm2d" in result.stdout
        and "same function" in result.stdout
        and "parameters:" in result.stdout
    )
    before = out.read_bytes()
    result = invoke("convert", "test_resnet", "--no-pretrained", "--out", str(out))
    assert result.exit_code != 0 and "--force" in result.stderr
    assert out.read_bytes() == before
    result = invoke(
        "convert", "test_resnet", "--no-pretrained", "--out", str(out), "--force", "--pi", "7"
    )
    assert result.exit_code == 0 and out.read_bytes() != before
    assert [p.name for p in tmp_path.iterdir()] == ["r.safetensors"]  # no temp files left


def test_anchored_flag_sets_how_en_starts(tmp_path: Path) -> None:
    """--anchored auto (the default) anchors a never-trained source; true/false force it."""
    from enorm_cli.layers import ExemplarNorm2d

    starts = {}
    for flag in ("auto", "true", "false"):
        out = tmp_path / f"{flag}.safetensors"
        result = invoke(
            "convert", "test_resnet", "--no-pretrained", "--anchored", flag, "--out", str(out)
        )
        assert result.exit_code == 0, result.stderr
        layers = [m for m in load_model(out).modules() if isinstance(m, ExemplarNorm2d)]
        starts[flag] = {m.anchored for m in layers}
    assert starts == {"auto": {True}, "true": {True}, "false": {False}}


def _bad_inputs(tmp: Path) -> list[tuple[list[str], str]]:
    (tmp / "garbage.pth").write_bytes(b"\x00garbage")
    torch.save([1, 2, 3], tmp / "list.pth")
    torch.save({"fc.weight": torch.zeros(3, 3)}, tmp / "small.pth")
    (tmp / "corrupt.safetensors").write_bytes(b"\xff" * 64)
    (tmp / "exists.safetensors").write_bytes(b"keep me")
    (tmp / "empty").mkdir()
    out = str(tmp / "o.safetensors")
    base = ["convert", "test_resnet", "--no-pretrained"]
    return [
        (["convert", "resnet5", "--out", out], "did you mean"),
        ([*base[:2], "--checkpoint", str(tmp / "missing.pth"), "--out", out], "not found"),
        ([*base[:2], "--checkpoint", str(tmp / "garbage.pth"), "--out", out], "cannot be read"),
        ([*base[:2], "--checkpoint", str(tmp / "list.pth"), "--out", out], "not a state dict"),
        ([*base[:2], "--checkpoint", str(tmp / "small.pth"), "--out", out], "missing"),
        (
            [*base[:2], "--checkpoint", str(tmp / "corrupt.safetensors"), "--out", out],
            "safetensors",
        ),
        ([*base, "--out", str(tmp / "nodir" / "o.safetensors")], "does not exist"),
        ([*base, "--out", "/sys/o.safetensors"], "not writable"),
        ([*base, "--out", str(tmp / "exists.safetensors")], "--force"),
        ([*base, "--out", str(tmp / "o.pth")], ".safetensors"),
        ([*base, "--normalizers", "bn,xx", "--out", out], "--normalizers"),
        ([*base, "--reduction", "0", "--out", out], "--reduction"),
        ([*base, "--pi", "-3", "--out", out], "--pi"),
        ([*base, "--anchored", "maybe", "--out", out], "--anchored"),
        ([*base, "--num-classes", "0", "--out", out], "--num-classes"),
        ([*base, "--include", "(", "--out", out], "--include"),
        ([*base, "--include", "nothing-matches", "--out", out], "no BatchNorm or GroupNorm"),
        (
            ["convert", "test_convnext", "--no-pretrained", "--out", out],
            "no BatchNorm or GroupNorm",
        ),
        ([*base, "--calib", str(tmp / "empty"), "--out", out], "no images"),
        ([*base, "--calib", str(tmp / "nowhere"), "--out", out], "not a directory"),
        (["convert", "test_resnet", "--out", out], "--no-pretrained"),
    ]


def test_every_bad_input_is_one_line_with_the_fix(tmp_path: Path) -> None:
    for args, expected in _bad_inputs(tmp_path):
        result = invoke(*args)
        assert result.exit_code not in (0, None), args
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, (args, result.stderr)
        assert lines[0].startswith("error: ") and expected in lines[0], (args, lines[0])
        assert "Traceback" not in result.output
        assert not (tmp_path / "o.safetensors").exists(), args
    assert (tmp_path / "exists.safetensors").read_bytes() == b"keep me"
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    result = invoke("--debug", "convert", "resnet5", "--out", str(tmp_path / "o.safetensors"))
    assert result.exit_code != 0 and result.exception is not None
    invoke("--version")  # later invocations are not in debug mode
    result = invoke("convert", "resnet5", "--out", str(tmp_path / "o.safetensors"))
    assert result.stderr.startswith("error: ")


@pytest.mark.slow
def test_subprocess_convert_resnet50(tmp_path: Path) -> None:
    """The console script as users run it: resnet50, converted and verified."""
    exe = Path(sys.executable).with_name("enorm")
    out = tmp_path / "r50_en.safetensors"
    env = {**os.environ, "COLUMNS": "200"}

    def run() -> subprocess.CompletedProcess:
        command = [str(exe), "convert", "resnet50", "--no-pretrained", "--out", str(out)]
        return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)

    proc = run()
    assert proc.returncode == 0, proc.stderr
    assert "BatchNorm2d" in proc.stdout and "53" in proc.stdout and "same function" in proc.stdout
    assert out.stat().st_size > 90e6
    proc = run()
    assert proc.returncode != 0 and proc.stderr.count("\n") == 1 and "--force" in proc.stderr
