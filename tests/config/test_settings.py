"""ENSettings: the one settings type, its one validator per field, and its JSON form."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from enorm_cli.config.settings import ENSettings, validation_line
from enorm_cli.layers import ExemplarNorm2d, check_activation, check_normalizers


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"normalizers": ("bn", "xn")}, "normalizers"),
        ({"normalizers": ()}, "normalizers"),
        ({"normalizers": ("bn", "bn")}, "normalizers"),
        ({"reduction": 0}, "reduction"),
        ({"pi": -1}, "pi"),
        ({"margin": float("inf")}, "margin"),
        ({"activation": "gelu"}, "activation"),
        ({"layer": "gn"}, "layer"),
        ({"include": "("}, "include"),
        ({"logit_scale": 0.0}, "logit_scale"),
        ({"logit_scale": float("nan")}, "logit_scale"),
        ({"use_kernel": True}, "use_kernel"),
    ],
)
def test_bad_settings_name_their_field_not_a_flag(kwargs: dict, field: str) -> None:
    with pytest.raises(ValidationError) as info:
        ENSettings(**kwargs)
    line = validation_line(info.value, str)
    assert line.startswith(f"{field}:") and "--" not in line


@pytest.mark.parametrize(
    ("check", "bad"), [(check_normalizers, ("bn", "xn")), (check_activation, "gelu")]
)
def test_settings_refuse_what_the_layer_refuses_with_the_same_words(check, bad) -> None:
    """One validator: the field's check is the layer's own."""
    with pytest.raises(ValueError) as by_layer:
        check(bad)
    field = "normalizers" if check is check_normalizers else "activation"
    with pytest.raises(ValidationError) as by_settings:
        ENSettings(**{field: bad})
    assert str(by_layer.value) in validation_line(by_settings.value, str)
    with pytest.raises(ValueError, match=str(by_layer.value).split("(")[0].split(";")[0]):
        ExemplarNorm2d(8, **{field: bad})


def test_settings_json_round_trip() -> None:
    settings = ENSettings(normalizers=("bn", "gn"), include="layer", margin=0.5)
    assert ENSettings.from_json(settings.to_json()) == settings
    scaled = ENSettings(logit_scale=0.25)
    assert ENSettings.from_json(scaled.to_json()) == scaled
    assert ENSettings.from_json(ENSettings().to_json()).logit_scale is None  # 1 / sqrt(pi K)
    assert ENSettings.from_json({**settings.to_json(), "from_a_newer_enorm": 1}) == settings


def test_lists_become_tuples_and_settings_are_frozen() -> None:
    settings = ENSettings.model_validate({"normalizers": ["bn", "ln"]})
    assert settings.normalizers == ("bn", "ln")
    with pytest.raises(ValidationError):
        settings.pi = 3  # type: ignore[misc]


def test_exact_selects_and_layer_options() -> None:
    assert (
        ENSettings().exact
        and not ENSettings(layer="sn").exact
        and ENSettings(shared_affine=True, anchored=True).exact  # the anchor: one pair, exact
        and not ENSettings(shared_affine=True).exact  # auto anchors only untrained sources
    )
    settings = ENSettings(include=r"^layer1\.", exclude="downsample", pi=7)
    assert settings.selects("layer1.0.bn1") and not settings.selects("layer1.0.downsample.1")
    assert not settings.selects("layer2.0.bn1")
    assert settings.layer_options(("pi", "reduction")) == {"pi": 7, "reduction": 16}


def test_anchored_takes_the_layers_check_in_one_line() -> None:
    assert ENSettings(anchored="TRUE").anchored is True  # as a flag or a quoted YAML value
    assert ENSettings(anchored="false").anchored is False
    assert ENSettings(anchored="auto").anchored == "auto"
    with pytest.raises(ValidationError) as info:
        ENSettings(anchored="maybe")
    line = validation_line(info.value, lambda loc: loc)
    assert line == "anchored: anchored must be true, false or auto, got 'maybe'"
