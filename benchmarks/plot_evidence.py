"""Bar chart of compare_norms.py results: mean top-1 per variant with the seeds as dots.

python benchmarks/plot_evidence.py runs/evidence/scratch.json runs/evidence/finetune.json \
    --out evidence.png
"""

from __future__ import annotations

import argparse
import json
import textwrap
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = [json.loads(p.read_text()) for p in args.results]
    fig, axes = plt.subplots(1, len(data), figsize=(5.5 * len(data), 4.2), squeeze=False)
    for ax, result in zip(axes[0], data):
        rows = result["summary"]
        names = [r["variant"] for r in rows]
        colors = ["#4C72B0" if n == "bn" else "#DD8452" if n == "sn" else "#55A868" for n in names]
        ax.bar(
            range(len(rows)),
            [r["top1_mean"] for r in rows],
            yerr=[r["top1_std"] for r in rows],
            color=colors,
            capsize=4,
            alpha=0.85,
        )
        for i, r in enumerate(rows):
            ax.scatter([i] * len(r["top1"]), r["top1"], color="black", s=12, zorder=3)
        low = min(min(r["top1"]) for r in rows)
        high = max(max(r["top1"]) for r in rows)
        ax.set_ylim(low - 3, high + 2)
        ax.set_xticks(range(len(rows)), names, rotation=30, ha="right")
        ax.set_ylabel("test top-1 (%)")
        ax.set_title(
            "\n".join(textwrap.wrap(result["meta"]["what"], 60))
            + "\nbars: mean ± std over seeds; dots: seeds",
            fontsize=9,
        )
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
