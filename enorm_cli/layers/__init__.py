"""EN and SN layers, their norm+act variants, the registry, and the statistics they share."""

from .base import MixedNorm2d
from .exemplar_norm import ACTIVATIONS, ExemplarNorm2d, RatioBranch, check_activation
from .norm_act import ExemplarNormAct2d, SwitchableNormAct2d
from .registry import NORM_LAYERS, check_norm_layer, get_norm_layer
from .runtime import fused_en, is_fused_en, set_fused_en
from .source import SourceNorm
from .statistics import NORMALIZERS, check_normalizers, group_count
from .switchable_norm import SwitchableNorm2d

__all__ = [
    # base.py
    "MixedNorm2d",
    # exemplar_norm.py
    "ACTIVATIONS",
    "ExemplarNorm2d",
    "RatioBranch",
    "check_activation",
    # norm_act.py
    "ExemplarNormAct2d",
    "SwitchableNormAct2d",
    # registry.py
    "NORM_LAYERS",
    "check_norm_layer",
    "get_norm_layer",
    # runtime.py
    "fused_en",
    "is_fused_en",
    "set_fused_en",
    # source.py
    "SourceNorm",
    # statistics.py
    "NORMALIZERS",
    "check_normalizers",
    "group_count",
    # switchable_norm.py
    "SwitchableNorm2d",
]
