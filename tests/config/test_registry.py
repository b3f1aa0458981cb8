"""Packaged recipes: listing, ``--recipe`` resolution from any directory, copying out."""

from __future__ import annotations

from pathlib import Path

import pytest

from enorm_cli.config.recipe import load_recipe
from enorm_cli.config.registry import (
    copy_recipe,
    find_packaged,
    list_recipes,
    packaged_dir,
    resolve_recipe,
)
from enorm_cli.errors import EnormError

ROOT = Path(__file__).resolve().parents[2]


def test_every_recipe_in_the_checkout_is_packaged_and_described() -> None:
    names = sorted(p.stem for p in (ROOT / "recipes").glob("*.yaml"))
    entries = list_recipes()
    assert [e.name for e in entries] == names and len(names) >= 5
    for entry in entries:
        assert entry.purpose and entry.hardware, (
            entry
        )  # the header says what it is for and what it needs
        load_recipe(entry.path)  # and it validates


def test_packaged_dir_is_the_checkout_folder_in_an_editable_install() -> None:
    assert packaged_dir().resolve() == (ROOT / "recipes").resolve()


def test_resolution_from_another_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    packaged = packaged_dir() / "webvision.yaml"
    assert resolve_recipe("webvision") == packaged
    assert resolve_recipe("webvision.yaml") == packaged
    mine = tmp_path / "webvision.yaml"
    mine.write_text("model: {name: resnet18}\ndata: {kind: imagefolder}\n")
    assert resolve_recipe("webvision.yaml") == Path("webvision.yaml")  # an existing file wins
    assert resolve_recipe(str(mine)) == mine
    assert resolve_recipe("webvision") == packaged  # NAME without the suffix stays the packaged one


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("quickstrat", "did you mean quickstart?"),
        ("nothing_like_it", "packaged recipes: "),
        ("some/dir/quickstart.yaml", "recipe file .* not found: check the path"),
    ],
)
def test_unknown_recipe_names_the_fix(
    value: str, message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(EnormError, match=message):
        resolve_recipe(value)


def test_a_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(EnormError, match="is a directory"):
        resolve_recipe(str(tmp_path))


def test_copy_never_overwrites_without_force(tmp_path: Path) -> None:
    target = copy_recipe("quickstart", tmp_path)
    assert target == tmp_path / "quickstart.yaml"
    assert target.read_text() == find_packaged("quickstart").read_text()
    with pytest.raises(EnormError, match="exists: pass --force"):
        copy_recipe("small_batch", target)
    assert target.read_text() == find_packaged("quickstart").read_text()
    copy_recipe("small_batch", target, force=True)
    assert target.read_text() == find_packaged("small_batch").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["quickstart.yaml"]  # no temp files left
    with pytest.raises(EnormError, match="does not exist"):
        copy_recipe("quickstart", tmp_path / "missing" / "q.yaml")
