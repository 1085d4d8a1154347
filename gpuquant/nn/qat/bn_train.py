"""Training-mode batch normalisation with a per-channel epsilon: the BatchNorm of a folded
Conv+BN / Linear+BN QAT module in its one-convolution form (see :mod:`.conv`).

``normalize(z, weight, bias, eps, bn)`` returns ``(y, mean, var, n)`` with, per channel
(dimension 1) over every other dimension::

    mean, var = batch mean and biased variance of z          (float32)
    y = (z - mean) / sqrt(var + eps) * weight + bias         (z's dtype)

``eps`` is a (C,) tensor: the folded module normalises ``z = conv(x, w * t)`` whose channels
are the float convolution's scaled by ``t``, so ``eps * t**2`` there is exactly BatchNorm's
``eps`` on the float convolution. ``torch.nn.functional.batch_norm`` takes one float eps,
hence this function. Gradients flow to ``z``, ``weight``, ``bias`` and ``eps``.

Two implementations of the one definition:

* local batch (one process, or no synchronised BatchNorm): a custom autograd function, one
  statistics pass (``torch.batch_norm_stats`` on CUDA, ``var_mean`` elsewhere), one
  normalising pass (``batch_norm`` in eval form with ``var + eps`` as the running variance and
  eps 0), and PyTorch's fused ``native_batch_norm_backward`` given our own inverse deviation
  (its training-mode formula holds for any eps): three passes over the activation where the
  same formula written with torch ops costs about eight, forward and backward;
* global batch (a ``SyncBatchNorm`` / :func:`gpuquant.distributed.convert_sync_batchnorm`
  under torch.distributed): the same formula with torch ops over the all-reduced statistics
  of :func:`gpuquant.distributed.batch_mean_var`, so autograd all-reduces the gradients.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ...distributed import batch_mean_var, syncs_batch_stats

__all__ = ["normalize", "normalize_composite"]


def _channel_shape(z: torch.Tensor):
    return (1, -1) + (1,) * (z.dim() - 2)


def _dims(z: torch.Tensor):
    return (0,) + tuple(range(2, z.dim()))


def _local_stats(z: torch.Tensor):
    """(mean, biased var) per channel, float32, in one pass over ``z``."""
    if z.is_cuda:
        # Welford in float32 for any input dtype and layout (SyncBatchNorm's kernel); with
        # eps 0 it returns 1 / sqrt(var), and 0 where var is 0
        mean, invstd0 = torch.batch_norm_stats(z, 0.0)
        var = torch.where(invstd0 > 0, torch.reciprocal(invstd0 * invstd0),
                          torch.zeros_like(invstd0))
        return mean, var
    var, mean = torch.var_mean(z.float(), dim=_dims(z), correction=0)
    return mean, var


class _Normalize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, weight, bias, eps):
        mean, var = _local_stats(z)
        var_eps = var + eps
        invstd = torch.rsqrt(var_eps)
        # eval-form batch_norm with (mean, var + eps) as the running statistics and eps 0:
        # (z - mean) / sqrt(var + eps) * weight + bias in one pass, mixed dtypes allowed
        y = F.batch_norm(z, mean, var_eps, weight, bias, False, 0.0, 0.0)
        ctx.save_for_backward(z, weight, mean, invstd)
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    def backward(ctx, gy, _gmean, _gvar):
        z, weight, mean, invstd = ctx.saved_tensors
        need_z, need_w, need_b, need_eps = ctx.needs_input_grad
        gz, gw, gb = torch.ops.aten.native_batch_norm_backward(
            gy, z, weight, None, None, mean, invstd, True, 0.0,
            [need_z, need_w or need_eps, need_b])
        # d y / d eps = -weight * (z - mean) * invstd^3 / 2 = -weight * invstd^2 * xhat / 2,
        # and gw = sum(gy * xhat)
        geps = -0.5 * weight * invstd * invstd * gw if need_eps else None
        return gz, gw if need_w else None, gb, geps


def normalize_composite(z, weight, bias, eps, bn):
    """The definition with torch ops over :func:`batch_mean_var` (the global batch's
    statistics when ``bn`` is synchronised); returns ``(y, mean, var, n)``."""
    zf = z.float()
    mean, var, n = batch_mean_var(zf, _dims(z), bn)
    sh = _channel_shape(z)
    scale = weight * torch.rsqrt(var + eps)
    y = (zf - mean.reshape(sh)) * scale.reshape(sh) + bias.reshape(sh)
    return y.to(z.dtype), mean.detach(), var.detach(), n


def normalize(z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: torch.Tensor,
              bn: torch.nn.Module):
    """Batch-normalise ``z`` (channels in dimension 1) with per-channel ``eps``.

    Args:
        z: the folded convolution / linear output, float16 / bfloat16 / float32.
        weight, bias, eps: (C,) float32 tensors (``eps`` > 0).
        bn: the module's BatchNorm: decides local or global (synchronised) statistics.

    Returns:
        ``(y, mean, var, n)``: ``y`` in ``z``'s dtype; the batch ``mean`` and biased ``var``
        (float32, no gradient) and the count per channel (int, or a 0-d tensor when
        synchronised) for the running statistics.
    """
    if z.dim() < 2:
        raise ValueError(f"normalize: expected (N, C, ...) input, got shape {tuple(z.shape)}")
    if syncs_batch_stats(bn):
        return normalize_composite(z, weight, bias, eps, bn)
    n = z.numel() // z.size(1)
    y, mean, var = _Normalize.apply(z, weight, bias, eps)
    return y, mean, var, n
