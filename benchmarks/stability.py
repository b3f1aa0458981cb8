"""Stability grid: BN, frozen-statistics BN, SN and EN over learning rates and batch sizes.

Fine-tunes torchvision's ImageNet MobileNetV2 (recipes/quickstart.yaml: Fashion-MNIST at
32 px, SGD, cosine, 1 epoch) at every (batch size, learning rate) cell, once per variant
and seed, with nothing else changed. Every run is the real ``enorm finetune`` code
(``enorm_cli.finetune.loop.finetune``, in this process so that timm is imported once). The
training subset grows with the batch size so that every cell takes enough steps to learn
(``GRIDS``); the val subset is the same for every run. Results go to JSON after every
run (an interrupted grid keeps what it measured) and to a heat-map figure. Tables, heat
maps and the checks judge each cell's mean over its seeds.

    python benchmarks/stability.py --seeds 0 1 2   # the README grid; as one process per seed
                                                   # (--seeds S, then --merge): 75 min each,
                                                   # three at once on 2 cores
    python benchmarks/stability.py --minimal --seeds 0 1 2  # from a minimal recipe: defaults only
    python benchmarks/stability.py --grid smoke            # what the tests run
    python benchmarks/stability.py --resume                # finish an interrupted grid
    python benchmarks/stability.py --variants en bn --lrs 0.005 --batches 4 --json /tmp/s.json
    python benchmarks/stability.py --variants en_batch --batches 4 --resume   # EN without renorm
    python benchmarks/stability.py --seeds 1 2 --batches 4 --json /tmp/b4.json   # more seeds
    python benchmarks/stability.py --merge /tmp/b4.json /tmp/b128.json --json all.json  # join

Every run recomputes its running statistics over 1,000 training images before training and
before its eval (``train.precise_bn``, ``--precise-bn``; frozen-statistics BN and EN's
``renorm_frozen`` keep the source's): at batch 4 the moving averages are too noisy for an
eval to judge the weights.

Chance is 10% (10 classes): a run "learns" above 2x chance (20%).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CHANCE = 10.0

# Variants: overrides on top of the recipe, nothing else differs between them.
VARIANTS: dict[str, list[str]] = {
    "bn": ["model.norm=bn", "model.bn_stats=batch"],  # the original model, BatchNorm as it trains
    "bn_frozen": [
        "model.norm=bn",
        "model.bn_stats=running",
    ],  # FrozenBatchNorm2d statistics, affine learns
    "sn": ["model.norm=sn"],  # Switchable Normalization, the baseline layer (recipe's bn_stats)
    "en": ["model.norm=en"],  # EN with the recipe's (the package's) defaults
    "en_batch": ["model.norm=en", "model.bn_stats=batch"],  # EN, bn member on batch statistics
    # EN with auto's small-batch mode at any batch
    "en_renorm_frozen": ["model.norm=en", "model.bn_stats=renorm_frozen"],
    # with an adaptive optimizer: the whole ratio branch at the lr (what "auto" resolved to
    # before the logits got their own rate), the per-sample weight alone at 10 times the lr, and
    # the whole branch at 10 times (BIN's policy for its gates; a ratio_lr_scale the recipe sets
    # is the hidden layer's too)
    "en_r1": ["model.norm=en", "optim.ratio_lr_scale=1", "optim.sample_lr_scale=1"],
    "en_sample10": [
        "model.norm=en",
        "optim.ratio_lr_scale=1",
        "optim.sample_lr_scale=10",
    ],
    "en_ratio10": ["model.norm=en", "optim.ratio_lr_scale=10", "optim.sample_lr_scale=10"],
    # the per-sample weight at ten times the lr below 64 images a step too ("auto" gives it the
    # logits' rate from 64 up; at AdamW's lr 0.002 and below that is ten times)
    "en_sample_logits": ["model.norm=en", "optim.sample_lr_scale=10"],
}

DEFAULT_VARIANTS = ("bn", "bn_frozen", "sn", "en")
"""What the README grid runs (``en_batch`` is run at batch 4 beside it)."""

GRIDS: dict[str, dict[str, Any]] = {
    "readme": {
        "lrs": [0.002, 0.005, 0.01, 0.02, 0.05],
        "batches": [4, 16, 128],
        "images": {4: 1000, 8: 2000, 16: 2000, 128: 8000},
        "val": 2000,
    },
    "minimal": {
        "lrs": [0.002, 0.005, 0.01, 0.02, 0.05],
        "batches": [4, 8, 16, 128],
        "images": {4: 1000, 8: 2000, 16: 2000, 128: 8000},
        "val": 2000,
        "recipe": "benchmarks/recipes/minimal.yaml",
        "precise_bn": 0,
        "variants": ["bn", "bn_frozen", "en"],
        "max_batch": {"bn_frozen": 8},
    },
    "smoke": {"lrs": [0.01], "batches": [4], "images": {4: 16}, "val": 16, "model": "test_resnet"},
}
"""``minimal`` runs from a recipe that names only the model, the data, the batch, the lr and
the epochs (``benchmarks/recipes/minimal.yaml``): every other key is the schema's default,
precise BN included (off). Frozen-statistics BN is the small-batch reference, run where the
checks read it (batch <= 8)."""


def run_cell(
    variant: str,
    batch: int,
    lr: float,
    images: int,
    val: int,
    out_root: Path,
    extra: list[str],
    seed: int,
    recipe_path: Path = ROOT / "recipes" / "quickstart.yaml",
) -> dict[str, Any]:
    """One fine-tune; returns its final eval record, mean train loss of its last tenth, wall time.

    A run whose loss turns NaN/Inf (enorm stops it) is recorded as diverged, with top-1 None.
    """
    from enorm_cli.config.recipe import load_recipe
    from enorm_cli.errors import EnormError
    from enorm_cli.finetune.loop import finetune

    out = out_root / f"{variant}-b{batch}-lr{lr:g}-s{seed}"
    overrides = [
        f"data.batch_size={batch}",
        f"optim.lr={lr}",
        f"data.limit_train={images}",
        f"data.limit_val={val}",
        "data.workers=0",
        "train.log_every=1",
        f"train.seed={seed}",
        f"output_dir={out}",
        *extra,
        *VARIANTS[variant],
    ]
    recipe = load_recipe(recipe_path, overrides)
    start = time.perf_counter()
    try:
        final: dict[str, Any] = finetune(recipe, force=True, progress=False)
    except EnormError as exc:
        if "loss became" not in str(exc):
            raise
        final = {"top1": None, "top5": None, "diverged": str(exc).split(";")[0]}
    wall = time.perf_counter() - start
    log = out / "metrics.jsonl"
    records = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    losses = [r["loss"] for r in records if "loss" in r and not r.get("eval")]
    tail = losses[-max(len(losses) // 10, 1) :] or [float("nan")]
    return {
        "variant": variant,
        "batch": batch,
        "lr": lr,
        "seed": seed,
        "images": images,
        "top1": final["top1"],
        "top5": final["top5"],
        "train_loss_end": sum(tail) / len(tail),
        "steps": final.get("step", len(losses)),
        "wall_s": round(wall, 1),
        **({"diverged": final["diverged"]} if "diverged" in final else {}),
    }


def _top1(run: dict[str, Any]) -> float:
    """Top-1 for comparisons: a diverged run (None) learned nothing, 0."""
    return 0.0 if run["top1"] is None else run["top1"]


def _key(run: dict[str, Any]) -> tuple[str, int, float, int]:
    return run["variant"], run["batch"], run["lr"], run.get("seed", 0)


def cell_means(runs: list[dict[str, Any]]) -> dict[tuple[str, int, float], float]:
    """(variant, batch, lr) -> mean top-1 over the cell's seeds (a diverged run counts 0).

    The checks and the heat map judge means: one run is not a measurement at this budget
    (EN restricted to its bn member, BatchNorm's function up to float rounding, scored 79.30
    against BN's 82.30 in the same cell; docs/stability.md).
    """
    seen: dict[tuple[str, int, float], list[float]] = {}
    for r in runs:
        seen.setdefault((r["variant"], r["batch"], r["lr"]), []).append(_top1(r))
    return {key: sum(v) / len(v) for key, v in seen.items()}


def _seed_counts(runs: list[dict[str, Any]]) -> dict[tuple[str, int, float], list[Any]]:
    seen: dict[tuple[str, int, float], list[Any]] = {}
    for r in runs:
        seen.setdefault((r["variant"], r["batch"], r["lr"]), []).append(r["top1"])
    return seen


def table(runs: list[dict[str, Any]], variants: list[str]) -> str:
    """Markdown: one row per (batch, lr), one column per variant; best mean per row in bold.

    A cell is its mean over seeds, with the lowest and highest run when there are several
    ("NaN loss" when every run diverged; a diverged run counts 0 in a mean).
    """
    means, tops = cell_means(runs), _seed_counts(runs)
    keys = sorted({(r["batch"], r["lr"]) for r in runs})
    lines = ["| batch | lr | " + " | ".join(variants) + " |", "|---|---|" + "---|" * len(variants)]
    for batch, lr in keys:
        present = [(v, batch, lr) for v in variants if (v, batch, lr) in means]
        best = max((means[k] for k in present if any(t is not None for t in tops[k])), default=None)
        text = []
        for v in variants:
            key = (v, batch, lr)
            if key not in means:
                text.append("-")
                continue
            if all(t is None for t in tops[key]):
                text.append("NaN loss")
                continue
            vals = [0.0 if t is None else t for t in tops[key]]
            cell = f"**{means[key]:.2f}**" if means[key] == best else f"{means[key]:.2f}"
            if len(vals) > 1:
                cell += f" ({min(vals):.1f}-{max(vals):.1f})"
            text.append(cell)
        lines.append(f"| {batch} | {lr:g} | " + " | ".join(text) + " |")
    return "\n".join(lines)


def check(runs: list[dict[str, Any]]) -> list[str]:
    """The issue's done-when conditions on a grid's cell means, as lines (PASS or FAIL first)."""
    cells = cell_means(runs)
    out = []
    learned = [(b, lr) for (v, b, lr) in cells if v == "bn" and cells[(v, b, lr)] > 2 * CHANCE]
    bad = [
        (b, lr) for b, lr in learned if ("en", b, lr) in cells and cells[("en", b, lr)] < 2 * CHANCE
    ]
    out.append(
        f"{'FAIL' if bad else 'PASS'} EN never near chance where BN learns"
        + (f": {bad}" if bad else f" ({len(learned)} cells)")
    )
    fifty = [(b, lr) for (v, b, lr) in cells if v == "bn" and cells[(v, b, lr)] >= 50]
    worse = [
        (b, lr, round(cells[("en", b, lr)] - cells[("bn", b, lr)], 2))
        for b, lr in fifty
        if ("en", b, lr) in cells and cells[("en", b, lr)] < cells[("bn", b, lr)] - 1.0
    ]
    out.append(
        f"{'FAIL' if worse else 'PASS'} EN within 1 point of BN or above where BN >= 50%"
        + (f": {worse}" if worse else f" ({len(fifty)} cells)")
    )
    for b in sorted({b for (_, b, _) in cells if b <= 8}):

        def best(v: str, b: int = b) -> float:
            return max(
                (t for (vv, bb, _), t in cells.items() if vv == v and bb == b), default=float("nan")
            )

        en, bn, frozen = best("en"), best("bn"), best("bn_frozen")
        ok = en >= bn + 3 and en >= frozen
        out.append(
            f"{'PASS' if ok else 'FAIL'} batch {b}: EN best "
            f"{en:.2f} vs BN best {bn:.2f} (+3 needed), "
            f"frozen-statistics BN best {frozen:.2f}"
        )
    return out


def seeds_label(runs: list[dict[str, Any]]) -> str:
    """The title's seed count: runs per cell, as a range where merged rows differ (3 and 5)."""
    counts = {len(v) for v in _seed_counts(runs).values()}
    low, high = min(counts, default=1), max(counts, default=1)
    if high == 1:
        return ""
    return f", mean of {low} seeds" if low == high else f", mean of {low}-{high} seeds per cell"


def plot(runs: list[dict[str, Any]], variants: list[str], path: Path) -> None:
    """One heat map per variant: batch x lr, colour = top-1, the number written in each cell."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r["batch"] for r in runs})
    lrs = sorted({r["lr"] for r in runs})
    cells = cell_means(runs)
    fig, axes = plt.subplots(
        1,
        len(variants),
        figsize=(3.2 * len(variants), 0.8 * len(batches) + 1.6),
        squeeze=False,
        sharey=True,
    )
    for ax, v in zip(axes[0], variants):
        grid = [[cells.get((v, b, lr), float("nan")) for lr in lrs] for b in batches]
        im = ax.imshow(grid, vmin=0, vmax=100, cmap="viridis", aspect="auto")
        for i, row in enumerate(grid):
            for j, val in enumerate(row):
                if val == val:
                    ax.text(
                        j,
                        i,
                        f"{val:.0f}",
                        ha="center",
                        va="center",
                        fontsize=9,
                        color="white" if val < 60 else "black",
                    )
        ax.set_title(v)
        ax.set_xticks(range(len(lrs)), [f"{lr:g}" for lr in lrs], rotation=45)
        ax.set_yticks(range(len(batches)), [str(b) for b in batches])
        ax.set_xlabel("learning rate")
    axes[0][0].set_ylabel("batch size")
    fig.colorbar(im, ax=axes[0].tolist(), label="val top-1 (%)", shrink=0.8)
    fig.suptitle(
        "Fine-tuning ImageNet MobileNetV2 on Fashion-MNIST: top-1 per (batch, lr)"
        + seeds_label(runs)
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", choices=sorted(GRIDS), default="readme")
    parser.add_argument(
        "--minimal",
        action="store_true",
        help="the minimal-recipe grid (--grid minimal): the schema's defaults, no recipe lines",
    )
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=None)
    parser.add_argument("--lrs", nargs="+", type=float, default=None)
    parser.add_argument("--batches", nargs="+", type=int, default=None)
    parser.add_argument(
        "--seeds", nargs="+", type=int, default=[0], help="train.seed of each run of a cell"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "stability")
    parser.add_argument("--json", type=Path, default=None, help="default: OUT/stability.json")
    parser.add_argument("--plot", type=Path, default=None, help="default: OUT/stability.png")
    parser.add_argument("--resume", action="store_true", help="keep the runs already in --json")
    parser.add_argument(
        "--merge",
        nargs="+",
        type=Path,
        default=[],
        help="also keep the runs in these JSON files (grids run in parallel processes)",
    )
    parser.add_argument(
        "--precise-bn",
        type=int,
        default=None,
        help="train.precise_bn for every run (0: off; default 1000, the minimal grid's 0): "
        "evals judge weights, not noisy statistics",
    )
    parser.add_argument("overrides", nargs="*", help="extra recipe overrides for every run")
    args = parser.parse_args(argv)
    grid = GRIDS["minimal" if args.minimal else args.grid]
    lrs, batches = args.lrs or grid["lrs"], args.batches or grid["batches"]
    args.variants = args.variants or grid.get("variants", list(DEFAULT_VARIANTS))
    recipe_path = ROOT / grid.get("recipe", "recipes/quickstart.yaml")
    precise_bn = grid.get("precise_bn", 1000) if args.precise_bn is None else args.precise_bn
    extra = [*([f"train.precise_bn={precise_bn}"] if precise_bn else []), *args.overrides]
    if "model" in grid:
        extra = [f"model.name={grid['model']}", "model.checkpoint=null", *extra]
    json_path = args.json or args.out / "stability.json"
    plot_path = args.plot or args.out / "stability.png"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "grid": "minimal" if args.minimal else args.grid,
        "recipe": str(recipe_path.relative_to(ROOT)),
        "overrides": args.overrides,
        "precise_bn": precise_bn,
        "seeds": args.seeds,
        "images": {str(k): v for k, v in grid["images"].items()},
        "val": grid["val"],
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d"),
    }
    runs: list[dict[str, Any]] = []
    for path in ([json_path] if args.resume and json_path.exists() else []) + args.merge:
        runs += json.loads(path.read_text())["runs"]
    done = {(r["variant"], r["batch"], r["lr"], r.get("seed", 0)) for r in runs}
    runs = list({_key(r): r for r in runs}.values())  # a run merged twice counts once
    start = time.perf_counter()
    for seed in args.seeds:  # seeds outermost: an interrupted grid has whole seeds
        for batch in batches:
            for lr in lrs:
                for variant in args.variants:  # variants innermost: load drift hits them alike
                    if (variant, batch, lr, seed) in done:
                        continue
                    if batch > grid.get("max_batch", {}).get(variant, batch):
                        continue
                    images = grid["images"].get(batch, max(grid["images"].values()))
                    runs.append(
                        run_cell(
                            variant,
                            batch,
                            lr,
                            images,
                            grid["val"],
                            args.out,
                            extra,
                            seed,
                            recipe_path,
                        )
                    )
                    print(json.dumps(runs[-1]), flush=True)
                    json_path.write_text(json.dumps({"meta": meta, "runs": runs}, indent=1))
    meta["wall_s"] = round(time.perf_counter() - start, 1)
    json_path.write_text(json.dumps({"meta": meta, "runs": runs, "checks": check(runs)}, indent=1))
    plot(runs, args.variants, plot_path)
    print(table(runs, args.variants))
    print("\n".join(check(runs)))
    print(f"{len(runs)} runs, {meta['wall_s']:.0f} s; {json_path}, {plot_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
