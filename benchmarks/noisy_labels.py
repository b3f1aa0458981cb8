"""Noisy labels: BN, frozen-statistics BN, SN and EN fine-tuned on symmetrically noisy labels.

The paper's strongest claim for EN is on noisy web labels (WebVision). This runs the
converted ImageNet MobileNetV2 on a Fashion-MNIST subset whose training labels are
flipped at 0/20/40/60% (``data.label_noise``; val stays clean), every normalizer on the
same flips at one seed, and reports the last epoch's and the best epoch's val top-1:
networks fit clean labels first and memorize the noise later, so the two differ.

    python benchmarks/noisy_labels.py --seeds 0 --json runs/noisy/s0.json   # one per process
    python benchmarks/noisy_labels.py --merge runs/noisy/s*.json --json noisy.json --figure n.png

The runs at noise 0 keep their checkpoints (``--out``): ``benchmarks/appearance_shift.py``
evaluates them under per-image appearance shift.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

VARIANTS: dict[str, list[str]] = {
    "bn": ["model.norm=bn", "model.bn_stats=batch"],  # the original model, BatchNorm as it trains
    "bn_frozen": ["model.norm=bn", "model.bn_stats=running"],  # frozen statistics, affine learns
    "sn": ["model.norm=sn"],  # Switchable Normalization, the recipe's normalizers
    "en": ["model.norm=en"],  # EN with the recipe's (the package's) defaults
    # EN whose ratio branch learns 100x faster: at the default rate a 3-epoch fine-tune
    # leaves the ratios at their prior (as SN's), so this arm asks what moving ratios change
    "en_ratio_lr100": ["model.norm=en", "optim.ratio_lr_scale=100"],
}
DEFAULT_VARIANTS = ("bn", "bn_frozen", "sn", "en")

SETTINGS: dict[str, dict[str, Any]] = {
    "default": {
        "recipe": "recipes/quickstart.yaml",
        "images": 3000,
        "val": 2000,
        "epochs": 3,
        "batch": 64,
        "lr": 0.01,
        "what": "converted ImageNet MobileNetV2 fine-tuned on Fashion-MNIST "
        "(3,000 train with noisy labels, 2,000 clean val, 32 px, 3 epochs, batch 64, lr 0.01)",
    },
    "smoke": {
        "recipe": "recipes/quickstart.yaml",
        "images": 64,
        "val": 32,
        "epochs": 2,
        "batch": 16,
        "lr": 0.01,
        "model": ["model.name=test_resnet", "model.checkpoint=null"],
        "what": "tiny subset, for tests",
    },
}


def run_one(
    setting: str, variant: str, rate: float, seed: int, out_root: Path, extra: list[str]
) -> dict[str, Any]:
    """One fine-tune; returns the val top-1 after every epoch, the last and the best."""
    from enorm_cli.config.recipe import load_recipe
    from enorm_cli.finetune.loop import finetune

    cfg = SETTINGS[setting]
    out = out_root / f"{variant}-noise{round(rate * 100)}-s{seed}"
    overrides = [
        f"data.limit_train={cfg['images']}",
        f"data.limit_val={cfg['val']}",
        f"data.batch_size={cfg['batch']}",
        f"optim.lr={cfg['lr']}",
        f"schedule.epochs={cfg['epochs']}",
        f"data.label_noise={rate}",
        f"data.label_noise_seed={seed}",
        "data.workers=0",
        f"train.seed={seed}",
        f"output_dir={out}",
        *cfg.get("model", []),
        *extra,
        *VARIANTS[variant],
    ]
    start = time.perf_counter()
    finetune(load_recipe(ROOT / cfg["recipe"], overrides), force=True, progress=False)
    wall = time.perf_counter() - start
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    per_epoch = [r["top1"] for r in records if r.get("eval")]
    return {
        "variant": variant,
        "noise": rate,
        "seed": seed,
        "top1_per_epoch": per_epoch,
        "top1_last": per_epoch[-1],
        "top1_best": max(per_epoch),
        "wall_s": round(wall, 1),
        "checkpoint": str(out / "last.safetensors"),
    }


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (variant, noise): mean, min and max over seeds of the last and best top-1."""
    rows = []
    for variant in dict.fromkeys(r["variant"] for r in runs):
        for rate in sorted({r["noise"] for r in runs if r["variant"] == variant}):
            mine = [r for r in runs if r["variant"] == variant and r["noise"] == rate]
            row: dict[str, Any] = {"variant": variant, "noise": rate, "seeds": len(mine)}
            for key in ("top1_last", "top1_best"):
                vals = [r[key] for r in mine]
                row[key] = {
                    "mean": statistics.fmean(vals),
                    "min": min(vals),
                    "max": max(vals),
                    "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
                }
            rows.append(row)
    return rows


def spread_table(
    corner: str,
    keys: list[Any],
    variants: list[str],
    cell: dict[tuple[str, Any], dict[str, float]],
    label: Callable[[Any], str] = str,
) -> str:
    """``keys`` down, ``variants`` across, each cell its mean (min-max over seeds), the best
    mean of a row in bold; ``cell[(variant, key)]`` holds "mean", "min" and "max"."""
    lines = [f"| {corner} | " + " | ".join(variants) + " |", "|---|" + "---|" * len(variants)]
    for key in keys:
        best = max(cell[(v, key)]["mean"] for v in variants if (v, key) in cell)
        text = []
        for v in variants:
            c = cell.get((v, key))
            if c is None:
                text.append("-")
                continue
            mean = f"**{c['mean']:.2f}**" if c["mean"] == best else f"{c['mean']:.2f}"
            text.append(f"{mean} ({c['min']:.1f}-{c['max']:.1f})")
        lines.append(f"| {label(key)} | " + " | ".join(text) + " |")
    return "\n".join(lines)


def markdown(rows: list[dict[str, Any]], key: str = "top1_last") -> str:
    """Noise rates down, normalizers across: mean (min-max over seeds); best mean in bold."""
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    rates = sorted({r["noise"] for r in rows})
    cell = {(r["variant"], r["noise"]): r[key] for r in rows}
    corner = "label noise, " + ("last epoch" if key == "top1_last" else "best epoch")
    return spread_table(corner, rates, variants, cell, lambda r: f"{round(r * 100)}%")


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Top-1 against noise rate, last and best epoch side by side; bands span the seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, key, title in ((axes[0], "top1_last", "last epoch"), (axes[1], "top1_best", "best")):
        for variant in dict.fromkeys(r["variant"] for r in rows):
            mine = sorted((r for r in rows if r["variant"] == variant), key=lambda r: r["noise"])
            x = [100 * r["noise"] for r in mine]
            ax.plot(x, [r[key]["mean"] for r in mine], marker="o", label=variant)
            ax.fill_between(
                x, [r[key]["min"] for r in mine], [r[key]["max"] for r in mine], alpha=0.2
            )
        ax.set_title(f"val top-1, {title} (clean val; band: min-max over seeds)")
        ax.set_xlabel("training labels flipped (%)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("top-1 (%)")
    axes[0].legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.part.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(path)


def write_json(path: Path, meta: dict[str, Any], runs: list[dict[str, Any]]) -> None:
    tmp = path.with_name(f".{path.name}.part")
    tmp.write_text(json.dumps({"meta": meta, "runs": runs, "summary": summarize(runs)}, indent=1))
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", choices=sorted(SETTINGS), default="default")
    parser.add_argument(
        "--variants", nargs="+", choices=sorted(VARIANTS), default=list(DEFAULT_VARIANTS)
    )
    parser.add_argument("--rates", nargs="+", type=float, default=[0.0, 0.2, 0.4, 0.6])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "noisy")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--figure", type=Path, default=None, help="write the figure here (PNG)")
    parser.add_argument("--merge", nargs="+", type=Path, default=None, help="merge JSON files")
    parser.add_argument("overrides", nargs="*", help="extra recipe overrides for every run")
    args = parser.parse_args(argv)

    cfg = SETTINGS[args.setting]
    meta = {
        "setting": args.setting,
        "what": cfg["what"],
        "overrides": args.overrides,
        "date": time.strftime("%Y-%m-%d"),
    }
    runs: list[dict[str, Any]] = []
    if args.merge:
        for path in args.merge:
            data = json.loads(path.read_text())
            meta = data["meta"]
            runs.extend(data["runs"])
    else:
        for seed in args.seeds:
            for rate in args.rates:
                for variant in args.variants:
                    runs.append(
                        run_one(args.setting, variant, rate, seed, args.out, args.overrides)
                    )
                    print(json.dumps(runs[-1]), flush=True)
                    if args.json:  # after every run: an interrupted grid keeps what it measured
                        write_json(args.json, meta, runs)
    if args.json:
        write_json(args.json, meta, runs)
    rows = summarize(runs)
    print("last epoch\n" + markdown(rows, "top1_last"))
    print("best epoch\n" + markdown(rows, "top1_best"))
    if args.figure:
        plot(rows, args.figure)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
