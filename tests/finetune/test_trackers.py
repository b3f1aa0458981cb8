"""``train.log_with``: Accelerate trackers beside metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import QUICK, tiny_recipe

from enorm_cli.config.recipe import load_recipe
from enorm_cli.errors import EnormError
from enorm_cli.finetune.loop import finetune
from enorm_cli.finetune.trackers import check_trackers, flat_config, scalars


def test_unknown_or_missing_trackers_name_the_fix() -> None:
    assert check_trackers(["tensorboard", "tensorboard"]) == ["tensorboard"]
    with pytest.raises(EnormError, match="'tensorbored' is not a tracker Accelerate knows"):
        check_trackers(["tensorbored"])
    import importlib.util

    if importlib.util.find_spec("wandb") is None:
        with pytest.raises(EnormError, match="wandb is not installed: pip install wandb"):
            check_trackers(["wandb"])


def test_flat_config_and_scalars() -> None:
    flat = flat_config(
        {"model": {"name": "r", "en": {"normalizers": ["bn", "ln"], "logit_scale": None}}}
    )
    assert flat == {
        "model.name": "r",
        "model.en.normalizers": '["bn", "ln"]',
        "model.en.logit_scale": "null",
    }
    assert scalars({"step": 3, "loss": 1, "top1": 50.0, "eval": True}) == {
        "train/loss": 1.0,
        "val/top1": 50.0,
    }


def test_tensorboard_gets_the_same_numbers_as_metrics_jsonl(crops: Path, tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    finetune(
        load_recipe(
            QUICK,
            tiny_recipe(
                crops, out, "imagefolder", "train.log_with=[tensorboard]", "train.log_every=1"
            ),
        ),
        progress=False,
    )
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(out / "logs" / "run"))
    events.Reload()
    tb_loss = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert tb_loss == [(r["step"], pytest.approx(r["loss"])) for r in rows if "loss" in r]
    tb_top1 = [e.value for e in events.Scalars("val/top1")]
    assert tb_top1 == [pytest.approx(r["top1"]) for r in rows if r.get("eval")]
