"""EN and SN layers, and the statistics code they share."""

from .exemplar_norm import ExemplarNorm2d, RatioBranch, fused_en, is_fused_en, set_fused_en
from .statistics import NORMALIZERS, check_normalizers, group_count
from .switchable_norm import SwitchableNorm2d

__all__ = [
    # exemplar_norm.py
    "ExemplarNorm2d",
    "RatioBranch",
    "fused_en",
    "is_fused_en",
    "set_fused_en",
    # switchable_norm.py
    "SwitchableNorm2d",
    # statistics.py
    "NORMALIZERS",
    "check_normalizers",
    "group_count",
]
