"""What ``train.compile`` buys a fine-tune: images/s and compile time, eager against compiled.

Each run is a real ``enorm finetune`` subprocess (the packaged quickstart recipe on a
Fashion-MNIST subset, one thread, a fresh inductor cache), so what is measured is what a user
gets. The logged images/s is the epoch's running average, so the steady rate is taken between
the end of the first tenth of the steps (compilation is over by then) and the last step; the
compile time is the compiled run's extra wall time over the eager run's beyond what its
steady rate explains.

    python benchmarks/compile_finetune.py --norms en bn --json /tmp/compile.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def run(
    norm: str, compile_: bool, images: int, batch: int, out: Path, backend: str = "inductor"
) -> dict[str, Any]:
    """One fine-tune; its wall time, steps and steady images/s (metrics.jsonl)."""
    cmd = [
        sys.executable,
        "-m",
        "enorm_cli",
        "finetune",
        "--recipe",
        "quickstart",
        "--no-progress",
        "--force",
        f"model.norm={norm}",
        f"train.compile={str(compile_).lower()}",
        f"train.compile_backend={backend}",
        f"data.limit_train={images}",
        "data.limit_val=256",
        f"data.batch_size={batch}",
        "data.workers=0",
        "train.log_every=1",
        f"output_dir={out}",
    ]
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCHINDUCTOR_CACHE_DIR": cache}
        start = time.perf_counter()
        subprocess.run(cmd, check=True, cwd=ROOT, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "images_per_s" in r and not r.get("eval")]
    first, last = steps[max(len(steps) // 10, 1) - 1], steps[-1]

    def elapsed(r: dict[str, Any]) -> float:  # seconds since the epoch began
        return r["step"] * batch / r["images_per_s"]

    steady = (last["step"] - first["step"]) * batch / (elapsed(last) - elapsed(first))
    return {
        "norm": norm,
        "compile": compile_,
        "wall_s": round(wall, 1),
        "steps": len(steps),
        "images_per_s": round(steady, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--norms", nargs="+", default=["en", "bn"])
    parser.add_argument("--images", type=int, default=3072)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--backend", default="inductor", help="train.compile_backend")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for norm in args.norms:
            for compile_ in (False, True):
                out = Path(tmp) / "run"
                runs.append(run(norm, compile_, args.images, args.batch, out, args.backend))
                print(json.dumps(runs[-1]), flush=True)
    summary = []
    for norm in args.norms:
        eager, compiled = (r for r in runs if r["norm"] == norm)
        steady_s = compiled["steps"] * args.batch / compiled["images_per_s"]
        eager_s = eager["steps"] * args.batch / eager["images_per_s"]
        summary.append(
            {
                "norm": norm,
                "eager_images_per_s": eager["images_per_s"],
                "compiled_images_per_s": compiled["images_per_s"],
                "speedup": round(compiled["images_per_s"] / eager["images_per_s"], 2),
                "compile_s": round(compiled["wall_s"] - eager["wall_s"] - (steady_s - eager_s), 1),
            }
        )
        print(json.dumps(summary[-1]))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"runs": runs, "summary": summary}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
