"""Shared fixtures: deterministic seeds and the real assets the tests use."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

# Triton's kernels (layers/triton_ops.py) run on CPU tensors under its interpreter; it must be
# on before triton.language is first imported (its library functions are built then).
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/reference.py

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub


@pytest.fixture(autouse=True)
def _seed() -> None:
    import torch

    torch.manual_seed(0)


@pytest.fixture(scope="session")
def native_kernel():
    """EN's C++ kernel, built once (scripts/setup_env.sh has usually built it already)."""
    from enorm_cli.layers import native

    if shutil.which("c++") is None:
        pytest.skip("no C++ compiler: EN's kernel cannot be built here")
    return native.build()


# The tensor ops' run of each backend-parametrized test is in the full suite only: the fast tier
# keeps one run of each (the kernel's, what a user's CPU takes) to stay under 90 s.
@pytest.fixture(params=["native", pytest.param("tensor", marks=pytest.mark.slow)])
def en_backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Which hand-written path EN's node runs: the C++ kernel's or the tensor ops' (the
    fallback where no compiler built it)."""
    from enorm_cli.layers import native

    if request.param == "native":
        request.getfixturevalue("native_kernel")
        monkeypatch.setenv(native.ENV, "auto")
    else:
        monkeypatch.setenv(native.ENV, "0")
    return request.param


@pytest.fixture(scope="session")
def photo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real photos (scikit-image and scikit-learn ship them) as image files in class folders."""
    import numpy as np
    from PIL import Image
    from skimage import data
    from sklearn.datasets import load_sample_images

    root = tmp_path_factory.mktemp("photos")
    photos = {
        "cat/chelsea.png": data.chelsea(),
        "person/astronaut.jpg": data.astronaut(),
        "cup/coffee.jpg": data.coffee(),
        "rocket/rocket.jpg": data.rocket(),
    }
    for name, image in zip(("china", "flower"), load_sample_images().images):
        photos[f"scene/{name}.jpg"] = image
    for rel, image in photos.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.asarray(image)).save(path)
    return root


@pytest.fixture(scope="session")
def mobilenet_weights() -> Path:
    """torchvision's official ImageNet MobileNetV2 weights in the user cache (``enorm fetch``)."""
    from enorm_cli.cache import assets_dir

    path = assets_dir() / "mobilenet_v2-b0353104.pth"
    if not path.is_file():
        pytest.fail(f"{path} is missing: run ./scripts/test.sh (or enorm fetch) to fetch it")
    return path


@pytest.fixture()
def crops(tmp_path: Path, photo_dir: Path) -> Path:
    """A 3-class image folder with filelists (8 train, 4 val images per class)."""
    from helpers import crop_dataset

    return crop_dataset(photo_dir, tmp_path / "crops", per_class=8)


@pytest.fixture(scope="session")
def image_classes(tmp_path_factory: pytest.TempPathFactory, photo_dir: Path) -> Path:
    """root/{train,val}/class{0,1,2}/*.png: crops of three real photos."""
    from helpers import write_crops

    root = tmp_path_factory.mktemp("classes")
    write_crops(photo_dir, root, per_class=8)
    return root


@pytest.fixture(scope="session")
def finetuned(tmp_path_factory: pytest.TempPathFactory, image_classes: Path) -> Path:
    """A real fine-tuning run (test_resnet, 2 epochs): its best.safetensors holds ratio stats."""
    from helpers import QUICK, tiny_recipe

    from enorm_cli.config.recipe import load_recipe
    from enorm_cli.finetune.loop import finetune

    out = tmp_path_factory.mktemp("ft") / "run"
    # the per-sample term at its large-batch rate, so that 2 short epochs at batch 4 move it
    overrides = tiny_recipe(
        image_classes,
        out,
        "imagefolder",
        "model.en.normalizers=[bn,in,ln]",
        "optim.sample_lr_scale=300",
    )
    recipe = load_recipe(QUICK, overrides)
    finetune(recipe, progress=False)
    return out / "best.safetensors"
