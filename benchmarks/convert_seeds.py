"""Does verification tell a correct conversion from rounding? Random-init EfficientNetV2.

A randomly initialized ``efficientnetv2_rw_t`` (107 BatchNorm layers) amplifies float32
rounding until the exactly converted model differs from its source by up to 1e-2 of its
logits. For each seed this converts it with ``enorm_cli.convert.pipeline.convert`` (the library call
behind ``enorm convert efficientnetv2_rw_t --no-pretrained``, default batch), and records the
float32 figures (the old check refused above 1e-4), the float64 figures and the written
weights' distance from the float64 conversion (what decides now), and the verdict.

    python benchmarks/convert_seeds.py       # seeds 0-9 -> convert_seeds.json (a results record
                                             # with benchmarks/results.py)
    python benchmarks/convert_seeds.py --seeds 0 1 2 --json /tmp/seeds.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

OLD_FLOAT32_TOLERANCE = 1e-4


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="efficientnetv2_rw_t")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(10)))
    parser.add_argument("--json", type=Path, default=Path("convert_seeds.json"))
    args = parser.parse_args(argv)

    import torch

    from enorm_cli.config.settings import ENSettings
    from enorm_cli.convert.pipeline import convert

    rows = []
    for seed in args.seeds:
        torch.manual_seed(seed)
        tick = time.perf_counter()
        result = convert(args.model, None, ENSettings(), pretrained=False)
        v = result.verification
        row = {
            "seed": seed,
            "float32_relative": v.float32.relative_delta,
            "float32_max_abs_logit": v.float32.max_abs_logit,
            "float32_top1_agreement": v.float32.top1_agreement,
            "old_float32_verdict": v.float32.relative_delta <= OLD_FLOAT32_TOLERANCE,
            "float64_relative": v.float64.relative_delta,
            "rounding_ulps": v.rounding_ulps,
            "source_rounding": v.source_rounding,
            "float64_tolerance": v.tolerance,
            "verified": result.verified,
            "seconds": round(time.perf_counter() - tick, 1),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        meta = {"model": args.model, "torch": torch.__version__, "threads": torch.get_num_threads()}
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    refused_before = sum(not r["old_float32_verdict"] for r in rows)
    print(
        f"{len(rows)} seeds: verified {sum(r['verified'] for r in rows)}; the float32 check "
        f"alone refused {refused_before}"
    )
    return 0 if all(r["verified"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
