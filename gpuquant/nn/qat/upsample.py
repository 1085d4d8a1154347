"""QAT nearest-neighbour ``Upsample``: copies of the input's values, on its grid, with its
qparams (a pass of qparams, as max pooling: :class:`~.pooling._PassQParams`)."""
from __future__ import annotations

import torch

from .. import upsample as Float
from .pooling import _PassQParams

__all__ = ["Upsample"]


class Upsample(_PassQParams, Float.Upsample):
    """QAT ``Upsample`` (nearest modes): copies of the input's values, on its grid, with its
    qparams. The pixels are the int8 op's on every device (the tables of
    :func:`gpuquant.functional.integer.nearest_indices`, held per input size), not those of
    torch's ``interpolate``, whose CPU kernel departs from its own formula at rare factors
    (1.0001, 2.0168: docs/NUMERICS.md): QAT computes what the int8 model serves."""

    def _check_input(self, x) -> None:
        """Refuse what the integer op refuses (shapes only: no device sync).

        Raises:
            TypeError: not a tensor. ValueError: not 4-D, or an output size below 1.
        """
        from ...functional.integer import upsample_output_size
        super()._check_input(x)
        if x.dim() != 4:  # (torch reads a 3-D input as (N, C, L): a 1-D resize)
            raise ValueError(f"{type(self).__name__}: x must be 4-D (N, C, H, W), got shape "
                             f"{tuple(x.shape)}")
        upsample_output_size(type(self).__name__, x.shape[2:], self.size, self.scale_factor)

    def _pool(self, x):
        from ...functional.integer import nearest_indices
        tables = self.__dict__.setdefault("_nearest_tables", {})
        key = (int(x.shape[2]), int(x.shape[3]), x.device)
        if key not in tables:  # (held here: the functional op's cache may drop them)
            if len(tables) >= 64:
                tables.clear()
            tables[key] = nearest_indices(type(self).__name__, x, self.size,
                                          self.scale_factor, self.mode,
                                          self.recompute_scale_factor)
        ih, iw = tables[key]
        y = x[:, :, ih[:, None], iw[None, :]]  # one gather; its backward sums the copies
        return y.contiguous(memory_format=torch.channels_last) \
            if x.is_contiguous(memory_format=torch.channels_last) and \
            not x.is_contiguous() else y
