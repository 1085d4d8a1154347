"""Integer ops of the quantized modules: input validation, then dispatch to a backend.

``check_accumulator_range`` (top of the file) is shared by every backend's front-end: the
contract accumulates ``sum((x - zp_x) * w) + bias`` exactly in int32, so shapes whose worst
case could leave the int32 range are refused before any backend runs.
"""
from __future__ import annotations

import torch

__all__ = ["check_accumulator_range"]

_INT32_LIMIT = 2 ** 31
_RANGE_OF = {torch.int8: (-128, 127), torch.uint8: (0, 255)}


def _abs_max(v, what: str, op: str) -> int:
    if isinstance(v, torch.Tensor):
        if v.dtype.is_floating_point or v.dtype.is_complex or v.dtype == torch.bool:
            raise TypeError(f"{op}: {what} must be an integer tensor, got {v.dtype}")
        return int(v.abs().max().item()) if v.numel() else 0
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{op}: {what} must be an int or an integer tensor, got "
                        f"{type(v).__name__} ({v!r})")
    return abs(v)


def check_accumulator_range(k, x_range, x_zero_point, w_absmax=128, bias_absmax=0,
                            op: str = "op") -> int:
    """Refuse shapes whose int32 accumulator could overflow.

    The worst case of ``sum_{i<k} (x_i - zp_x) * w_i + bias`` is
    ``k * max|x - zp_x| * max|w| + max|bias|``, with ``max|x - zp_x|`` taken over the whole
    input range (so the check depends on shapes and parameters, never on the data).

    Args:
        k: number of products summed into one output (``C_in / groups * kh * kw`` for a
            convolution, ``in_features`` for a linear).
        x_range: the input's integer range: ``torch.int8`` / ``torch.uint8``, a
            ``gpuquant.QuantDtype``, or a ``(qmin, qmax)`` pair.
        x_zero_point: the input's zero point (int or 0-d integer tensor).
        w_absmax: largest ``|w|``: an int (default 128, any int8 weight) or the weight
            tensor itself (its absolute maximum is used).
        bias_absmax: largest ``|bias|``: an int, or the int32 bias tensor (None counts 0).
        op: the op's name, used in error messages.

    Returns:
        The worst-case accumulator magnitude (an int below 2^31).

    Raises:
        TypeError: an argument of the wrong type.
        ValueError: ``k`` < 1, or the worst case reaches 2^31 (the message gives the bound
            and the largest ``k`` that would fit).

    Example:
        >>> check_accumulator_range(3 * 3 * 64, torch.uint8, 128, 127)   # -> 9_363_456
    """
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"{op}: k (the reduction length) must be an int, got {type(k).__name__}")
    if k < 1:
        raise ValueError(f"{op}: k (the reduction length) must be >= 1, got {k}")
    if isinstance(x_range, torch.dtype):
        if x_range not in _RANGE_OF:
            raise TypeError(f"{op}: input dtype must be torch.int8 or torch.uint8, got {x_range}")
        lo, hi = _RANGE_OF[x_range]
    elif hasattr(x_range, "qmin") and hasattr(x_range, "qmax"):
        lo, hi = int(x_range.qmin), int(x_range.qmax)
    else:
        try:
            lo, hi = (int(v) for v in x_range)
        except (TypeError, ValueError):
            raise TypeError(f"{op}: x_range must be a torch dtype, a QuantDtype or a (qmin, qmax) "
                            f"pair, got {x_range!r}") from None
    zp = int(x_zero_point.item()) if isinstance(x_zero_point, torch.Tensor) else x_zero_point
    if isinstance(zp, bool) or not isinstance(zp, int):
        raise TypeError(f"{op}: x_zero_point must be an int, got {type(zp).__name__}")
    x_max = max(abs(lo - zp), abs(hi - zp))
    w_max = _abs_max(w_absmax, "w", op)
    b_max = 0 if bias_absmax is None else _abs_max(bias_absmax, "bias", op)
    worst = k * x_max * w_max + b_max
    if worst >= _INT32_LIMIT:
        per_k = x_max * w_max
        k_fit = (_INT32_LIMIT - 1 - b_max) // per_k if per_k else k
        raise ValueError(
            f"{op}: the int32 accumulator could overflow: k={k} products of |x - zp| <= {x_max} "
            f"and |w| <= {w_max}, plus |bias| <= {b_max}, reach {worst} >= 2^31; at most "
            f"k={k_fit} fits (split the reduction, or narrow the input / weight range)")
    return worst
