"""Shared fixtures: deterministic seeds and the real assets the tests use."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/reference.py

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub


@pytest.fixture(autouse=True)
def _seed() -> None:
    import torch

    torch.manual_seed(0)


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
