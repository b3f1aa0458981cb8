"""Export cost of EN against the BatchNorm original: torch.export, ONNX, onnxruntime inference.

For each model (torchvision ResNet-50 and MobileNetV2 at 224 px), the BN original and its
EN conversion go through the same path as ``enorm export`` (``export.export_program`` with a
dynamic batch, then ``export.write_onnx``); then onnxruntime runs both files on this CPU,
interleaved (BN, EN, BN, EN, ...) so machine noise hits both alike, and the median per
batch is reported with the EN/BN ratio. onnxruntime folds BatchNorm into the convolutions;
EN's per-sample coefficients cannot be folded, so the ratio is what EN costs at deployment.

    python benchmarks/export_bench.py                       # both models, ~10 min on 2 cores
    python benchmarks/export_bench.py --models mobilenet_v2 --json out.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from enorm_cli.convert.surgery import ENSettings, replace_norms  # noqa: E402
from enorm_cli.export import export_program, run_onnx, write_onnx  # noqa: E402

MODELS = {"resnet50": "resnet50", "mobilenet_v2": "mobilenet_v2"}


def build(name: str, en: bool) -> torch.nn.Module:
    """torchvision's architecture, random init (weights do not change the cost), eval mode."""
    import torchvision

    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(num_classes=1000).eval()
    if en:
        replace_norms(model, ENSettings())
    return model.eval()


def export_times(model: torch.nn.Module, folder: Path, tag: str) -> tuple[dict[str, float], Path]:
    example = torch.randn(2, 3, 224, 224)
    start = time.perf_counter()
    program = export_program(model, example)
    exported = time.perf_counter() - start
    path = folder / f"{tag}.onnx"
    start = time.perf_counter()
    write_onnx(program, path, 18)
    onnx_time = time.perf_counter() - start
    return {
        "torch_export_s": exported,
        "onnx_s": onnx_time,
        "onnx_total_s": exported + onnx_time,
    }, path


def ort_latency(paths: dict[str, Path], batch: int, repeats: int) -> dict[str, float]:
    """Median ms per batch for each file, measured interleaved."""
    import onnxruntime as ort

    x = torch.randn(batch, 3, 224, 224)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    sessions = {
        k: ort.InferenceSession(str(p), options, providers=["CPUExecutionProvider"])
        for k, p in paths.items()
    }
    feeds = {k: {s.get_inputs()[0].name: x.numpy()} for k, s in sessions.items()}
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for k, s in sessions.items():  # warm-up
        s.run(None, feeds[k])
    for _ in range(repeats):
        for k, s in sessions.items():
            start = time.perf_counter()
            s.run(None, feeds[k])
            times[k].append((time.perf_counter() - start) * 1000)
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--json", type=Path, default=Path("export.json"))
    args = parser.parse_args(argv)
    results: dict[str, object] = {
        "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "models": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            row: dict[str, object] = {}
            paths = {}
            for kind in ("bn", "en"):
                times, paths[kind] = export_times(
                    build(name, kind == "en"), Path(tmp), f"{name}_{kind}"
                )
                row[kind] = times
                print(
                    f"{name} {kind}: torch.export {times['torch_export_s']:.1f} s, onnx "
                    f"{times['onnx_s']:.1f} s",
                    flush=True,
                )
            x = torch.randn(2, 3, 224, 224)
            with torch.no_grad():
                ref = build(name, True)(x)
            row["onnx_max_abs_delta"] = (run_onnx(paths["en"], x) - ref).abs().max().item()
            for batch in args.batches:
                ms = ort_latency(paths, batch, args.repeats)
                row[f"ort_ms_batch{batch}"] = ms
                print(
                    f"{name} onnxruntime batch {batch}: BN {ms['bn']:.1f} ms, EN {ms['en']:.1f} ms "
                    f"(x{ms['en'] / ms['bn']:.2f})",
                    flush=True,
                )
            results["models"][name] = row  # type: ignore[index]
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(results, indent=1))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
