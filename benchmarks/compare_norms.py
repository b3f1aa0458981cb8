"""Train the same network with different normalizations on the same budget, over seeds.

Each run is a real ``enorm finetune`` subprocess on a recipe plus overrides, so what is
measured is what a user gets. Reports mean and std of the final val top-1 per variant,
and wall time, as a rich table, JSON and a Markdown table for the README.

    python benchmarks/compare_norms.py --setting quickstart_10k --seeds 0 1 2
    python benchmarks/compare_norms.py --setting quickstart --variants bn en --seeds 0 --out /tmp/c
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
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

# Settings: a recipe plus overrides shared by every variant of that setting.
SETTINGS: dict[str, dict[str, Any]] = {
    "quickstart_10k": {
        "recipe": "recipes/quickstart.yaml",
        "overrides": [
            "data.limit_train=10000",
            "data.limit_val=2000",
            "data.batch_size=64",
            "optim.lr=0.01",
            "data.scale=[0.6,1.0]",
            "data.crop_pct=null",
        ],
        "what": "converted ImageNet MobileNetV2 fine-tuned on Fashion-MNIST "
        "(10k train, 2k val, 32 px, 1 epoch)",
    },
    "quickstart": {
        "recipe": "recipes/quickstart.yaml",
        "overrides": [],
        "what": "recipes/quickstart.yaml as it is (60k train, 10k test, 32 px, 1 epoch)",
    },
    "scratch": {
        "recipe": "recipes/quickstart.yaml",
        "overrides": [
            "model.name=resnet18",
            "model.checkpoint=null",
            "model.pretrained=false",
            "data.limit_train=10000",
            "data.limit_val=2000",
            "schedule.epochs=2",
            "optim.lr=0.1",
        ],
        "what": "timm resnet18 from random init on Fashion-MNIST "
        "(10k train, 2k test, 32 px, 2 epochs, lr 0.1)",
    },
    "smoke": {
        "recipe": "recipes/quickstart.yaml",
        "overrides": [
            "model.name=test_resnet",
            "model.checkpoint=null",
            "data.limit_train=256",
            "data.limit_val=64",
            "data.workers=0",
            "data.batch_size=32",
        ],
        "what": "tiny subset, for tests",
    },
}

# Variants: overrides on top of a setting.
VARIANTS: dict[str, list[str]] = {
    "bn": ["model.norm=bn"],
    "sn": ["model.norm=sn"],  # Switchable Normalization, the recipe's normalizers
    "en": [],  # the recipe's own EN settings
    # the paper's ablations, on top of the recipe's EN
    "en_pi10": ["model.en.ablation.pi=10"],
    "en_noconv": ["model.en.ablation.use_conv=false"],
    "en_relu": ["model.en.ablation.activation=relu"],
    "en_shared_affine": ["model.en.ablation.shared_affine=true"],
    "en_bn_in_ln": ["model.en.normalizers=[bn,in,ln]"],
    "en_bn_ln": ["model.en.normalizers=[bn,ln]"],
}


def run_one(
    setting: str, variant: str, seed: int, out_root: Path, extra: list[str]
) -> dict[str, Any]:
    """One ``enorm finetune`` run; returns its final eval record plus wall time."""
    cfg = SETTINGS[setting]
    out = out_root / f"{setting}-{variant}-seed{seed}"
    cmd = [
        sys.executable,
        "-m",
        "enorm_cli",
        "finetune",
        "--recipe",
        str(ROOT / cfg["recipe"]),
        "--no-progress",
        "--force",
        *cfg["overrides"],
        *VARIANTS[variant],
        *extra,
        f"train.seed={seed}",
        f"output_dir={out}",
    ]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{variant} seed {seed} failed:\n{proc.stderr[-2000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in records if r.get("eval")][-1]
    speeds = [r["images_per_s"] for r in records if "images_per_s" in r]
    return {
        "variant": variant,
        "seed": seed,
        "top1": final["top1"],
        "top5": final["top5"],
        "wall_s": round(wall, 1),
        "train_images_per_s": round(statistics.median(speeds), 1) if speeds else None,
    }


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for variant in dict.fromkeys(r["variant"] for r in runs):
        mine = [r for r in runs if r["variant"] == variant]
        top1 = [r["top1"] for r in mine]
        rows.append(
            {
                "variant": variant,
                "seeds": [r["seed"] for r in mine],
                "top1": top1,
                "top1_mean": statistics.fmean(top1),
                "top1_std": statistics.stdev(top1) if len(top1) > 1 else 0.0,
                "wall_s_mean": statistics.fmean(r["wall_s"] for r in mine),
                "train_images_per_s": statistics.fmean(r["train_images_per_s"] or 0 for r in mine),
            }
        )
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| variant | top-1 (mean ± std) | per seed | wall s/run | train img/s |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        seeds = ", ".join(f"{t:.2f}" for t in r["top1"])
        lines.append(
            f"| {r['variant']} | {r['top1_mean']:.2f} ± {r['top1_std']:.2f} | {seeds} | "
            f"{r['wall_s_mean']:.0f} | {r['train_images_per_s']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", choices=sorted(SETTINGS), default="quickstart")
    parser.add_argument(
        "--variants", nargs="+", choices=sorted(VARIANTS), default=["bn", "sn", "en"]
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "compare")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument(
        "--merge", nargs="+", type=Path, default=None, help="join JSON files of one setting"
    )
    parser.add_argument("overrides", nargs="*", help="extra recipe overrides for every run")
    args = parser.parse_args(argv)

    meta = {
        "setting": args.setting,
        "what": SETTINGS[args.setting]["what"],
        "overrides": args.overrides,
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d"),
    }
    runs: list[dict[str, Any]] = []
    if args.merge:  # seeds or variants run in separate processes
        for path in args.merge:
            data = json.loads(path.read_text())
            meta, runs = data["meta"], runs + data["runs"]
        order = list(VARIANTS)
        runs.sort(key=lambda r: (order.index(r["variant"]), r["seed"]))
        args.setting = meta["setting"]
    else:
        for seed in args.seeds:  # seeds outermost: load drift hits every variant alike
            for variant in args.variants:
                runs.append(run_one(args.setting, variant, seed, args.out, args.overrides))
                print(json.dumps(runs[-1]), flush=True)
                if args.json:  # after every run: an interrupted comparison keeps what it measured
                    args.json.write_text(
                        json.dumps(
                            {"meta": meta, "runs": runs, "summary": summarize(runs)}, indent=1
                        )
                    )
    if args.json:
        args.json.write_text(
            json.dumps({"meta": meta, "runs": runs, "summary": summarize(runs)}, indent=1)
        )
    rows = summarize(runs)
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{args.setting}: {SETTINGS[args.setting]['what']}")
    for col in ("variant", "top-1 mean", "std", "per seed", "wall s/run", "train img/s"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            r["variant"],
            f"{r['top1_mean']:.2f}",
            f"{r['top1_std']:.2f}",
            ", ".join(f"{t:.2f}" for t in r["top1"]),
            f"{r['wall_s_mean']:.0f}",
            f"{r['train_images_per_s']:.0f}",
        )
    Console().print(table)
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
