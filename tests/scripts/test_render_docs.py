"""The generated parts of the docs: the recipe reference from the schema, results tables from
the record; a committed part that differs from its render fails here."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import render_docs  # noqa: E402


def test_committed_generated_parts_equal_their_render(capsys) -> None:
    assert render_docs.main(["--check"]) == 0, capsys.readouterr().out


def test_the_recipe_reference_lists_every_key_of_the_schema() -> None:
    from enorm_cli.config.recipe import Recipe

    def leaves(model, prefix=""):
        for name, field in model.model_fields.items():
            ann = field.annotation
            if isinstance(ann, type) and hasattr(ann, "model_fields"):
                yield from leaves(ann, prefix + name + ".")
            else:
                yield prefix + name

    text = render_docs.RECIPE_KEYS.read_text()
    keys = list(leaves(Recipe))
    assert "train.grad_clip" in keys and "model.en.ablation.pi" in keys
    for key in keys:
        assert f"| `{key}` |" in text, key
    assert "| `train.grad_clip` | `float | null` | `5.0` |" in text.replace("\\|", "|")


def test_a_stale_table_is_caught(tmp_path: Path, monkeypatch) -> None:
    page = tmp_path / "page.md"
    page.write_text("x\n<!-- results:export -->\n| stale |\n<!-- /results -->\n")
    rendered = render_docs.render_blocks(page.read_text())
    assert "| stale |" not in rendered and "onnxruntime" in rendered
