"""Argument checks shared across the package (flags and counts): one wording for each."""
from __future__ import annotations

import numbers

__all__ = ["check_bool", "positive_int"]


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
