"""Float nearest-neighbour ``Upsample`` (``torch.nn.Upsample`` in the nearest modes, as a
gpuquant module); its int8 form copies the input's codes and keeps its qparams."""
from __future__ import annotations

import torch

from .module import Module

__all__ = ["Upsample"]


class Upsample(Module, torch.nn.Upsample):
    """``torch.nn.Upsample`` in the nearest-neighbour modes (``"nearest"``,
    ``"nearest-exact"``) on 4-D ``(N, C, H, W)`` inputs (quantized: the input's codes copied,
    same qparams). Interpolating modes (bilinear, ...) have no int8 form here: use
    ``torch.nn.Upsample`` (it stays float).

    Raises:
        ValueError: another mode, ``align_corners`` set, both or neither of ``size`` and
            ``scale_factor``, or sizes / factors that are not positive.
        TypeError: arguments of the wrong type.
    """

    def __init__(self, size=None, scale_factor=None, mode: str = "nearest",
                 align_corners=None, recompute_scale_factor=None):
        from ..functional.integer import check_nearest
        if align_corners is not None:
            raise ValueError(f"{type(self).__name__}: align_corners applies to interpolating "
                             f"modes only (torch.nn.Upsample keeps those float), got "
                             f"{align_corners!r}")
        check_nearest(type(self).__name__, size, scale_factor, mode, recompute_scale_factor)
        super().__init__(size, scale_factor, mode, None, recompute_scale_factor)
