"""How often Batch Renormalization's clips bite against the source's statistics.

For each BatchNorm layer of torchvision's ImageNet MobileNetV2 (the source a converted EN
layer's bn member starts from), on training batches of a recipe (default: small_batch.yaml,
Fashion-MNIST at 32 px, 4 images), the share of channels where ``r = sigma_B / sigma_run``
is outside Ioffe's [1/3, 3] or ``d = (mu_B - mu_run) / sigma_run`` outside [-5, 5], and the
median r. Where they bite, clipped renorm trains on another function than eval computes;
hence ``statistics.renorm_limits``: no clips against frozen statistics (docs/stability.md).

    python benchmarks/renorm_clips.py                      # small_batch.yaml, 50 batches
    python benchmarks/renorm_clips.py --batches 50 data.batch_size=16
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def clip_shares(
    model: torch.nn.Module, loader: torch.utils.data.DataLoader, batches: int
) -> dict[str, dict[str, float]]:
    """Per BatchNorm layer: values per statistic (N H W), shares of channels with r or d
    clipped, median r; averaged over ``batches`` training batches, the model in eval."""
    from enorm_cli.layers.statistics import RENORM_LIMITS

    r_max, d_max = RENORM_LIMITS
    sums: dict[str, list[float]] = {}

    def hook(name: str):
        def record(mod: torch.nn.BatchNorm2d, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].double()
            var = x.var((0, 2, 3), unbiased=False)
            run_sigma = (mod.running_var.double() + mod.eps).sqrt()
            r = (var + mod.eps).sqrt() / run_sigma
            d = (x.mean((0, 2, 3)) - mod.running_mean.double()) / run_sigma
            s = sums.setdefault(name, [0.0, 0.0, 0.0, float(x.shape[0] * x[0, 0].numel())])
            s[0] += ((r < 1 / r_max) | (r > r_max)).double().mean().item()
            s[1] += (d.abs() > d_max).double().mean().item()
            s[2] += r.median().item()

        return record

    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.register_forward_pre_hook(hook(name))
    model.eval()
    seen = 0
    with torch.no_grad():
        for x, _ in loader:
            model(x)
            seen += 1
            if seen == batches:
                break
    return {
        name: {
            "values": s[3],
            "r_clipped": s[0] / seen,
            "d_clipped": s[1] / seen,
            "median_r": s[2] / seen,
        }
        for name, s in sums.items()
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "small_batch.yaml")
    parser.add_argument("--batches", type=int, default=50)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("overrides", nargs="*", help="recipe overrides (data.batch_size=16)")
    args = parser.parse_args(argv)

    from enorm_cli.config.recipe import load_recipe
    from enorm_cli.data.datasets import build_transform, load_split, make_loader
    from enorm_cli.finetune.model import prepare_model

    recipe = load_recipe(args.recipe, [*args.overrides, "model.norm=bn"])
    prepared = prepare_model(recipe, recipe.model.num_classes or 10)
    transform = build_transform(recipe.data, prepared.mean, prepared.std, training=True)
    split = load_split(recipe.data, "train", transform, recipe.data.limit_train)
    loader = make_loader(split, recipe.data.batch_size, 0, True, recipe.train.seed)
    shares = clip_shares(prepared.model, loader, args.batches)
    for name, s in shares.items():
        print(
            f"{name:24s} N*H*W {s['values']:6.0f}  r clipped {s['r_clipped']:.3f}  "
            f"d clipped {s['d_clipped']:.3f}  median r {s['median_r']:.2f}"
        )
    if args.json:
        args.json.write_text(json.dumps({"recipe": str(args.recipe), "layers": shares}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
