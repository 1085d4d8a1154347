"""Integer nearest-neighbour ``Upsample``: the input's codes copied (the output keeps its
qparams), the source indices held per input size."""
from __future__ import annotations

from ...functional import integer
from .pooling import _Pool

__all__ = ["Upsample"]


class Upsample(_Pool):
    """Integer ``Upsample`` (nearest modes): the input's codes copied, as
    ``torch.nn.functional.interpolate`` picks them for a float tensor."""

    _ARGS = ("size", "scale_factor", "mode", "recompute_scale_factor")

    def __init__(self, input_dtype="qint8", size=None, scale_factor=None, mode="nearest",
                 recompute_scale_factor=None):
        from ...functional.integer import check_nearest
        check_nearest(type(self).__name__, size, scale_factor, mode, recompute_scale_factor)
        super().__init__(input_dtype, size=size, scale_factor=scale_factor, mode=mode,
                         recompute_scale_factor=recompute_scale_factor)

    def forward(self, x):
        self._check_input(x)
        if x.dim() != 4:
            return integer.upsample_nearest2d(x, self.size, self.scale_factor, self.mode,
                                              self.recompute_scale_factor)  # (refuses it)
        hw = (int(x.shape[2]), int(x.shape[3]))
        return integer.gather_nearest(x, self._cached(("indices", hw), x.device, lambda: (
            integer.nearest_indices(type(self).__name__, x, self.size, self.scale_factor,
                                    self.mode, self.recompute_scale_factor))))
