"""Argument checks shared by the model builders."""
from __future__ import annotations

import math
import numbers

from .._checks import positive_int  # noqa: F401 -- the builders' import


def positive_float(value, name: str, who: str) -> float:
    """``value`` as a finite float > 0: TypeError for a non-number, ValueError otherwise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{who}: {name} must be a positive number, got "
                        f"{type(value).__name__} {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{who}: {name} must be a finite number > 0, got {value!r}")
    return float(value)


def probability(value, name: str, who: str) -> float:
    """``value`` as a float in [0, 1] (bools refused: True would drop everything)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{who}: {name} must be a number in [0, 1], got "
                        f"{type(value).__name__} {value!r}")
    if not 0.0 <= value <= 1.0:  # (NaN fails too)
        raise ValueError(f"{who}: {name} must be in [0, 1], got {value!r}")
    return float(value)
