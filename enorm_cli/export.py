"""``enorm export``: an enorm checkpoint as ONNX or a torch.export ``.pt2``, verified before it
is kept.

Both formats come from one ``torch.export`` graph of the eval-mode model with a dynamic
batch axis. The eval path of EN and SN has no data-dependent Python branch
(``statistics.moments``), so the graph is the same for every input. The file is written
beside ``--out`` under a temporary name, run (onnxruntime for ONNX, ``torch.export.load``
for ``.pt2``) on the calibration batch against eager PyTorch, and renamed onto ``--out``
only when top-1 agrees on every sample and max |delta logit| <= ``tolerance`` * max |logit|.
"""

from __future__ import annotations

import importlib.util
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from .convert.verify import Agreement, agreement
from .errors import EnormError
from .fileio import atomic_path, check_writable

Format = Literal["onnx", "pt2"]
FORMATS: dict[str, str] = {"onnx": ".onnx", "pt2": ".pt2"}
DEFAULT_OPSET = 18
DEFAULT_TOLERANCE = 1e-4
"""Max |delta logit| relative to max |logit| between the exported file and eager PyTorch."""
EXAMPLE_BATCH = 2
"""The traced batch size: not 0 or 1, which torch.export would specialize on."""
ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")


@dataclass(frozen=True)
class ExportResult:
    """What ``enorm export`` wrote and how it checked it."""

    out: Path
    format: str
    export_seconds: float
    """torch.export, plus the ONNX translation for onnx."""
    agreement: Agreement
    tolerance: float
    size_bytes: int

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["out"] = str(self.out)
        data["agreement"] = self.agreement.to_json()
        return data


def format_for(out: Path, fmt: str | None) -> str:
    """The format asked for, or the one ``--out``'s suffix names."""
    if fmt is None:
        by_suffix = {suffix: name for name, suffix in FORMATS.items()}
        if out.suffix not in by_suffix:
            raise EnormError(
                f"--out {str(out)!r}: give --format onnx or pt2 (or end the name in .onnx or .pt2)"
            )
        return by_suffix[out.suffix]
    fmt = fmt.lower()
    if fmt not in FORMATS:
        raise EnormError(f"--format {fmt!r} is not supported: use onnx or pt2")
    return fmt


def require_onnx() -> None:
    """Fail early, with the install line, when the ONNX extra is missing."""
    missing = [name for name in ONNX_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise EnormError(f"ONNX export needs {', '.join(missing)}: pip install 'enorm[export]'")


def check_request(out: Path, fmt: str, opset: int, force: bool) -> None:
    """Everything about the request that can fail before the model is loaded."""
    if fmt == "onnx":
        require_onnx()
        if opset < DEFAULT_OPSET:
            raise EnormError(f"--opset {opset} is too old: use {DEFAULT_OPSET} or newer")
    check_writable(out, force)


def export_program(model: nn.Module, example: Tensor) -> torch.export.ExportedProgram:
    """The eval-mode model as one aten graph with a dynamic batch axis (no autograd recorded)."""
    batch = torch.export.Dim("batch", min=1)
    with torch.no_grad():
        return torch.export.export(model.eval(), (example,), dynamic_shapes=({0: batch},))


def write_onnx(program: torch.export.ExportedProgram, path: Path, opset: int) -> None:
    """ONNX from the exported program, weights inside the one file (models under 2 GB).

    Without onnxscript's optimizer: it took longer than the export itself (70 s of 130 s
    for MobileNetV2-EN) and onnxruntime optimizes the graph when it loads it anyway
    (docs/commands/export.md: inference measured both ways).
    """
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        onnx_program = torch.onnx.export(
            program,
            f=None,
            opset_version=opset,
            dynamo=True,
            external_data=False,
            verbose=False,
            optimize=False,
        )
    assert onnx_program is not None
    onnx_program.save(str(path), external_data=False)


def run_onnx(path: Path, batch: Tensor) -> Tensor:
    """Logits from onnxruntime on CPU."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return torch.from_numpy(session.run(None, {name: batch.numpy()})[0])


def run_pt2(path: Path, batch: Tensor) -> Tensor:
    """Logits from the saved program, loaded as a user would (``torch.export.load``)."""
    with torch.no_grad():
        return torch.export.load(str(path)).module()(batch)


def export_model(
    model: nn.Module,
    batch: Tensor,
    out: Path,
    fmt: str,
    calibration: str,
    opset: int = DEFAULT_OPSET,
    tolerance: float = DEFAULT_TOLERANCE,
    force: bool = False,
) -> ExportResult:
    """Export, check the written file on ``batch`` against eager ``model``, then keep it."""
    check_request(out, fmt, opset, force)
    model = model.eval()
    example = (
        batch[:EXAMPLE_BATCH]
        if batch.shape[0] >= EXAMPLE_BATCH
        else batch.repeat(EXAMPLE_BATCH, 1, 1, 1)
    )
    with torch.no_grad():
        expected = model(batch).float()
    with atomic_path(out) as tmp:
        start = time.perf_counter()
        program = export_program(model, example)
        if fmt == "onnx":
            write_onnx(program, tmp, opset)
        else:
            torch.export.save(program, str(tmp))
        seconds = time.perf_counter() - start
        got = (run_onnx(tmp, batch) if fmt == "onnx" else run_pt2(tmp, batch)).float()
        check = agreement(expected, got, calibration)
        if check.top1_agreement < 1.0 or check.relative_delta > tolerance:
            raise EnormError(
                f"the exported {fmt} file differs from the PyTorch model on {calibration} "
                f"(top-1 agreement {check.top1_agreement:.1%}, max |delta logit| "
                f"{check.relative_delta:.1e} of max |logit| "
                f"> {tolerance:.0e}); nothing was written: "
                "report it with enorm --debug export ..."
            )
        check_writable(out, force)  # again: something may have appeared meanwhile
        size = tmp.stat().st_size
    return ExportResult(
        out=out,
        format=fmt,
        export_seconds=seconds,
        agreement=check,
        tolerance=tolerance,
        size_bytes=size,
    )
