"""A behaviour fingerprint for refactors: run it on two commits and diff the output.

For a few timm test models converted to EN (and SN): the conversion's max |delta logit|,
the optimizer groups, then 3 SGD steps in train mode; printed are hashes of the state dict
and of the eval output afterwards. Identical lines mean bit-identical conversion and
training (same machine, same thread count); how issue 13's refactor was checked.

    python benchmarks/fingerprint.py > new.txt      # on the other commit: > old.txt; diff
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CASES = [
    ("test_efficientnet_gn", ("bn", "in", "ln", "gn"), "en"),
    ("test_resnet", ("bn", "in", "ln"), "en"),
    ("test_resnet", ("bn", "in", "ln"), "sn"),
    ("test_convnext", ("bn", "in", "ln"), "en"),
]


def _hash(tensors: list) -> str:
    import torch

    flat = torch.cat([t.detach().double().flatten() for t in tensors])
    return hashlib.sha256(flat.numpy().tobytes()).hexdigest()[:16]


def fingerprint(model_name: str, normalizers: tuple[str, ...], layer: str) -> str:
    import timm
    import torch

    from enorm_cli.config.recipe import Recipe
    from enorm_cli.config.settings import ENSettings
    from enorm_cli.convert.surgery import replace_norms
    from enorm_cli.finetune.optim import recipe_param_groups

    torch.manual_seed(0)
    source = timm.create_model(model_name, num_classes=10).eval()
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        reference = source(x)
    model = timm.create_model(model_name, num_classes=10)
    model.load_state_dict(source.state_dict())
    report = replace_norms(model, ENSettings(normalizers=normalizers, layer=layer))
    with torch.no_grad():
        delta = (model.eval()(x) - reference).abs().max().item()
    recipe = Recipe.model_validate(
        {"model": {"name": model_name, "norm": layer}, "data": {"kind": "fashion_mnist"}}
    )
    groups = recipe_param_groups(model, recipe.optim)
    optimizer = torch.optim.SGD(groups, lr=0.05, momentum=0.9)
    model.train()
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        xb, yb = torch.randn(8, 3, 64, 64, generator=g), torch.randint(0, 10, (8,), generator=g)
        loss = torch.nn.functional.cross_entropy(model(xb), yb)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        out = model.eval()(x)
    sizes = [(group["name"], len(group["params"]), group["lr"]) for group in groups]
    return (
        f"{model_name} {layer} {len(report.converted)} delta={delta:.3e} {sizes} "
        f"state {_hash(list(model.state_dict().values()))} out {_hash([out])}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=None, help="default: every case")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    for name, normalizers, layer in CASES:
        if args.models is None or name in args.models:
            print(fingerprint(name, normalizers, layer), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
