"""Recipe schema, YAML files and key=value overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from enorm_cli.config.recipe import Recipe, dump_recipe, load_recipe
from enorm_cli.errors import EnormError

RECIPES = sorted((Path(__file__).resolve().parents[2] / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_shipped_recipes_validate_and_say_their_hardware(path: Path) -> None:
    recipe = load_recipe(path)
    assert recipe.model.name and recipe.data.kind
    head = path.read_text().split("\n# Model")[0].lower()
    assert (
        "hardware" in head and f"finetune --recipe {path.stem}" in head
    )  # by name: works anywhere


def test_quickstart_has_the_documented_keys() -> None:
    recipe = load_recipe(Path("recipes/quickstart.yaml"))
    assert recipe.model.name == "torchvision:mobilenet_v2" and recipe.model.num_classes == 10
    assert recipe.model.en.normalizers == ("bn", "ln")  # docs/recipes.md: why not in at 32 px
    assert (recipe.model.en.ablation.reduction, recipe.model.en.ablation.pi) == (16, 50)
    assert recipe.data.kind == "fashion_mnist" and recipe.data.image_size == 32
    assert recipe.optim.name == "sgd" and recipe.schedule.name == "cosine"


def test_overrides_are_parsed_as_yaml() -> None:
    recipe = load_recipe(
        Path("recipes/quickstart.yaml"),
        [
            "optim.lr=0.05",
            "data.batch_size=8",
            "model.en.normalizers=[bn,in,ln]",
            "data.limit_train=null",
            "train.grad_clip=1.5",
            "output_dir=/tmp/x",
        ],
    )
    assert recipe.optim.lr == 0.05 and recipe.data.batch_size == 8
    assert recipe.model.en.normalizers == ("bn", "in", "ln") and recipe.data.limit_train is None
    assert recipe.train.grad_clip == 1.5 and recipe.output_dir == "/tmp/x"
    assert "lr: 0.05" in dump_recipe(recipe)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["optim.lrr=1"], "unknown override key 'optim.lrr': did you mean optim.lr"),
        (["optim.lr"], "not key=value"),
        (["optim.lr=abc"], r"optim\.lr: .*valid number.*'abc'"),
        (["data.batch_size=0", "optim.lr=-1"], r"data\.batch_size: .*; optim\.lr: "),
        (["model.en.normalizers=[bn,xx]"], r"model\.en\.normalizers: unknown normalizer\(s\) xx"),
        (["model.en.layer=sn"], r"unknown override key 'model\.en\.layer': it is model\.norm now"),
        (["model.en.pi=10"], r"'model\.en\.pi': it is model\.en\.ablation\.pi now"),
        (["optim.ratio_lr=0.1"], r"it is optim\.ratio_lr_scale \(a multiple of optim\.lr\) now"),
        (["data.kind=parquet"], r"data\.kind: "),
        (
            ["model.norm=bn", "model.bn_stats=renorm"],
            r"model\.bn_stats=renorm renormalizes EN's and SN's bn member.*set model\.norm=en",
        ),
        (["train.precise_bn=-1"], r"train\.precise_bn: "),
    ],
)
def test_bad_overrides_name_the_field(overrides: list[str], match: str) -> None:
    with pytest.raises(EnormError, match=match):
        load_recipe(Path("recipes/quickstart.yaml"), overrides)


def test_bad_recipe_files(tmp_path: Path) -> None:
    with pytest.raises(EnormError, match="not found"):
        load_recipe(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {name: x\ndata: [")
    with pytest.raises(EnormError, match="not valid YAML at line"):
        load_recipe(bad)
    bad.write_text("- a list\n")
    with pytest.raises(EnormError, match="mapping"):
        load_recipe(bad)
    bad.write_text("model: {name: resnet50}\ndata: {kind: fashion_mnist}\noptimizer: {lr: 1}\n")
    with pytest.raises(EnormError, match="optimizer: unknown key"):
        load_recipe(bad)
    bad.write_text("data: {kind: fashion_mnist}\n")
    with pytest.raises(EnormError, match="model: Field required"):
        load_recipe(bad)
    bad.write_text("model: {name: resnet50, en: {pi: 10}}\ndata: {kind: fashion_mnist}\n")
    with pytest.raises(EnormError, match=r"model\.en: pi is model\.en\.ablation\.pi now"):
        load_recipe(bad)
    bad.write_text("model: {name: resnet50}\ndata: {kind: fashion_mnist}\noptim: {affine_lr: 1}\n")
    with pytest.raises(EnormError, match=r"optim: affine_lr is optim\.affine_lr_scale"):
        load_recipe(bad)


@pytest.mark.parametrize("norm", ["en", "sn", "bn"])
def test_model_en_is_the_conversion_settings_and_config_yaml_reloads(
    tmp_path: Path, norm: str
) -> None:
    """model.en is ENSettings (plus sync_stats); its layer follows model.norm, so the
    resolved recipe a run writes (config.yaml) loads again as the same recipe."""
    recipe = load_recipe(
        Path("recipes/quickstart.yaml"), [f"model.norm={norm}", "model.en.exclude=features\\.0\\."]
    )
    assert recipe.model.settings.layer == ("en" if norm == "bn" else norm)
    assert recipe.model.settings.exclude == "features\\.0\\." and not recipe.model.settings.selects(
        "features.0.1"
    )
    config = tmp_path / "config.yaml"
    config.write_text(dump_recipe(recipe))
    assert load_recipe(config) == recipe


STABILITY_KEYS = (
    "train.grad_clip",
    "model.bn_stats",
    "model.en.sync_stats",
    "model.en.ablation.logit_scale",
    "optim.ratio_lr_scale",
    "optim.affine_lr_scale",
)
"""The keys EN's stability rests on: the schema's defaults carry the guarantee."""


def _value(node: object, dotted: str) -> object:
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def _default(dotted: str) -> object:
    section: type = Recipe
    *parents, leaf = dotted.split(".")
    for part in parents:
        section = section.model_fields[part].annotation
    return section.model_fields[leaf].default


def test_the_guarantee_lives_in_the_defaults() -> None:
    """A minimal recipe clips the gradient and resolves every stability key automatically."""
    recipe = load_recipe(Path("benchmarks/recipes/minimal.yaml"))
    assert recipe.train.grad_clip == 5.0
    assert all(_value(recipe, key) in ("auto", None, 5.0) for key in STABILITY_KEYS)


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_shipped_recipes_keep_the_stability_defaults_or_say_why(path: Path) -> None:
    recipe = load_recipe(path)
    comments = "\n".join(
        line.partition("#")[2] for line in path.read_text().splitlines() if "#" in line
    )
    for key in STABILITY_KEYS:
        if _value(recipe, key) != _default(key):
            assert key.rsplit(".", 1)[-1] in comments, f"{path.name}: {key} differs, say why"
