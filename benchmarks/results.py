"""The results record: one JSON per benchmark in ``benchmarks/results/``, one schema, and the
tables the docs and README show, rendered from it (``scripts/render_docs.py``).

A record says what was run and where: ``{"schema": 1, "benchmark", "command", "commit",
"date", "machine": {"cpu", "cores", "threads", "torch"}, "notes", "figures"}``; ``figures``
holds the measurements as the benchmark wrote them (runs, rows, timings). Each results block
``<!-- results:NAME -->`` in a markdown file is ``render(NAME)``: a table computed from one
record, with a line naming the record and its command.

    python benchmarks/results.py stability_minimal --command "..." --figures grid.json
    python benchmarks/results.py quickstart --command ./scripts/quickstart.sh --run runs/quickstart
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SCHEMA = 1


def machine(threads: int | None = None) -> dict[str, Any]:
    """The CPU, its cores, the threads a run used and torch's version."""
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    import torch

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads": threads or torch.get_num_threads(),
        "torch": torch.__version__,
    }


def current_commit() -> str:
    """The checkout's short commit, with "-dirty" when it has uncommitted changes."""
    head = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    ).stdout.strip()
    return head + ("-dirty" if dirty else "")


def write_record(
    name: str,
    command: str,
    figures: Any,
    *,
    commit: str | None = None,
    date: str | None = None,
    machine_info: dict[str, Any] | None = None,
    notes: str = "",
) -> Path:
    """``benchmarks/results/NAME.json`` in the record schema (replaced whole)."""
    record = {
        "schema": SCHEMA,
        "benchmark": name,
        "command": command,
        "commit": commit or current_commit(),
        "date": date or time.strftime("%Y-%m-%d"),
        "machine": machine_info or machine(),
        "notes": notes,
        "figures": figures,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(record, indent=1) + "\n")
    return path


def load(name: str) -> dict[str, Any]:
    return json.loads((RESULTS / f"{name}.json").read_text())


def _source(record: dict[str, Any]) -> str:
    m = record["machine"]
    return (
        f"\n*`benchmarks/results/{record['benchmark']}.json`: `{record['command']}` at "
        f"{record['commit']}, {record['date']}, {m['cpu']} ({m['cores']} cores, "
        f"{m['threads']} thread(s) per run), torch {m['torch']}.*\n"
    )


VARIANT_ORDER = (
    "bn",
    "bn_frozen",
    "sn",
    "en",
    "en_batch",
    "en_renorm_frozen",
    "en_r1",
    "en_sample10",
    "en_ratio10",
    "en_sample_logits",
)


def _variants(runs: list[dict[str, Any]]) -> list[str]:
    return [v for v in VARIANT_ORDER if any(r["variant"] == v for r in runs)]


def _stability(module: str = "stability") -> Any:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    return __import__(module)


def stability_table(record: dict[str, Any]) -> str:
    """Top-1 per (batch, lr) and variant: mean over seeds (lowest-highest run), then the checks."""
    stability = _stability()
    runs = record["figures"]["runs"]
    variants = _variants(runs)
    checks = "\n".join(f"- {line}" for line in stability.check(runs))
    return stability.table(runs, variants) + "\n\n" + checks + "\n" + _source(record)


def stability_headline(record: dict[str, Any]) -> str:
    """Per batch size: each variant's best mean top-1 over the lrs, and the worst EN minus BN."""
    stability = _stability()
    cells = stability.cell_means(record["figures"]["runs"])
    variants = _variants(record["figures"]["runs"])
    lines = [
        "| batch | "
        + " | ".join(f"{v}: best lr's top-1" for v in variants)
        + " | EN - BN, worst lr |",
        "|---|" + "---|" * (len(variants) + 1),
    ]
    for batch in sorted({b for _, b, _ in cells}):
        best = []
        for v in variants:
            top = [(t, lr) for (vv, b, lr), t in cells.items() if vv == v and b == batch]
            best.append(f"{max(top)[0]:.2f} (lr {max(top)[1]:g})" if top else "-")
        gaps = [
            cells[("en", b, lr)] - cells[("bn", b, lr)]
            for (v, b, lr) in cells
            if v == "en" and b == batch and ("bn", b, lr) in cells
        ]
        gap = f"{min(gaps):+.2f}" if gaps else "-"
        lines.append(f"| {batch} | " + " | ".join(best) + f" | {gap} |")
    return "\n".join(lines) + "\n" + _source(record)


def _variant_table(record: dict[str, Any], key: str, heading: Callable[[Any], str]) -> str:
    """One row per variant, one column per value of ``key``: mean over seeds (lowest-highest)."""
    runs, names = record["figures"]["runs"], record["figures"]["variants"]
    values = sorted({r[key] for r in runs})
    lines = [
        "| variant | " + " | ".join(heading(v) for v in values) + " |",
        "|---|" + "---|" * len(values),
    ]
    for variant, label in names.items():
        cells = []
        for value in values:
            tops = [r["top1"] for r in runs if r["variant"] == variant and r[key] == value]
            cells.append(_spread(tops) if tops else "-")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n" + _source(record)


def small_batch_table(record: dict[str, Any]) -> str:
    """small_batch.yaml per variant and lr."""
    return _variant_table(record, "lr", lambda lr: f"lr {lr:g}")


def small_batch_sizes_table(record: dict[str, Any]) -> str:
    """small_batch.yaml at its lr per variant and batch size."""
    return _variant_table(record, "batch", lambda b: f"batch {b}")


def kernel_training_table(record: dict[str, Any]) -> str:
    """EN trained on its C++ kernel and on its tensor ops, per recipe cell."""
    return _variant_table(record, "cell", str)


def convert_table(record: dict[str, Any]) -> str:
    rows = record["figures"]["rows"]
    lines = [
        "| seed | max \\|logit\\| | float32 relative delta | float64 relative delta | verified |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['seed']} | {r['float32_max_abs_logit']:.1f} | {r['float32_relative']:.1e} | "
            f"{r['float64_relative']:.1e} | yes |"
        )
    return "\n".join(lines) + "\n" + _source(record)


def export_table(record: dict[str, Any]) -> str:
    lines = [
        "| model | torch.export BN / EN | ONNX translation BN / EN | onnxruntime batch 1 BN / EN "
        "| batch 8 BN / EN |",
        "|---|---|---|---|---|",
    ]
    for name, m in record["figures"]["models"].items():
        b1, b8 = m["ort_ms_batch1"], m["ort_ms_batch8"]
        lines.append(
            f"| {name} | {m['bn']['torch_export_s']:.1f} s / {m['en']['torch_export_s']:.1f} s | "
            f"{m['bn']['onnx_s']:.1f} s / {m['en']['onnx_s']:.1f} s | "
            f"{b1['bn']:.1f} / {b1['en']:.1f} ms (x{b1['en'] / b1['bn']:.2f}) | "
            f"{b8['bn']:.1f} / {b8['en']:.1f} ms (x{b8['en'] / b8['bn']:.2f}) |"
        )
    return "\n".join(lines) + "\n" + _source(record)


def performance_table(record: dict[str, Any]) -> str:
    lines = [
        "| model (batch, px) | EN train step | EN inference | SN train / inference "
        "| official SN train / inference |",
        "|---|---|---|---|---|",
    ]
    for m in record["figures"]["models"]:
        v = m["variants"]

        def ratio(name: str, key: str, v: dict = v) -> str:
            return f"{v[name][key] / v['bn'][key]:.2f}x" if name in v else "-"

        lines.append(
            f"| {m['model']} ({m['batch']}, {m['size']}) | {ratio('en', 'train_s')} | "
            f"{ratio('en', 'infer_s')} | {ratio('sn', 'train_s')} / {ratio('sn', 'infer_s')} | "
            f"{ratio('sn_official', 'train_s')} / {ratio('sn_official', 'infer_s')} |"
        )
    return "\n".join(lines) + "\n" + _source(record)


def evidence_table(record: dict[str, Any]) -> str:
    lines = ["| variant | top-1, mean ± std | per seed |", "|---|---|---|"]
    for s in record["figures"]["summary"]:
        seeds = ", ".join(f"{t:.2f}" for t in s["top1"])
        spread = f"± {s['top1_std']:.2f}" if len(s["top1"]) > 1 else "(one seed)"
        lines.append(f"| {s['variant']} | {s['top1_mean']:.2f} {spread} | {seeds} |")
    return "\n".join(lines) + "\n" + _source(record)


def quickstart_table(record: dict[str, Any]) -> str:
    f = record["figures"]
    return (
        "| recipe | val top-1 | val images | train images/s |\n|---|---|---|---|\n"
        f"| quickstart (EN) | {f['top1']:.2f}% | {f['samples']:,} | {f['images_per_s']:.0f} |\n"
        + _source(record)
    )


def quickstart_seeds_table(record: dict[str, Any]) -> str:
    """The quickstart recipe over seeds: mean val top-1 (lowest-highest run)."""
    runs = record["figures"]["runs"]
    top1 = [r["top1"] for r in runs]
    return (
        "| recipe | val top-1, mean of seeds (lowest-highest) | seeds | val images |\n"
        "|---|---|---|---|\n"
        f"| quickstart (EN) | {sum(top1) / len(top1):.2f}% ({min(top1):.2f}-{max(top1):.2f}) "
        f"| {len(runs)} | 10,000 |\n" + _source(record)
    )


def noisy_labels_table(record: dict[str, Any]) -> str:
    """Last-epoch and best-epoch top-1 per noise rate and normalizer (``noisy_labels.markdown``)."""
    noisy = _stability("noisy_labels")
    rows = noisy.summarize(record["figures"]["runs"])
    return (
        noisy.markdown(rows, "top1_last")
        + "\n\n"
        + noisy.markdown(rows, "top1_best")
        + "\n"
        + _source(record)
    )


def appearance_shift_table(record: dict[str, Any]) -> str:
    """Top-1 per severity and model, one table per shift kind; EN's ratios under the shift."""
    shift = _stability("appearance_shift")
    summary = record["figures"]["summary"]
    kinds = list(dict.fromkeys(r["kind"] for r in summary))
    parts = [shift.markdown(summary, kind) for kind in kinds]
    return (
        "\n\n".join(parts)
        + "\n\n"
        + shift.ratio_markdown(record["figures"]["en_ratios"])
        + ("\n" + _source(record))
    )


def _spread(vals: list[float]) -> str:
    """Mean (lowest-highest) of a cell's seeds."""
    return f"{statistics.fmean(vals):.2f} ({min(vals):.1f}-{max(vals):.1f})"


def evidence_headline(record: dict[str, Any]) -> str:
    """One row per setting, BN / SN / EN: mean top-1 over seeds (lowest-highest run), from the
    fine-tuning, noisy-label and appearance-shift records; the best mean in bold."""
    rows: list[tuple[str, dict[str, list[float]]]] = []
    finetune = load("evidence_finetune")["figures"]["runs"]
    rows.append(
        (
            "fine-tuning, clean labels (10k images, 1 epoch)",
            {v: [r["top1"] for r in finetune if r["variant"] == v] for v in ("bn", "sn", "en")},
        )
    )
    noisy = record["figures"]["runs"]
    for rate in sorted({r["noise"] for r in noisy}):
        rows.append(
            (
                f"{round(rate * 100)}% of training labels flipped (3k images, 3 epochs, last)",
                {
                    v: [r["top1_last"] for r in noisy if r["variant"] == v and r["noise"] == rate]
                    for v in ("bn", "sn", "en")
                },
            )
        )
    shift = load("appearance_shift")["figures"]["runs"]
    for kind in dict.fromkeys(r["kind"] for r in shift):
        top = max(r["severity"] for r in shift)
        rows.append(
            (
                f"{kind} shift per image, severity {top} (clean-trained models)",
                {
                    v: [
                        r["top1"]
                        for r in shift
                        if r["variant"] == v and r["kind"] == kind and r["severity"] == top
                    ]
                    for v in ("bn", "sn", "en")
                },
            )
        )
    lines = ["| setting | BN | SN | EN |", "|---|---|---|---|"]
    for name, by in rows:
        means = {v: statistics.fmean(x) for v, x in by.items() if x}
        best = max(means.values())
        cells = []
        for v in ("bn", "sn", "en"):
            text = _spread(by[v]) if by[v] else "-"
            cells.append(f"**{text.replace(' (', '** (', 1)}" if means.get(v) == best else text)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return (
        "\n".join(lines) + "\n\n*Top-1 %, mean over 3 seeds (lowest-highest run): "
        "`benchmarks/results/evidence_finetune.json`, `benchmarks/results/noisy_labels.json` and "
        "`benchmarks/results/appearance_shift.json`, each with its command, commit and machine.*\n"
    )


def cuda_check_table(record: dict[str, Any]) -> str:
    """The CUDA step's error against a float64 reference, as a multiple of the CPU's."""
    lines = [
        "| what | bn_stats | CUDA error / CPU float32 error | worst tensor |",
        "|---|---|---|---|",
    ]
    names = {"layer": "one EN layer (judged)", "bn": "MobileNetV2, BN", "en": "MobileNetV2, EN"}
    for r in record["figures"]["rows"]:
        lines.append(
            f"| {names[r['model']]} | {r['bn_stats']} | {r['gpu_vs_cpu_error']:.2f} "
            f"| `{r['worst']}` |"
        )
    f = record["figures"]
    judged = all(
        r["gpu_vs_cpu_error"] <= f["tolerance"] for r in f["rows"] if r["model"] == "layer"
    )
    verdict = "PASS" if judged and f["bf16_finite"] else "FAIL"  # cuda_check.py's rule
    lines.append(
        f"\nbf16 autocast step finite: {record['figures']['bf16_finite']}; verdict: {verdict}."
    )
    return "\n".join(lines) + "\n" + _source(record)


def compile_table(record: dict[str, Any]) -> str:
    lines = [
        "| model.norm | eager images/s | compiled images/s | speed-up | compile time |",
        "|---|---|---|---|---|",
    ]
    for s in record["figures"]["summary"]:
        lines.append(
            f"| {s['norm']} | {s['eager_images_per_s']:.1f} | {s['compiled_images_per_s']:.1f} "
            f"| {s['speedup']:.2f}x | {s['compile_s']:.0f} s |"
        )
    return "\n".join(lines) + "\n" + _source(record)


def synced_table(record: dict[str, Any]) -> str:
    """bench_norm --synced: the 2-process DDP train step, per-process and synced statistics."""
    lines = [
        "| model | BN | EN | EN / BN | SyncBN | EN synced | EN / SyncBN | excess |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in record["figures"]["synced"]:
        t = r["train_s"]
        lines.append(
            f"| {r['model']} b{r['batch']} {r['size']}px | {t['bn'] * 1e3:.0f} ms "
            f"| {t['en'] * 1e3:.0f} ms | {r['en_ratio_per_process']:.2f}x "
            f"| {t['bn_synced'] * 1e3:.0f} ms | {t['en_synced'] * 1e3:.0f} ms "
            f"| {r['en_ratio_synced']:.2f}x | {r['excess']:+.2f} |"
        )
    return "\n".join(lines) + "\n" + _source(record)


def layer_levers_table(record: dict[str, Any]) -> str:
    """layer_levers.py --native: every norm layer of a model summed (ms), and what EN adds to
    BN with its tensor ops, with its C++ kernel (what enorm runs once built), and at the
    X-passes floor."""
    lines = [
        "| model | mode | BN | EN, tensor ops | EN, C++ kernel | X passes only "
        "| EN - BN: tensor ops -> C++ kernel -> floor |",
        "|---|---|---|---|---|---|---|",
    ]

    def ms(value: float) -> str:
        return "-" if value != value else f"{value:.1f}"  # NaN: not measured

    for r in record["figures"]["rows"]:
        t = r["ms"]
        native = t.get("native", float("nan"))
        lines.append(
            f"| {r['model']} b{r['batch']} {r['size']}px | {r['mode']} | {ms(t['bn'])} "
            f"| {ms(t['fast'])} | {ms(native)} | {ms(t['x_passes'])} "
            f"| {ms(t['fast'] - t['bn'])} -> {ms(native - t['bn'])} -> "
            f"{ms(t['x_passes'] - t['bn'])} |"
        )
    return "\n".join(lines) + "\n" + _source(record)


def _selection(table: str, figures: str = "runs") -> Callable[[dict[str, Any]], str]:
    """A renderer for a selection.py record: its ``table`` function (``table``: top-1 per group
    and the ratios' AUC; ``ceiling_table``, ``budget_table``: the branch trained as a detector;
    ``preference_table``, ``first_preference_table``, ``trace_table``: what the loss asks) over
    the record's ``figures`` entry, then the record's source line."""

    def render(record: dict[str, Any]) -> str:
        import selection

        return getattr(selection, table)(record["figures"][figures]) + "\n" + _source(record)

    return render


BLOCKS: dict[str, tuple[str, Callable[[dict[str, Any]], str]]] = {
    "stability-minimal": ("stability_minimal", stability_table),
    "stability-minimal-headline": ("stability_minimal", stability_headline),
    "stability-quickstart": ("stability_quickstart", stability_table),
    "stability-adamw": ("stability_adamw", stability_table),
    "stability-lion": ("stability_lion", stability_table),
    "small-batch": ("small_batch", small_batch_table),
    "small-batch-sizes": ("small_batch_sizes", small_batch_sizes_table),
    "convert-seeds": ("convert_seeds", convert_table),
    "export": ("export", export_table),
    "performance": ("performance", performance_table),
    "performance-gpu": ("performance_gpu", performance_table),
    "performance-synced": ("performance_synced", synced_table),
    "cuda-check": ("cuda_check", cuda_check_table),
    "noisy-labels": ("noisy_labels", noisy_labels_table),
    "appearance-shift": ("appearance_shift", appearance_shift_table),
    "evidence-headline": ("noisy_labels", evidence_headline),
    "evidence-scratch": ("evidence_scratch", evidence_table),
    "evidence-finetune": ("evidence_finetune", evidence_table),
    "quickstart": ("quickstart", quickstart_table),
    "quickstart-seeds": ("quickstart_seeds", quickstart_seeds_table),
    "compile-finetune": ("compile_finetune", compile_table),
    "layer-levers": ("layer_levers", layer_levers_table),
    "kernel-training": ("kernel_training", kernel_training_table),
    "selection": ("selection", _selection("table")),
    "selection-probe": ("selection_probe", _selection("table")),
    "selection-design": ("selection_design", _selection("table")),
    "selection-cells": ("selection_cells", _selection("table")),
    "selection-adamw": ("selection_adamw", _selection("table")),
    "selection-adamw-branch": ("selection_adamw", _selection("branch_table")),
    "selection-hidden": ("selection_hidden", _selection("table")),
    "selection-hidden-routing": ("selection_hidden", _selection("routing_table")),
    "selection-hidden-branch": ("selection_hidden", _selection("branch_table")),
    "selection-adamw-long": ("selection_adamw_long", _selection("table")),
    "selection-adamw-long-routing": ("selection_adamw_long", _selection("routing_table")),
    "selection-adamw-long-branch": ("selection_adamw_long", _selection("branch_table")),
    "selection-anchor": ("selection_anchor", _selection("table")),
    "selection-ceiling": ("selection_ceiling", _selection("ceiling_table", "ceiling")),
    "selection-budget": ("selection_budget", _selection("budget_table", "budget")),
    "selection-coded": ("selection_coded", _selection("table")),
    "selection-long": ("selection_long", _selection("table")),
    "selection-long-routing": ("selection_long", _selection("routing_table")),
    "selection-spread": ("selection_spread", _selection("table")),
    "selection-spread-routing": ("selection_spread", _selection("routing_table")),
    "selection-explore": ("selection_explore", _selection("table")),
    "selection-explore-routing": ("selection_explore", _selection("routing_table")),
    "selection-routing": ("selection_routing", _selection("table")),
    "selection-routing-share": ("selection_routing", _selection("routing_table")),
    "selection-routed": ("selection_routed", _selection("table")),
    "selection-experiments": ("selection_experiments", _selection("table")),
    "selection-preference": ("selection_preference", _selection("preference_table")),
    "selection-first-preference": ("selection_preference", _selection("first_preference_table")),
    "selection-trace": ("selection_trace", _selection("trace_table")),
    "selection-gap-trace": ("selection_gap_trace", _selection("gap_trace_table")),
}
"""Results block name -> (record, renderer)."""


def render(block: str) -> str:
    if block not in BLOCKS:
        raise KeyError(f"no results block {block!r}: add it to benchmarks/results.py BLOCKS")
    record, renderer = BLOCKS[block]
    return renderer(load(record)) + "\n"


def run_figures(run: Path) -> dict[str, Any]:
    """A finetune run's figures from its metrics.jsonl: the last eval, the median images/s."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in records if r.get("eval")][-1]
    rates = [r["images_per_s"] for r in records if "images_per_s" in r]
    return {**final, "images_per_s": statistics.median(rates)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="write a record from a benchmark's JSON output")
    parser.add_argument("name")
    parser.add_argument("--command", required=True, help="the exact command that produced it")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--figures", type=Path, help="the benchmark's JSON")
    source.add_argument(
        "--run", type=Path, help="a finetune run folder: its last eval and median images/s"
    )
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--notes", default="")
    parser.add_argument(
        "--machine",
        default=None,
        help='JSON fields that replace this machine\'s, for a run elsewhere: \'{"cpu": "NVIDIA '
        'H200 (GPU)", "cores": 16, "torch": "2.11.0"}\'',
    )
    parser.add_argument("--commit", default=None, help="the commit measured (default: HEAD)")
    args = parser.parse_args(argv)
    figures = json.loads(args.figures.read_text()) if args.figures else run_figures(args.run)
    info = machine(args.threads)
    if args.machine:
        info.update(json.loads(args.machine))
    path = write_record(
        args.name, args.command, figures, commit=args.commit, machine_info=info, notes=args.notes
    )
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
