"""How converted layers are built: the one settings type (``enorm convert``'s flags, a
recipe's ``model.en``, a checkpoint's ``en_settings``), validated once.

Each field's check is the layer's own (``layers.check_normalizers``, ``check_activation``,
``check_norm_layer``), so a name the layers refuse is refused here, with the field's name.
Errors are pydantic's ``ValidationError`` (a ``ValueError``); the CLI and the recipe loader
turn them into one line that names their flag or key (``validation_line``).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from ..layers import ExemplarNorm2d, check_activation, check_norm_layer, check_normalizers
from ..layers.exemplar_norm import check_anchored


def _check_regex(pattern: str | None) -> str | None:
    if pattern is not None:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"{pattern!r} is not a valid regular expression ({exc})") from None
    return pattern


Regex = Annotated[str | None, AfterValidator(_check_regex)]


def _check_anchored(value: Any) -> Any:
    """The layer's check (``check_anchored``); the strings "true" and "false" (a CLI flag, a
    quoted YAML value) read as bools."""
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        value = value.strip().lower() == "true"
    return check_anchored(value)


class ENSettings(BaseModel):
    """EN (or SN) layer settings; stored in checkpoints to rebuild the model."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)

    normalizers: Annotated[tuple[str, ...], AfterValidator(check_normalizers)] = ("bn", "in", "ln")
    """The K normalizers, in order (a GroupNorm source adds its own when missing)."""
    reduction: int = Field(16, ge=1)
    """The ratio branch's conv reduction r (C / r groups)."""
    pi: int = Field(50, ge=1)
    """The ratio branch's hidden width factor (pi K units)."""
    margin: float = Field(2.0, allow_inf_nan=False)
    """Prior logit of the source normalizer: lambda_src = e^m / (e^m + K - 1)."""
    activation: Annotated[str, AfterValidator(check_activation)] = "tanh"
    """The ratio branch's hidden activation ("tanh", as the paper; "relu")."""
    use_conv: bool = True
    """The ratio branch's grouped conv over the pre-normalized features (the paper's; off: the
    ablation without it)."""
    include: Regex = None
    """Convert only modules whose name matches (``re.search``)."""
    exclude: Regex = None
    """Leave modules whose name matches."""
    layer: Annotated[str, AfterValidator(check_norm_layer)] = "en"
    """"en" (Exemplar Normalization) or "sn" (Switchable, the baseline): ``layers.registry``."""
    shared_affine: bool = False
    """One affine pair for all normalizers (the paper's ablation; starts near, not at, the
    source)."""
    logit_scale: float | None = Field(None, gt=0, allow_inf_nan=False)
    """EN's FC2 scale s (logits = b + s W h); None: 1 / sqrt(pi K) (``default_logit_scale``)."""
    centered: bool = True
    """EN's FC2 reads the hidden units minus their running mean (logits = b + s W (h - c)): b
    sets the mean mixture, W how samples differ from it, at its own lr
    (``optim.sample_lr_scale``). Off: the paper's branch."""
    anchored: Annotated[bool | Literal["auto"], BeforeValidator(_check_anchored)] = "auto"
    """How EN starts from its source. true: every normalizer's gamma is the source's, and the
    mixing weights are the ratios plus a fixed offset (the source normalizer's one-hot minus
    the prior) that makes them one-hot on the source: exact, and every normalizer carries the
    feature its ratio would choose. false: the paper-style exact start, the other normalizers'
    gammas 0, which keeps a trained source's features in place. auto: true where the source is
    untrained (training from scratch), false where it was trained (fine-tuning)."""

    @property
    def exact(self) -> bool:
        """Whether converted layers start as exactly their source: EN, anchored or with
        per-normalizer affines.

        SN's static ratios mix the normalizers' statistics, and without the anchor one shared
        affine set scales every normalizer alike: both start near, not at, the source function
        ("auto" counts as without: it anchors only untrained sources).
        """
        return self.layer == "en" and (self.anchored is True or not self.shared_affine)

    def layer_options(self, options: tuple[str, ...]) -> dict[str, Any]:
        """The fields a layer class takes (its ``options``), as constructor arguments."""
        return {name: getattr(self, name) for name in options}

    def selects(self, name: str) -> bool:
        """Whether include/exclude let the module with this name be converted."""
        if self.include is not None and not re.search(self.include, name):
            return False
        return self.exclude is None or not re.search(self.exclude, name)

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ENSettings:
        """Settings as a checkpoint stores them (``checkpoint.migrate`` brought them up to date);
        keys this version does not know are ignored."""
        return cls.model_validate({k: v for k, v in data.items() if k in cls.model_fields})


TUNED_FIELDS = ("normalizers", "margin", "include", "exclude")
"""What a fine-tuning recipe tunes (``model.en``)."""

ABLATION_FIELDS: tuple[str, ...] = ExemplarNorm2d.options
"""The paper's ablation switches and enorm's branch settings (logit scale, centering): EN's
constructor options, the architecture, grouped apart in a recipe (``model.en.ablation``)."""


def fields_of(names: tuple[str, ...]) -> dict[str, Any]:
    """``ENSettings``' own definitions of these fields (type, checks, default, docstring), for
    ``pydantic.create_model``: the recipe's groups reuse them rather than restate them."""
    return {
        name: (ENSettings.model_fields[name].annotation, ENSettings.model_fields[name])
        for name in names
    }


def validation_line(exc: ValidationError, name: Callable[[str], str]) -> str:
    """Every problem of a ValidationError in one line, each under ``name(field path)``."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key (remove it or check its spelling)"
        elif "input" in err and not isinstance(err["input"], dict) and "got " not in msg:
            msg += f" (got {err['input']!r})"  # unless the check already named it
        parts.append(f"{name(loc)}: {msg}")
    return "; ".join(parts)
