"""Argument checks shared by the model builders."""
from __future__ import annotations

import math
import numbers


def positive_int(value, name: str, who: str, minimum: int = 1) -> int:
    """``value`` as an int >= ``minimum``: TypeError for a non-int (bool included),
    ValueError for a smaller one."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{who}: {name} must be an int >= {minimum}, got "
                        f"{type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{who}: {name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def positive_float(value, name: str, who: str) -> float:
    """``value`` as a finite float > 0: TypeError for a non-number, ValueError otherwise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{who}: {name} must be a positive number, got "
                        f"{type(value).__name__} {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{who}: {name} must be a finite number > 0, got {value!r}")
    return float(value)
