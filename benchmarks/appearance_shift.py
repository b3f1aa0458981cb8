"""Appearance shift: top-1 of clean-trained BN, SN and EN models when each val image gets its own
contrast, brightness or gamma change, and where EN's per-sample ratios move as it grows.

BN normalizes every image with one set of statistics; IN and LN compute theirs per image, so
a per-image gain or offset is what they remove. The models are the noise-0 runs of
``benchmarks/noisy_labels.py`` (fine-tuned on clean labels); each is evaluated on the same
val images at severities 0-5 of each shift (``enorm_cli.data.shift``: the same draw per image for
every model), and EN's ratios are read per sample on the shifted images (``enorm inspect
--shift``): the mean per normalizer over layers, and how a sample's LN (or IN) share follows
the size of its own shift.

    python benchmarks/appearance_shift.py --runs runs/noisy --json shift.json --figure shift.png
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("bn", "bn_frozen", "sn", "en", "en_ratio_lr100")


def _data(shift: str | None) -> Any:
    from enorm_cli.config.recipe import DataConfig

    return DataConfig(kind="fashion_mnist", val="val", workers=0, shift=shift)


def accuracy_rows(
    checkpoints: dict[tuple[str, int], Path], kinds: list[str], severities: list[int], limit: int
) -> list[dict[str, Any]]:
    """Top-1 of every checkpoint at every (kind, severity); severity 0 once, shared by kinds."""
    from enorm_cli.evaluate import evaluate_checkpoint

    rows = []
    for (variant, seed), path in checkpoints.items():
        clean = evaluate_checkpoint(path, _data(None), 250, 0, limit).top1
        for kind in kinds:
            for severity in severities:
                top1 = (
                    clean
                    if severity == 0
                    else evaluate_checkpoint(path, _data(f"{kind}:{severity}"), 250, 0, limit).top1
                )
                rows.append(
                    {
                        "variant": variant,
                        "seed": seed,
                        "kind": kind,
                        "severity": severity,
                        "top1": top1,
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
    return rows


def _pearson(x: list[float], y: list[float]) -> float:
    mx, my = statistics.fmean(x), statistics.fmean(y)
    sx = math.sqrt(sum((a - mx) ** 2 for a in x))
    sy = math.sqrt(sum((b - my) ** 2 for b in y))
    return sum((a - mx) * (b - my) for a, b in zip(x, y)) / (sx * sy) if sx and sy else 0.0


def ratio_rows(
    path: Path, seed: int, kinds: list[str], severities: list[int], samples: int
) -> list[dict[str, Any]]:
    """EN's ratios on shifted images: the mean per normalizer over layers and samples, and the
    correlation over samples between the size of a sample's shift, |log factor|, and its
    share of each per-image normalizer (mean over layers)."""
    import torch

    from enorm_cli.data.shift import parse_shift
    from enorm_cli.inspect.report import inspect_on_data

    rows = []
    seen: dict[str, Any] = {}  # severity 0 is the same unshifted images for every kind
    for kind in kinds:
        for severity in severities:
            spec = f"{kind}:{severity}" if severity else "none"
            if spec not in seen:
                seen[spec] = inspect_on_data(path, _data(f"{kind}:{severity}"), samples, 250, 0)
            result = seen[spec]
            per_sample = result.per_sample  # N x L x K, each layer in its own order
            assert per_sample is not None
            shift = parse_shift(f"{kind}:{severity}")
            size = [abs(math.log(shift.factor(i))) for i in range(per_sample.shape[0])]
            row: dict[str, Any] = {"seed": seed, "kind": kind, "severity": severity}
            for name in result.normalizer_names:
                columns = [
                    per_sample[:, layer, r.normalizers.index(name)]
                    for layer, r in enumerate(result.ratios)
                    if name in r.normalizers
                ]
                by_sample = torch.stack(columns, dim=1).mean(dim=1)  # N, mean over layers
                row[name] = float(by_sample.mean())
                if name != "bn" and severity > 0:
                    row[f"corr_{name}_vs_shift"] = _pearson(size, by_sample.tolist())
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """(variant, kind, severity) -> mean, min, max top-1 over seeds."""
    out = []
    keys = dict.fromkeys((r["variant"], r["kind"], r["severity"]) for r in rows)
    for variant, kind, severity in keys:
        vals = [
            r["top1"]
            for r in rows
            if (r["variant"], r["kind"], r["severity"]) == (variant, kind, severity)
        ]
        out.append(
            {
                "variant": variant,
                "kind": kind,
                "severity": severity,
                "seeds": len(vals),
                "mean": statistics.fmean(vals),
                "min": min(vals),
                "max": max(vals),
            }
        )
    return out


def markdown(summary: list[dict[str, Any]], kind: str) -> str:
    """Severity down, normalizers across: mean (min-max over seeds); best mean in bold."""
    from noisy_labels import spread_table

    mine = [r for r in summary if r["kind"] == kind]
    variants = list(dict.fromkeys(r["variant"] for r in mine))
    cell = {(r["variant"], r["severity"]): r for r in mine}
    return spread_table(kind, sorted({r["severity"] for r in mine}), variants, cell)


def ratio_markdown(ratios: list[dict[str, Any]]) -> str:
    """EN's mean ratio per normalizer by model, kind and severity (mean over seeds, layers and
    samples), and the correlation over samples between a sample's shift size and its share of
    each per-image normalizer."""
    if not ratios:
        return ""
    names = [k for k in ("bn", "in", "ln") if k in ratios[0]]
    per_image = [n for n in names if n != "bn"]
    head = ["model", "kind", "severity", *names, *(f"corr({n}, shift size)" for n in per_image)]
    lines = ["| " + " | ".join(head) + " |", "|---|---|---|" + "---|" * (len(head) - 3)]
    keys = dict.fromkeys((r.get("variant", "en"), r["kind"], r["severity"]) for r in ratios)
    for variant, kind, severity in keys:
        mine = [
            r
            for r in ratios
            if (r.get("variant", "en"), r["kind"], r["severity"]) == (variant, kind, severity)
        ]
        cells = [f"{statistics.fmean(r[n] for r in mine):.3f}" for n in names]
        for n in per_image:
            corr = [r[f"corr_{n}_vs_shift"] for r in mine if f"corr_{n}_vs_shift" in r]
            cells.append(f"{statistics.fmean(corr):+.2f}" if corr else "-")
        lines.append(f"| {variant} | {kind} | {severity} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(summary: list[dict[str, Any]], ratios: list[dict[str, Any]], path: Path) -> None:
    """Top: top-1 against severity per shift kind (band: min-max over seeds). Bottom: EN's mean
    ratio per normalizer against severity."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(dict.fromkeys(r["kind"] for r in summary))
    colors = {v: f"C{i}" for i, v in enumerate(dict.fromkeys(r["variant"] for r in summary))}
    fig, axes = plt.subplots(2, len(kinds), figsize=(4.2 * len(kinds), 7), squeeze=False)
    for col, kind in enumerate(kinds):
        ax = axes[0][col]
        for variant in dict.fromkeys(r["variant"] for r in summary):
            mine = sorted(
                (r for r in summary if r["variant"] == variant and r["kind"] == kind),
                key=lambda r: r["severity"],
            )
            x = [r["severity"] for r in mine]
            ax.plot(x, [r["mean"] for r in mine], marker="o", label=variant)
            ax.fill_between(x, [r["min"] for r in mine], [r["max"] for r in mine], alpha=0.2)
        ax.set_title(f"{kind}: val top-1")
        ax.set_xlabel("severity (per-image draw)")
        ax.grid(alpha=0.3)
        ax = axes[1][col]
        mine = [r for r in ratios if r["kind"] == kind]
        for variant in dict.fromkeys(r.get("variant", "en") for r in mine):
            rows = [r for r in mine if r.get("variant", "en") == variant]
            for name in [k for k in ("bn", "in", "ln") if k in rows[0]]:
                sev = sorted({r["severity"] for r in rows})
                ys = [statistics.fmean(r[name] for r in rows if r["severity"] == s) for s in sev]
                style = "-" if name == "bn" else "--"
                ax.plot(
                    sev,
                    ys,
                    style,
                    color=colors.get(variant),
                    marker="o",
                    label=f"{variant}: {name}",
                )
        ax.set_title(f"{kind}: EN's mean ratios")
        ax.set_xlabel("severity")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("top-1 (%)")
    axes[1][0].set_ylabel("ratio (mean over layers, samples)")
    axes[0][0].legend()
    axes[1][0].legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.part.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "noisy")
    parser.add_argument(
        "--variants", nargs="+", choices=VARIANTS, default=["bn", "bn_frozen", "sn", "en"]
    )
    parser.add_argument("--merge", nargs="+", type=Path, default=None, help="merge JSON files")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--kinds", nargs="+", default=["contrast", "brightness", "gamma"])
    parser.add_argument("--severities", nargs="+", type=int, default=[0, 1, 2, 3, 4, 5])
    parser.add_argument("--limit", type=int, default=2000, help="val images (fixed subset)")
    parser.add_argument("--samples", type=int, default=512, help="images for EN's ratios")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--figure", type=Path, default=None)
    args = parser.parse_args(argv)

    rows: list[dict[str, Any]] = []
    ratios: list[dict[str, Any]] = []
    if args.merge:
        for path in args.merge:
            data = json.loads(path.read_text())
            rows += data["runs"]
            ratios += [{"variant": "en", **r} for r in data["en_ratios"]]
    else:
        checkpoints = {
            (v, s): args.runs / f"{v}-noise0-s{s}" / "last.safetensors"
            for s in args.seeds
            for v in args.variants
        }
        missing = [str(p) for p in checkpoints.values() if not p.is_file()]
        if missing:
            raise SystemExit(f"no checkpoint {missing[0]}: run benchmarks/noisy_labels.py first")
        rows = accuracy_rows(checkpoints, args.kinds, args.severities, args.limit)
        for (variant, seed), path in checkpoints.items():
            if variant.startswith("en"):
                found = ratio_rows(path, seed, args.kinds, args.severities, args.samples)
                ratios += [{"variant": variant, **r} for r in found]
    summary = summarize(rows)
    meta = {
        "what": "clean-trained models of benchmarks/noisy_labels.py (noise 0) on Fashion-MNIST "
        f"val ({args.limit} images) with a per-image appearance shift (enorm_cli.data.shift)",
        "date": time.strftime("%Y-%m-%d"),
    }
    if args.json:
        tmp = args.json.with_name(f".{args.json.name}.part")
        tmp.write_text(
            json.dumps(
                {"meta": meta, "runs": rows, "summary": summary, "en_ratios": ratios}, indent=1
            )
        )
        tmp.replace(args.json)
    for kind in dict.fromkeys(r["kind"] for r in summary):
        print(markdown(summary, kind))
    print(ratio_markdown(ratios))
    if args.figure:
        plot(summary, ratios, args.figure)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
