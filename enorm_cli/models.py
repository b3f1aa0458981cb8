"""Source models: timm, torchvision or segmentation-models-pytorch by name, with pretrained or
local weights.

Names: any ``timm.list_models()`` name (optionally ``timm:`` prefixed, with a pretrained tag
such as ``resnet50.a1_in1k``), ``torchvision:NAME`` for any of torchvision's models
(classification, detection, segmentation), or ``smp:ARCH`` for segmentation-models-pytorch
(``Unet``, ``FPN``, ...; its encoder a model kwarg, ``encoder_name=tu-resnet18`` for a timm
one). Model kwargs go to the factory as timm's ``create_model(name, **kwargs)`` takes them
(``features_only=True``, ``out_indices=[2, 3]``). Offline, a pretrained download fails in one
clear line instead of minutes of retries.
"""

from __future__ import annotations

import contextlib
import difflib
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import EnormError

TORCHVISION_PREFIX = "torchvision:"
TIMM_PREFIX = "timm:"
SMP_PREFIX = "smp:"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HUB_HOSTS = {"timm": "huggingface.co", "torchvision": "download.pytorch.org"}
PREFIXES = {"torchvision": TORCHVISION_PREFIX, "smp": SMP_PREFIX, "timm": ""}


@dataclass(frozen=True)
class ModelName:
    """A parsed model name: ``namespace`` is "timm", "torchvision" or "smp"; ``kwargs`` go to
    the factory."""

    namespace: str
    arch: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def full(self) -> str:
        return f"{PREFIXES[self.namespace]}{self.arch}"

    @property
    def is_classifier(self) -> bool:
        """Whether the model maps images to class logits (``num_classes`` means its head)."""
        if self.namespace == "smp":
            return False
        if self.namespace == "timm":
            return not self.kwargs.get("features_only", False)
        import torchvision

        return self.arch in torchvision.models.list_models(module=torchvision.models)


def parse_model_name(name: str, kwargs: dict[str, Any] | None = None) -> ModelName:
    """Split ``torchvision:NAME`` / ``smp:ARCH`` / ``timm:NAME`` / ``NAME``, and check the name
    exists; ``kwargs`` (the factory's) travel with it."""
    kwargs = dict(kwargs or {})
    if name.startswith(TORCHVISION_PREFIX):
        arch = name[len(TORCHVISION_PREFIX) :]
        import torchvision

        known = torchvision.models.list_models()
        if arch not in known:
            raise EnormError(_unknown(name, arch, known, TORCHVISION_PREFIX))
        return ModelName("torchvision", arch, kwargs)
    if name.startswith(SMP_PREFIX):
        arch = name[len(SMP_PREFIX) :]
        known = _smp_archs()
        if arch not in known:
            raise EnormError(_unknown(name, arch, known, SMP_PREFIX))
        return ModelName("smp", arch, kwargs)
    arch = name[len(TIMM_PREFIX) :] if name.startswith(TIMM_PREFIX) else name
    import timm

    if not timm.is_model(arch.split(".")[0]):
        raise EnormError(_unknown(name, arch.split(".")[0], timm.list_models(), ""))
    return ModelName("timm", arch, kwargs)


def _smp_archs() -> list[str]:
    """segmentation-models-pytorch's architectures, or one line saying how to get them."""
    try:
        import segmentation_models_pytorch as smp
    except ImportError:
        raise EnormError(
            "smp: models need segmentation-models-pytorch: pip install 'enorm[dense]'"
        ) from None
    return sorted(cls.__name__ for cls in smp.MODEL_ARCHITECTURES_MAPPING.values())


def _unknown(name: str, arch: str, known: list[str], prefix: str) -> str:
    close = difflib.get_close_matches(arch, known, n=3, cutoff=0.6)
    hint = (
        f"did you mean {', '.join(prefix + c for c in close)}?"
        if close
        else "see timm.list_models() or use torchvision:NAME for torchvision models"
    )
    return f"unknown model {name!r}: {hint}"


def hub_reachable(host: str, timeout: float = 2.0) -> bool:
    """A fast reachability probe, so offline machines skip the hub's retries."""
    if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0") and host == HUB_HOSTS["timm"]:
        return False
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def _hf_offline(offline: bool) -> Iterator[None]:
    """Put huggingface_hub in offline mode (local cache only) for the duration."""
    if not offline:
        yield
        return
    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved


def _no_download(name: str) -> EnormError:
    return EnormError(
        f"pretrained weights for {name!r} are not cached and cannot be downloaded (offline?); "
        "pass --checkpoint FILE for local weights, or --no-pretrained for random init"
    )


def build_model(
    name: ModelName, pretrained: bool = False, num_classes: int | None = None
) -> nn.Module:
    """Create the architecture with ``name.kwargs``; with ``pretrained``, its default weights
    (cache, else download). ``num_classes`` sizes a classifier's head (``is_classifier``);
    other models take their classes as a kwarg of their own."""
    kwargs = dict(name.kwargs)
    if num_classes is not None and name.is_classifier:
        kwargs["num_classes"] = num_classes
    try:
        if name.namespace == "torchvision":
            return _torchvision_model(name, pretrained, kwargs)
        if name.namespace == "smp":
            import segmentation_models_pytorch as smp

            kwargs.setdefault("encoder_weights", "imagenet" if pretrained else None)
            try:
                return smp.create_model(name.arch, **kwargs)
            except (OSError, RuntimeError) as exc:
                raise _no_download(name.full) from exc
        import timm

        if not pretrained:
            return timm.create_model(name.arch, pretrained=False, **kwargs)
        offline = not hub_reachable(HUB_HOSTS["timm"])
        try:
            with _hf_offline(offline):
                return timm.create_model(name.arch, pretrained=True, **kwargs)
        except (OSError, RuntimeError, ValueError) as exc:
            raise _no_download(name.full) from exc
    except TypeError as exc:  # a kwarg the factory does not take
        raise EnormError(
            f"{name.full} does not take these model kwargs ({exc}): check --model-arg / "
            "model.kwargs against the model's factory"
        ) from None


def _torchvision_model(name: ModelName, pretrained: bool, kwargs: dict[str, Any]) -> nn.Module:
    """torchvision's ``get_model``. Without ``pretrained`` no weights at all: detection and
    segmentation builders would otherwise fetch their backbone's."""
    import torchvision

    if pretrained:
        num_classes = kwargs.pop("num_classes", None) if name.is_classifier else None
        try:
            model = torchvision.models.get_model(name.arch, weights="DEFAULT", **kwargs)
        except (OSError, RuntimeError) as exc:
            raise _no_download(name.full) from exc
        if num_classes is not None:
            set_num_classes(model, num_classes)
        return model
    if not name.is_classifier:
        import inspect

        builder = torchvision.models.get_model_builder(name.arch)
        if "weights_backbone" in inspect.signature(builder).parameters:
            kwargs.setdefault("weights_backbone", None)
    return torchvision.models.get_model(name.arch, weights=None, **kwargs)


def set_num_classes(model: nn.Module, num_classes: int) -> None:
    """Give the model a new, freshly initialized classifier with ``num_classes`` outputs."""
    if num_classes < 1:
        raise EnormError(f"--num-classes must be positive, got {num_classes}")
    if hasattr(model, "reset_classifier"):  # timm
        model.reset_classifier(num_classes)
        return
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise EnormError(f"cannot change the classifier of {type(model).__name__}: no Linear head")
    path, head = linears[-1]
    parent = model.get_submodule(path.rpartition(".")[0]) if "." in path else model
    setattr(
        parent,
        path.rpartition(".")[2],
        nn.Linear(head.in_features, num_classes, bias=head.bias is not None),
    )


def num_classes_of(model: nn.Module) -> int:
    """Output classes: timm's attribute, else the last Linear layer's width."""
    if isinstance(getattr(model, "num_classes", None), int):
        return int(model.num_classes)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise EnormError(f"cannot tell the classes of {type(model).__name__}")
    return linears[-1].out_features


def head_classes(name: ModelName, model: nn.Module) -> int:
    """What a checkpoint records as its classes: a classifier's head width, 0 for other models
    (detection, segmentation, features), whose classes are a kwarg of their factory."""
    return num_classes_of(model) if name.is_classifier else 0


def data_config(name: ModelName, model: nn.Module) -> dict[str, Any]:
    """Input size, mean and std the model expects (timm's resolve_data_config)."""
    if name.namespace == "timm":
        from timm.data import resolve_data_config

        cfg = resolve_data_config({}, model=model)
    else:
        cfg = {
            "input_size": (3, 224, 224),
            "interpolation": "bilinear",
            "mean": IMAGENET_MEAN,
            "std": IMAGENET_STD,
            "crop_pct": 0.875,
            "crop_mode": "center",
        }
    return {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors or a torch file (``weights_only=True``).

    Accepts the common wrappers (``state_dict``, ``model``, ``module.`` prefixes).
    """
    if not path.is_file():
        from .cache import assets_dir

        fix = "run `enorm fetch`" if path.parent == assets_dir() else "check the path"
        raise EnormError(f"checkpoint {str(path)!r} not found: {fix}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise EnormError(
                f"checkpoint {str(path)!r} is not a readable "
                f".safetensors file ({exc}); re-export it"
            ) from None
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise EnormError(
            f"checkpoint {str(path)!r} cannot be read as weights ({first[:160]}); "
            "pass a state dict saved with torch.save or a .safetensors file"
        ) from None
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if (
        not isinstance(obj, dict)
        or not obj
        or not all(isinstance(v, torch.Tensor) for v in obj.values())
    ):
        raise EnormError(
            f"checkpoint {str(path)!r} is not a state dict (a mapping of names to tensors); "
            "save one with torch.save(model.state_dict(), path)"
        )
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load strictly, or say how many keys and shapes don't fit and name a few."""
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    mismatched = [
        f"{k} ({'x'.join(map(str, state[k].shape))} vs {'x'.join(map(str, own[k].shape))})"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    problems = []
    for label, keys in (
        ("missing", missing),
        ("unexpected", unexpected),
        ("wrong shape", mismatched),
    ):
        if keys:
            problems.append(
                f"{len(keys)} {label}: {', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''}"
            )
    if problems:
        raise EnormError(
            f"checkpoint {source} does not fit {type(model).__name__}: {'; '.join(problems)}; "
            "check that MODEL is the checkpoint's architecture (and --num-classes its head)"
        )
    model.load_state_dict(state, strict=False)


def create_source_model(
    name: str,
    pretrained: bool = False,
    checkpoint: Path | None = None,
    num_classes: int | None = None,
    model_kwargs: dict[str, Any] | None = None,
) -> tuple[ModelName, nn.Module]:
    """The model a user names, with its weights, in eval mode.

    With a checkpoint, the architecture is built at its default width, the
    checkpoint loaded strictly, then the head replaced if ``num_classes`` differs.
    """
    parsed = parse_model_name(name, model_kwargs)
    if num_classes is not None and num_classes < 1:
        raise EnormError(f"--num-classes must be positive, got {num_classes}")
    if num_classes is not None and not parsed.is_classifier:
        raise EnormError(
            f"--num-classes sizes a classifier's head, and {name} is not a classifier: give its "
            "own kwarg instead (--model-arg num_classes=N, or classes=N for smp)"
        )
    if checkpoint is not None:
        state = read_state_dict(Path(checkpoint))
        source = repr(str(checkpoint))
        model = build_model(parsed, pretrained=False)
        if num_classes is not None and num_classes != num_classes_of(model):
            try:  # a checkpoint whose head already has num_classes outputs
                narrow = build_model(parsed, pretrained=False, num_classes=num_classes)
                load_weights(narrow, state, source)
                return parsed, narrow.eval()
            except EnormError:
                pass
        load_weights(model, state, source)
        if num_classes is not None and num_classes != num_classes_of(model):
            set_num_classes(model, num_classes)
    else:
        model = build_model(parsed, pretrained=pretrained, num_classes=num_classes)
    return parsed, model.eval()
