"""EN and SN layers, and the statistics code they share."""

from .exemplar_norm import ExemplarNorm2d, RatioBranch
from .statistics import NORMALIZERS, check_normalizers, group_count
from .switchable_norm import SwitchableNorm2d

__all__ = [
    # exemplar_norm.py
    "ExemplarNorm2d",
    "RatioBranch",
    # switchable_norm.py
    "SwitchableNorm2d",
    # statistics.py
    "NORMALIZERS",
    "check_normalizers",
    "group_count",
]
