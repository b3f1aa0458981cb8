"""The user cache's location rules and ``${ENORM_HOME}`` in recipe paths."""

from __future__ import annotations

from pathlib import Path

import pytest

from enorm_cli.cache import assets_dir, data_dir, enorm_home, expand_path
from enorm_cli.config.recipe import load_recipe
from enorm_cli.config.registry import find_packaged


@pytest.fixture()
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    for name in ("ENORM_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return tmp_path


def test_home_default_then_xdg_then_enorm_home(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert enorm_home() == clean_env / "home" / ".cache" / "enorm"
    monkeypatch.setenv("XDG_CACHE_HOME", str(clean_env / "xdg"))
    assert enorm_home() == clean_env / "xdg" / "enorm"
    monkeypatch.setenv("ENORM_HOME", "~/mine")
    assert enorm_home() == clean_env / "home" / "mine"
    assert assets_dir() == enorm_home() / "assets" and data_dir() == enorm_home() / "data"
    monkeypatch.setenv("ENORM_HOME", "")  # empty counts as unset
    assert enorm_home() == clean_env / "xdg" / "enorm"


def test_expand_path_resolves_the_cache_even_when_unset(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = clean_env / "home" / ".cache" / "enorm"
    assert expand_path("${ENORM_HOME}/assets/w.pth") == f"{home}/assets/w.pth"
    assert expand_path("$ENORM_HOME/x") == f"{home}/x"
    assert (
        expand_path("$ENORM_HOMEWORK/x") == "$ENORM_HOMEWORK/x"
    )  # another (unset) variable: left alone
    monkeypatch.setenv("DATA", "/data")
    assert expand_path("$DATA/webvision") == "/data/webvision"
    assert expand_path("~/runs") == f"{clean_env / 'home'}/runs"
    assert expand_path("runs/quickstart") == "runs/quickstart"


def test_packaged_recipes_read_weights_and_data_from_the_cache(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ENORM_HOME", str(clean_env / "cache"))
    recipe = load_recipe(
        find_packaged("quickstart"), ["data.root=~/fm", "output_dir=$ENORM_HOME/runs/q"]
    )
    assert recipe.model.checkpoint == str(
        clean_env / "cache" / "assets" / "mobilenet_v2-b0353104.pth"
    )
    assert recipe.data.root == str(clean_env / "home" / "fm")
    assert recipe.output_dir == str(clean_env / "cache" / "runs" / "q")
