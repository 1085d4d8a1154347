"""Training-mode BatchNorm of a folded Conv+BN / Linear+BN QAT module in its
one-convolution form (see :mod:`.conv`): the weight fold, and batch normalisation with a
per-channel epsilon.

``fold_weight(w, gamma, running_var, eps, min_gamma) -> (w_fold, t, W, E)`` (and
``fold_quant_weight``, the same with ``w_fold`` observed and fake-quantized)::

    t = sign(gamma) * max(|gamma|, min_gamma) / sqrt(running_var + eps)   (sign(0) = +1)
    w_fold = w * t (per output channel),  W = gamma * sign(gamma),  E = eps * t**2

``normalize_train(z, W, beta, E, t, bn, bias) -> y`` batch-normalises ``z = conv(x,
fq(w_fold))`` and updates ``bn``'s running statistics with the float layer's (``mean / t +
bias``, ``var / t**2``)::

    y = (z - mean_B(z)) / sqrt(var_B(z) + E) * W + beta

``E`` per channel: ``z``'s channels are the float convolution's scaled by ``t``, so
``eps * t**2`` there is exactly BatchNorm's ``eps`` on the float convolution.
``torch.nn.functional.batch_norm`` takes one float eps, hence :func:`normalize`. Gradients
flow to ``z``, ``W``, ``beta`` and ``E`` (and through ``fold_weight`` to ``w`` and gamma).

A Conv2d layer's whole training forward (fold + observe + fake quant, convolution,
normalisation + activation + observe + fake quant) can also be one backend op,
``conv_bn_act_train`` (:mod:`gpuquant.backends.triton.qat_layer`: one autograd node, the
same kernels), which :class:`~gpuquant.nn.qat.conv.BnFoldedModule` tries first.

Each has a definition in torch ops (here) and a fused Triton version (backend ops
``bn_fold_weight`` / ``bn_normalize_train``, :mod:`gpuquant.backends.triton.bn_fold`) used on
CUDA: the per-channel arithmetic is a few dozen PyTorch ops on vectors of C values, each a
kernel launch of its own, forward and backward; fused, a layer's fold and normalisation take
four launches forward (fold, statistics, finish, normalise) and three backward. The two agree
to float32 rounding (tests).

:func:`normalize` (the definition's normalisation) has two implementations too:

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

from ..._tensors import batch_norm_eps0
from ...backends.registry import find_op, try_op
from ...distributed import batch_mean_var, syncs_batch_stats

__all__ = ["scale_rows", "fold_weight", "fold_quant_weight", "fold_quant_weight_frozen",
           "normalize_train", "normalize_quant_train", "normalize", "normalize_composite",
           "update_bn_running_stats"]


def update_bn_running_stats(bn, mean: torch.Tensor, var: torch.Tensor, n) -> None:
    """Update ``bn``'s running statistics as ``torch.nn.BatchNorm*`` does in training
    (biased ``var`` given, the unbiased one stored; momentum None = cumulative average).

    ``n``: the count per channel, an int, or (synchronised statistics) the global count as a
    device tensor. A global batch of fewer than 2 values per channel (which a local check
    cannot see) leaves the statistics and ``num_batches_tracked`` as they were, on the
    device: its unbiased variance is 0 * inf (and its mean 0 / 0 when empty), which would
    make them NaN on every rank; torch's SyncBatchNorm raises there, at the cost of a host
    read every step."""
    with torch.no_grad():
        if isinstance(n, torch.Tensor):
            ok = n > 1
            bn.num_batches_tracked.add_(ok.to(bn.num_batches_tracked.dtype))
            mean = torch.where(ok, mean.detach().to(bn.running_mean.dtype), bn.running_mean)
            var = torch.where(ok, (var.detach() * (n / (n - 1).clamp(min=1))).to(
                bn.running_var.dtype), bn.running_var)
        else:
            bn.num_batches_tracked.add_(1)
            mean = mean.detach().to(bn.running_mean.dtype)
            var = (var.detach() * (n / (n - 1))).to(bn.running_var.dtype)
        if bn.momentum is None:  # a device tensor: no host read (CUDA-graph capturable)
            f = torch.reciprocal(bn.num_batches_tracked.clamp(min=1).to(bn.running_mean.dtype))
        else:
            f = bn.momentum
        bn.running_mean.lerp_(mean, f)
        bn.running_var.lerp_(var, f)


def scale_rows(w: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``w`` with output channel (dimension 0) ``c`` multiplied by ``t[c]``."""
    return w * t.reshape((-1,) + (1,) * (w.dim() - 1))


def fold_weight(w: torch.Tensor, gamma: torch.Tensor, running_var: torch.Tensor, eps: float,
                min_gamma: float):
    """``(w_fold, t, W, E)`` (see the module docstring); ``t`` carries no gradient."""
    out = try_op("bn_fold_weight", w, w, gamma, running_var, eps, min_gamma)
    if out is not None:  # None: a case the fused op does not take
        return out
    sigma = torch.sqrt(running_var + eps)
    # +-1 in gamma's dtype (python-scalar branches would give float32 and promote a
    # float16 / bfloat16 fold)
    sgn = torch.ones_like(gamma).masked_fill_(gamma.detach() < 0, -1.0)
    t = sgn * gamma.abs().clamp(min=min_gamma) / sigma  # gamma / sigma, away from 0
    return scale_rows(w, t), t.detach(), gamma * sgn, eps * t * t


def fold_quant_weight(w: torch.Tensor, gamma: torch.Tensor, running_var: torch.Tensor, eps: float,
                      min_gamma: float, observer, fake_quant):
    """``(fake_quant(observer(w_fold)), t, W, E)``: :func:`fold_weight`, then the weight's
    observe + fake quant of :func:`~gpuquant.quantization.fake_quant.apply_fake_quant_with_observer`
    (the definition); a backend op ``bn_fold_observe_fake_quant`` may do both at once for the
    observer / fake-quant pairs it takes."""
    out = try_op("bn_fold_observe_fake_quant", w, w, gamma, running_var, eps, min_gamma,
                 observer, fake_quant)
    if out is not None:
        return out
    from ...quantization.fake_quant import apply_fake_quant_with_observer
    wf, t, W, E = fold_weight(w, gamma, running_var, eps, min_gamma)
    return apply_fake_quant_with_observer(wf, fake_quant, observer), t, W, E


def normalize_train(z: torch.Tensor, W: torch.Tensor, beta: torch.Tensor, E: torch.Tensor,
                    t: torch.Tensor, bn: torch.nn.Module, bias=None) -> torch.Tensor:
    """Batch-normalise ``z`` and update ``bn``'s running statistics (module docstring).

    Raises:
        ValueError: fewer than 2 values per channel.
    """
    synced = syncs_batch_stats(bn)  # (the global batch counts there, as in SyncBatchNorm)
    if z.dim() < 2 or (z.numel() // max(z.size(1), 1) < 2 and not synced):
        raise ValueError(f"expected more than 1 value per channel when training, got a "
                         f"batch-norm input of shape {tuple(z.shape)}")
    if not synced:
        y = try_op("bn_normalize_train", z, z, W, beta, E, t, bn, bias)
        if y is not None:
            return y
    y, mean, var, n = normalize(z, W, beta, E, bn)
    b = bias.detach() if bias is not None else 0.0
    update_bn_running_stats(bn, mean / t + b, var / (t * t), n)
    return y


def fold_quant_weight_frozen(module, observer, fake_quant):
    """``(fake_quant(observer(w_fold)), b_fold)`` of a BatchNorm-folded module with its
    running statistics (``module.folded_weight_bias()``, the definition) in one backend op
    (``bn_fold_frozen_observe_fake_quant``) where one takes this case; else None."""
    inner, bn = module._inner(), module.bn
    fused = find_op("bn_fold_frozen_observe_fake_quant", inner.weight)
    if fused is None:
        return None
    gamma, beta = (bn.weight, bn.bias) if bn.affine else \
        (torch.ones_like(bn.running_var), torch.zeros_like(bn.running_var))
    return fused(inner.weight, gamma, beta, inner.bias, bn.running_mean, bn.running_var,
                 bn.eps, observer, fake_quant)


def normalize_quant_train(z: torch.Tensor, W: torch.Tensor, beta: torch.Tensor, E: torch.Tensor,
                          t: torch.Tensor, bn: torch.nn.Module, bias, observer, fake_quant,
                          activation: str):
    """:func:`normalize_train`, then the output activation and its observe + fake quant
    (:func:`~gpuquant.quantization.fake_quant.apply_fake_quant_with_observer`) in one backend
    op (``bn_normalize_observe_fake_quant``) where one takes this case; else None, and the
    caller runs the two steps."""
    return try_op("bn_normalize_observe_fake_quant", z, z, W, beta, E, t, bn, bias, observer,
                  fake_quant, activation)


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
        # per-channel vectors in float32 like the statistics: batch_norm's mixed form takes a
        # float16 / bfloat16 z only with all of them float32 (no-ops for float32 parameters;
        # autograd casts the gradients back to the parameters' dtypes)
        # eval-form batch_norm with (mean, var + eps) as the running statistics and eps 0:
        # (z - mean) / sqrt(var + eps) * weight + bias in one pass, mixed dtypes allowed
        y = batch_norm_eps0(z, mean, var_eps, weight.float(), bias.float())
        ctx.save_for_backward(z, weight, bias, eps, mean, invstd)
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    def backward(ctx, gy, _gmean, _gvar):
        z, weight, bias, eps, mean, invstd = ctx.saved_tensors
        need = ctx.needs_input_grad
        if torch.is_grad_enabled():  # create_graph=True: second-order terms wanted
            return _normalize_grads_differentiable(gy, z, weight, bias, eps, need)
        need_z, need_w, need_b, need_eps = need
        weight = weight.float()
        gz, gw, gb = torch.ops.aten.native_batch_norm_backward(
            gy, z, weight, None, None, mean, invstd, True, 0.0,
            [need_z, need_w or need_eps, need_b])
        # d y / d eps = -weight * (z - mean) * invstd^3 / 2 = -weight * invstd^2 * xhat / 2,
        # and gw = sum(gy * xhat)
        geps = -0.5 * weight * invstd * invstd * gw if need_eps else None
        return gz, gw if need_w else None, gb, geps


def _normalize_grads_differentiable(gy, z, weight, bias, eps, need):
    """:class:`_Normalize`'s gradients under ``create_graph=True``, as differentiable torch
    ops of the definition: the first-order path's statistics and ``invstd`` are constants to
    autograd, which dropped the second-order terms through them, and through ``eps`` (the
    single fold's ``E = eps t^2`` carries gamma: a gradient penalty's gamma gradient was 27%
    off with eps 0.1). Equal to the first-order path to float32 rounding."""
    inputs = [t for t, n in zip((z, weight, bias, eps), need) if n]
    if not inputs:
        return None, None, None, None
    with torch.enable_grad():
        zf = z.float()
        var, mean = torch.var_mean(zf, dim=_dims(z), correction=0)
        sh = _channel_shape(z)
        scale = weight.float() * torch.rsqrt(var + eps.float())
        y = ((zf - mean.reshape(sh)) * scale.reshape(sh) + bias.float().reshape(sh)).to(z.dtype)
    got = iter(torch.autograd.grad(y, inputs, gy, create_graph=True, allow_unused=True))
    return tuple(next(got) if n else None for n in need)


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
        weight, bias, eps: (C,) tensors (``eps`` > 0), float32 or the parameters' float16 /
            bfloat16.
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
