"""``enorm export``'s library: ONNX and .pt2 files that match eager PyTorch, or nothing written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import randomize_norms

from enorm_cli.config.settings import ENSettings
from enorm_cli.convert.pipeline import convert
from enorm_cli.convert.surgery import replace_norms
from enorm_cli.convert.verify import default_batch
from enorm_cli.errors import EnormError
from enorm_cli.export import export_model, format_for, require_onnx, run_onnx


def converted(name: str, **settings) -> torch.nn.Module:
    import timm

    model = randomize_norms(timm.create_model(name, num_classes=5)).eval()
    replace_norms(model, ENSettings(**settings))
    return model.eval()


@pytest.fixture(scope="module")
def resnet_en() -> torch.nn.Module:
    torch.manual_seed(0)
    return converted("test_resnet")


def test_eval_path_traces_the_same_graph_for_every_input(resnet_en: torch.nn.Module) -> None:
    # Before: moments' one-pass precision check was a Python branch on the data, so inputs with
    # a large mean (two-pass) and without (one-pass) traced different graphs.
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        traced = torch.jit.trace(
            resnet_en, x, check_inputs=[(x * 0.01 + 50.0,), (torch.randn(2, 3, 64, 64),)]
        )
        assert torch.allclose(traced(x * 0.01 + 50.0), resnet_en(x * 0.01 + 50.0), atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
def test_export_matches_eager_with_a_dynamic_batch(
    resnet_en: torch.nn.Module, tmp_path: Path, fmt: str
) -> None:
    batch = default_batch((3, 64, 64))
    out = tmp_path / f"model.{fmt}"
    result = export_model(resnet_en, batch, out, fmt, "smooth noise")
    assert out.is_file() and result.size_bytes == out.stat().st_size
    assert result.agreement.top1_agreement == 1.0 and result.agreement.relative_delta <= 1e-4
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]  # no temp file left
    one = default_batch((3, 64, 64), n=1)  # other batch sizes than the traced one
    with torch.no_grad():
        expected = resnet_en(one)
        got = run_onnx(out, one) if fmt == "onnx" else torch.export.load(str(out)).module()(one)
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_pt2_loads_without_enorm(resnet_en: torch.nn.Module, tmp_path: Path) -> None:
    batch = default_batch((3, 64, 64), n=3)
    out = tmp_path / "model.pt2"
    export_model(resnet_en, batch, out, "pt2", "smooth noise")
    with torch.no_grad():
        torch.save(resnet_en(batch), tmp_path / "expected.pt")
    torch.save(batch, tmp_path / "batch.pt")
    code = (
        "import sys, torch\n"
        f"ep = torch.export.load({str(out)!r})\n"
        f"x = torch.load({str(tmp_path / 'batch.pt')!r}, weights_only=True)\n"
        f"y = torch.load({str(tmp_path / 'expected.pt')!r}, weights_only=True)\n"
        "assert torch.allclose(ep.module()(x), y, atol=1e-5)\n"
        "assert not [m for m in sys.modules if m.startswith('enorm_cli')]\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr


@pytest.mark.slow
def test_real_mobilenet_v2_exports_to_onnx(
    mobilenet_weights: Path, tmp_path: Path, photo_dir: Path
) -> None:
    from enorm_cli.convert.verify import calibration_batch

    result = convert(
        "torchvision:mobilenet_v2", None, ENSettings(), checkpoint=mobilenet_weights, verify=False
    )
    from enorm_cli.models import data_config, parse_model_name

    batch = calibration_batch(
        photo_dir, data_config(parse_model_name("torchvision:mobilenet_v2"), result.model)
    )
    out = tmp_path / "mnv2_en.onnx"
    check = export_model(result.model, batch, out, "onnx", str(photo_dir))
    assert check.agreement.samples == batch.shape[0] == 6
    assert check.agreement.top1_agreement == 1.0 and check.agreement.relative_delta <= 1e-4


@pytest.mark.slow
def test_sn_and_gn_sources_export(tmp_path: Path) -> None:
    model = converted("test_efficientnet_gn", normalizers=("bn", "in", "ln", "gn"), layer="sn")
    export_model(model, default_batch((3, 64, 64), n=4), tmp_path / "sn.pt2", "pt2", "smooth noise")


@pytest.mark.slow
def test_a_file_that_does_not_match_is_not_written(
    resnet_en: torch.nn.Module, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import enorm_cli.export as export

    real = export.run_onnx
    monkeypatch.setattr(export, "run_onnx", lambda path, batch: real(path, batch) * 1.01)
    out = tmp_path / "model.onnx"
    with pytest.raises(EnormError, match=r"differs from the PyTorch model.*nothing was written"):
        export_model(resnet_en, default_batch((3, 64, 64)), out, "onnx", "smooth noise")
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_force(resnet_en: torch.nn.Module, tmp_path: Path) -> None:
    out = tmp_path / "model.pt2"
    out.write_text("mine")
    with pytest.raises(EnormError, match="exists: pass --force"):
        export_model(resnet_en, default_batch((3, 64, 64)), out, "pt2", "smooth noise")
    assert out.read_text() == "mine"


def test_format_from_suffix_or_flag() -> None:
    assert format_for(Path("a.onnx"), None) == "onnx" and format_for(Path("a.pt2"), None) == "pt2"
    assert format_for(Path("a.bin"), "ONNX") == "onnx"
    with pytest.raises(EnormError, match="give --format onnx or pt2"):
        format_for(Path("a.bin"), None)
    with pytest.raises(EnormError, match="not supported"):
        format_for(Path("a.onnx"), "tflite")


def test_missing_onnx_extra_names_the_install_line(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "onnxruntime" else real(name, *a),
    )
    with pytest.raises(EnormError, match=r"needs onnxruntime: pip install 'enorm\[export\]'"):
        require_onnx()
