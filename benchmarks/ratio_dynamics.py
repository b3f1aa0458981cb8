"""Why EN diverges where BatchNorm learns: per-layer ratio dynamics during fine-tuning.

Fine-tunes a recipe's model (quickstart by default) with the recipe's optimizer groups,
and at every step records, for each EN layer: the batch-mean ratio of every normalizer,
the ratio branch's gradient norms (fc2, fc1), the gradient norm of the layer's gammas and
FC2's bias; per step, the whole model's and the new head's gradient norms before clipping
(clipped as the trainer does, with the recipe's ``train.grad_clip``). A layer "flips" when
its batch-mean source ratio falls below 0.5.

    python benchmarks/ratio_dynamics.py data.batch_size=8 optim.lr=0.005 --steps 200
    python benchmarks/ratio_dynamics.py data.batch_size=8 optim.lr=0.005 model.bn_stats=running

Writes JSON (``--json``) with one record per step; prints the flips and a summary.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]


def _norm(params: list[torch.Tensor]) -> float:
    grads = [p.grad.detach().flatten() for p in params if p.grad is not None]
    return float(torch.cat(grads).norm()) if grads else 0.0


def run(overrides: list[str], steps: int, recipe_path: Path, every: int) -> dict[str, Any]:
    from accelerate.utils import set_seed

    from enorm_cli.config.recipe import load_recipe, resolve_bn_stats
    from enorm_cli.data.datasets import build_transform, load_split, make_loader, with_transform
    from enorm_cli.finetune.model import prepare_model
    from enorm_cli.finetune.optim import build_optimizer, build_scheduler
    from enorm_cli.layers import ExemplarNorm2d
    from enorm_cli.layers.modes import set_bn_stats

    recipe = load_recipe(recipe_path, overrides)
    set_seed(recipe.train.seed)
    split = load_split(
        recipe.data, "train", None, recipe.data.limit_train, recipe.model.num_classes
    )
    prepared = prepare_model(recipe, recipe.model.num_classes or 10)
    split.dataset = with_transform(
        split.dataset, build_transform(recipe.data, prepared.mean, prepared.std, True)
    )
    loader = make_loader(split, recipe.data.batch_size, recipe.data.workers, True, seed=None)
    model = prepared.model
    head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]  # the new classifier
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, ExemplarNorm2d)]
    # the source normalizer: the only one whose gammas are non-zero at conversion
    src = {n: int(m.weight.detach().abs().sum(1).argmax()) for n, m in layers}
    optimizer = build_optimizer(model, recipe)
    scheduler = build_scheduler(optimizer, recipe, len(loader))
    total = min(steps, len(loader) * recipe.schedule.epochs)
    criterion = nn.CrossEntropyLoss()
    captured: dict[str, torch.Tensor] = {}

    def hook(name: str) -> Any:
        def fn(module: nn.Module, inputs: tuple[torch.Tensor, ...], _out: Any) -> None:
            with torch.no_grad():
                captured[name] = module.ratios(inputs[0]).mean(0)

        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in layers]
    records: list[dict[str, Any]] = []
    flipped: dict[str, int] = {}
    step = 0
    tick = time.perf_counter()
    set_bn_stats(model, resolve_bn_stats(recipe.model, recipe.data.batch_size))
    while step < total:
        for x, y in loader:
            loss = criterion(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            step += 1
            head_norm = _norm(list(head.parameters()))
            clip = recipe.train.grad_clip or float("inf")  # as the trainer clips
            grad_norm = float(nn.utils.clip_grad_norm_(model.parameters(), clip))
            rec: dict[str, Any] = {
                "step": step,
                "loss": float(loss.detach()),
                "grad_norm": grad_norm,  # the whole model's, before clipping
                "grad_head": head_norm,
                "layers": {},
            }
            for name, m in layers:
                lam = captured[name]
                ratio_src = float(lam[src[name]])
                if ratio_src < 0.5 and name not in flipped:
                    flipped[name] = step
                if step % every == 0 or step == 1:
                    rec["layers"][name] = {
                        "ratios": [round(float(v), 4) for v in lam],
                        "grad_fc2": _norm([m.ratio.fc2.weight, m.ratio.fc2.bias]),
                        "grad_fc1": _norm([m.ratio.fc1.weight, m.ratio.fc1.bias]),
                        "grad_gamma": _norm([m.weight]),
                        "fc2_bias": [round(float(v), 3) for v in m.ratio.fc2.bias.detach()],
                    }
            optimizer.step()
            scheduler.step_update(step)
            records.append(rec)
            if step >= total:
                break
    for h in handles:
        h.remove()
    return {
        "overrides": overrides,
        "steps": total,
        "seconds": round(time.perf_counter() - tick, 1),
        "flipped": flipped,
        "layer_names": [n for n, _ in layers],
        "records": records,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "quickstart.yaml")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--every", type=int, default=10, help="per-layer detail every N steps")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    base = ["data.limit_train=3000", "data.workers=0"]  # weights: the recipe's, from the user cache
    out = run(base + args.overrides, args.steps, args.recipe, args.every)
    if args.json:
        args.json.write_text(json.dumps(out))
    losses = [r["loss"] for r in out["records"]]
    chunk = max(len(losses) // 10, 1)
    print(
        "loss by tenth:",
        " ".join(
            f"{sum(losses[i : i + chunk]) / len(losses[i : i + chunk]):.2f}"
            for i in range(0, len(losses), chunk)
        ),
    )
    print(
        "gradient norm before clipping, steps 1-10 (the head's):",
        " ".join(f"{r['grad_norm']:.3g} ({r['grad_head']:.3g})" for r in out["records"][:10]),
    )
    print(
        f"{len(out['flipped'])} of {len(out['layer_names'])} layers flipped (source ratio < 0.5):",
        ", ".join(f"{n}@{s}" for n, s in sorted(out["flipped"].items(), key=lambda kv: kv[1])[:12]),
    )
    last = out["records"][-1]
    detail = [r for r in out["records"] if r["layers"]]
    for name in out["layer_names"][-3:] + out["layer_names"][:1]:
        series = [(r["step"], r["layers"][name]) for r in detail]
        print(
            name,
            " | ".join(
                f"s{s}: {d['ratios'][0]:.2f} g2={d['grad_fc2']:.2g} gg={d['grad_gamma']:.2g}"
                for s, d in series[:: max(len(series) // 6, 1)]
            ),
        )
    print(f"final loss {last['loss']:.3f}; {out['seconds']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
