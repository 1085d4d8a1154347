"""Argument checks shared across the package (flags and counts): one wording for each."""
from __future__ import annotations

import numbers

__all__ = ["check_bool", "positive_int", "int_pair", "unit_interval"]


def check_bool(value, fn: str, arg: str) -> None:
    """Refuse a flag that is not a bool (``"no"`` would read as True)."""
    if not isinstance(value, bool):
        raise TypeError(f"{fn}: {arg} must be a bool (True or False), got {value!r}")


def positive_int(value, name: str, who: str, minimum: int = 1) -> int:
    """``value`` as an int >= ``minimum``: TypeError for a non-int (bool included; NumPy
    integers are ints), ValueError for a smaller one."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{who}: {name} must be an int >= {minimum}, got "
                        f"{type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{who}: {name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def int_pair(value, name: str, who: str, minimum: int = 1) -> tuple:
    """An int or a pair (tuple / list of two) of ints >= ``minimum`` as a pair: TypeError
    for another kind, ValueError for another length or a smaller value (a layer's
    kernel size, stride, padding, dilation)."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{who}: {name} must be an int or a pair of ints, got {value!r}")
        return tuple(positive_int(v, name, who, minimum) for v in value)
    v = positive_int(value, name, who, minimum)
    return (v, v)


def unit_interval(value, name: str, who: str) -> float:
    """``value`` as a float in [0, 1]: TypeError for a non-number (bool included; NumPy
    scalars are numbers), ValueError outside [0, 1] or NaN."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{who}: {name} must be a real number in [0, 1], got "
                        f"{type(value).__name__} {value!r}")
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{who}: {name} must be in [0, 1], got {value!r}")
    return float(value)
