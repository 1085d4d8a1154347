"""A training QAT Conv+BN(+ReLU / ReLU6) layer as one autograd node (Triton): op
``conv_bn_act_train``.

The layer's fused pieces (:mod:`.bn_fold`: the weight's fold + observe + fake quant;
:mod:`.bn_act`: batch statistics, normalisation, activation, observe + fake quant) are each
an autograd Function, and the convolution between them is a third autograd node. The GPU
work is theirs either way: 3 Triton launches and the convolution forward, 3 launches and the
convolution's backward. What one node saves is host time, which decides the eager QAT
step's speed (it is host-bound: issue 5, bench README NOTES): one Function instead of two
plus the convolution's node (each costs the autograd engine and Python a few microseconds
a step), one set of argument checks instead of two, no intermediate autograd outputs
(``W``, ``E``, the folded weight) and no casting nodes under autocast.

Forward: :func:`.bn_fold.fold_forward`; the convolution of ``x`` and the fake-quantized
folded weight, both cast as autocast would cast them (so under bf16 autocast ``z`` is bf16,
as in the three-node form; the weight's cast is the fold kernel's own rounded store, not a
launch); :func:`.bn_act.bn_act_forward`. Backward: :func:`.bn_act.bn_act_backward`,
``aten.convolution_backward`` (the function the convolution's autograd node calls),
:func:`.bn_fold.fold_backward` (which reads the weight gradient in the convolution's dtype:
no cast back to float32 first). The arithmetic and its
order are those of the three-node form, so outputs, state and gradients are bit-identical
to it (tests). A convolution bias (cancelled by the batch statistics) gets a zero gradient,
as the three-node form's ``beta + 0 * bias`` gives it.

Returns None (the caller runs the three-node form) for what it does not take: not a
``torch.nn.Conv2d`` with numeric padding and zero padding mode, a 4-d input, autocast off
with an input dtype other than the weight's, and everything the two fused ops refuse.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ...distributed import syncs_batch_stats
from .bn_act import _ACTS, _act_pair_ok, bn_act_backward, bn_act_forward
from .bn_fold import _rows_contiguous, _weight_pair_ok, fold_backward, fold_forward
from .common import module_tickets, once_differentiable_kernels
from .fake_quant import _FLOATS, as_rows, auto_interpreter, on_tensor_device
from .observer import mark_observed

__all__ = ["conv_bn_act_train", "conv2d_backward", "OPS"]


def conv2d_backward(gz, x, w, stride, padding, dilation, groups, need_x: bool):
    """(grad_x or None, grad_w) of ``F.conv2d(x, w, None, ...)``: what its autograd node
    computes (a module attribute: the bench's CPU stand-ins replace it, as they replace
    ``F.conv2d``)."""
    gx, gw, _ = torch.ops.aten.convolution_backward(gz, x, w, None, stride, padding, dilation,
                                                    False, (0, 0), groups,
                                                    (need_x, True, False))
    return gx, gw


class _ConvBnActTrain(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, gamma, beta, bias, bn, conv_args, dt, min_gamma, w_observer,
                act_observer, act, tick, name):
        buffers = bn._buffers  # (not Module.__getattr__: the per-step host path)
        # the folded, fake-quantized weight written in the convolution's dtype: autocast's
        # cast of it, in the fold's own pass
        wc, t, W, E, fsaved = fold_forward(w, gamma, buffers["running_var"], bn.eps,
                                           min_gamma, w_observer, out_dtype=dt)
        xc = x if x.dtype == dt else x.to(dt)  # autocast's cast (none without it)
        stride, padding, dilation, groups = conv_args
        z = F.conv2d(xc, wc, None, stride, padding, dilation, groups)
        if z.numel() // max(z.shape[1], 1) < 2:
            raise ValueError(f"{name}: expected more than 1 value per channel when training, "
                             f"got input shape {tuple(x.shape)}")
        z = as_rows(z, 1)
        b = bias.detach().float().contiguous() if bias is not None else None
        if not beta.is_contiguous():  # (kernels read the data: no detach needed)
            beta = beta.contiguous()
        y, vec = bn_act_forward(z, W, beta, E, t, b, buffers["running_mean"],
                                buffers["running_var"], buffers["num_batches_tracked"],
                                bn.momentum, act_observer, act, tick)
        ctx.save_for_backward(xc, wc, w, gamma, t, *fsaved[0], z, beta, vec, tick)
        ctx.consts = (fsaved[1], conv_args, float(act_observer.dtype.qmin),
                      float(act_observer.dtype.qmax), act, x.dtype,
                      bias.dtype if bias is not None else None)
        return y

    @staticmethod
    @once_differentiable_kernels("Conv + batch-norm layer (training)")
    def backward(ctx, gy):
        xc, wc, w, gamma, t, sigma, qs, qz, z, beta, vec, tick = ctx.saved_tensors
        (fconsts, (stride, padding, dilation, groups), qmin, qmax, act, x_dtype,
         bias_dtype) = ctx.consts
        need_x, need_w, need_g, need_b, need_bias = ctx.needs_input_grad[:5]
        gz, gW, gb, gE = bn_act_backward(gy, z, vec, beta, qmin, qmax, act, tick)
        gxc, gwc = conv2d_backward(gz, xc, wc, stride, padding, dilation, groups, need_x)
        # (gwc in the convolution's dtype: the fold's backward reads it as float32 itself)
        gw, gg = fold_backward(gwc, gW, gE, w, gamma, t, ((sigma, qs, qz), fconsts), need_w)
        if need_x and gxc.dtype != x_dtype:
            gxc = gxc.to(x_dtype)
        return ((gxc if need_x else None), gw, (gg if need_g else None),
                (gb if need_b else None),
                (torch.zeros(gb.shape, dtype=bias_dtype, device=gb.device) if need_bias
                 else None)) + (None,) * 9


def _autocast_dtype(x: torch.Tensor, w: torch.Tensor) -> Optional[torch.dtype]:
    """The dtype the convolution runs in: autocast's for this device where it is on (x and
    w floating), else x's when it is w's; None otherwise (the caller's path raises)."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype if x.dtype == w.dtype else None


@on_tensor_device
def conv_bn_act_train(x: torch.Tensor, conv, bn, w_observer, w_fake_quant, act_observer,
                      act_fake_quant, activation: str, min_gamma: float,
                      name: str = "ConvBn2d") -> Optional[torch.Tensor]:
    """The training forward of a QAT ``ConvBn2d`` / ``ConvBnRelu2d`` / ``ConvBnRelu62d`` in
    its one-convolution form (:mod:`gpuquant.nn.qat.conv`) as one autograd node:
    ``fake_quant(observer(act(normalize_train(conv(x, fq(w_fold))))))``, updating the
    BatchNorm's running statistics and both observers. None for what it does not take.

    Raises:
        ValueError: one value per channel (as the module does).
    """
    if x.device.type == "cpu" and auto_interpreter(x):
        return None
    act = _ACTS.get(activation)
    if (act is None or type(conv) is not torch.nn.Conv2d or not bn.affine
            or isinstance(conv.padding, str) or conv.padding_mode != "zeros" or x.dim() != 4
            or x.dtype not in _FLOATS):
        return None
    params, buffers = conv._parameters, bn._buffers  # what __getattr__ reads, directly
    w, gamma, beta = params["weight"], bn._parameters["weight"], bn._parameters["bias"]
    running_mean, running_var = buffers["running_mean"], buffers["running_var"]
    f32 = torch.float32
    if (w.dtype != f32 or gamma.dtype != f32 or beta.dtype != f32 or w.numel() == 0
            or running_var.dtype != f32 or running_mean.dtype != f32 or w.device != x.device
            or gamma.numel() != w.shape[0] or not _rows_contiguous(w)):
        return None
    dt = _autocast_dtype(x, w)
    if dt not in _FLOATS:
        return None
    if syncs_batch_stats(bn) or not _act_pair_ok(x, act_observer, act_fake_quant):
        return None
    if not _weight_pair_ok(w, w_observer, w_fake_quant):
        return None
    mark_observed(w_observer)  # the weight is observed first, as in the three-node form
    y = _ConvBnActTrain.apply(
        x, w, gamma, beta, params["bias"], bn,
        (conv.stride, conv.padding, conv.dilation, conv.groups), dt, float(min_gamma),
        w_observer, act_observer, act, module_tickets(bn, running_mean.device), name)
    mark_observed(act_observer)  # after: a batch the forward refuses leaves it unobserved
    return y


OPS = {"conv_bn_act_train": conv_bn_act_train}
KERNELS: dict = {}  # its kernels are bn_fold's and bn_act's
