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

Layer plans (:class:`_LayerPlan`): a layer's step costs the host ~3x the float layer's in
Python between the module call and the launchers (checks, argument lists, launch keys,
allocations), which makes the eager QAT step host-bound. So the first step with a new
:func:`_signature` (the input's shape, strides, dtype and device, the autocast dtype, the
modules' settings and flags, the addresses of the parameters, buffers, observer states
and tickets) runs the checks and the generic path while :func:`.launch.recording` records
its launches, and later steps with that signature replay them: each launcher called with
the recorded argument list, the addresses of the step's new tensors (the folded weight,
one float32 buffer for the fold's vectors and the statistics vector, the convolution's
output, the partial sums, the output; in the backward, every tensor read from the saved
ones) put in at their recorded offsets. A recorded pointer that is neither one of those
nor pinned by the signature makes the step not replayable (the generic path runs, without
recording again). The GPU work is the same, launch for launch (checked on the stand-in
driver against both the generic path and Triton's own launch path, after each kind of
change the signature must see). Off under the interpreter, with
``GPUQUANT_TRITON_FAST_LAUNCH=0``, with launch hooks set, or with ``launch.REPLAYS = False``.

Returns None (the caller runs the three-node form) for what it does not take: not a
``torch.nn.Conv2d`` with numeric padding and zero padding mode, a 4-d input, autocast off
with an input dtype other than the weight's, and everything the two fused ops refuse.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ...distributed import syncs_batch_stats
from . import launch as _launch
from .bn_act import (_ACTS, _act_pair_ok, bn_act_backward, bn_act_forward, part_numel,
                     vec_numel)
from .bn_fold import (FOLD_VECTORS, _dense_grad, _rows_contiguous, _weight_pair_ok,
                      fold_backward, fold_forward, fold_vectors, pad16)
from .common import module_tickets, once_differentiable_kernels
from .fake_quant import _FLOATS, as_rows, auto_interpreter, on_tensor_device
from .launch import recording
from .observer import _plain_reduce, mark_observed, observer_signature

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
                act_observer, act, tick, name, plan):
        C = w.shape[0]
        dev = x.device
        buf = torch.empty(FOLD_VECTORS * pad16(C) + vec_numel(C), dtype=torch.float32,
                          device=dev)  # the fold's vectors, then the statistics vector
        wf = torch.empty_like(w, dtype=dt)  # the folded weight in the convolution's dtype
        xc = x if x.dtype == dt else x.to(dt)  # autocast's cast (none without it)
        stride, padding, dilation, groups = conv_args
        if plan is not None and plan.fwd:  # replay (plan.fwd None: record this step)
            stream = _launch.current_stream()
            b = (buf.data_ptr(), wf.data_ptr())
            if (b[0] | b[1]) & 15:
                _misaligned(name)
            plan.fwd[0](stream, b)
            z = F.conv2d(xc, wf, None, stride, padding, dilation, groups)
            if plan.rows_copy:
                z = z.contiguous()
            part = torch.empty(plan.part, dtype=torch.float32, device=dev)
            y = torch.empty_like(z)
            b += (z.data_ptr(), part.data_ptr(), y.data_ptr())
            if (b[2] | b[3] | b[4]) & 15:
                _misaligned(name)
            plan.fwd[1](stream, b)
            plan.fwd[2](stream, b)
        else:
            with recording(plan is not None) as rec:
                buffers = bn._buffers  # (not Module.__getattr__: the per-step host path)
                t, W, E = fold_forward(w, gamma, buffers["running_var"], bn.eps, min_gamma,
                                       w_observer, out_dtype=dt, out=(wf, buf))[1:4]
                z = F.conv2d(xc, wf, None, stride, padding, dilation, groups)
                if z.numel() // max(z.shape[1], 1) < 2:
                    raise ValueError(f"{name}: expected more than 1 value per channel when "
                                     f"training, got input shape {tuple(x.shape)}")
                zr = as_rows(z, 1)
                b_ = bias.detach().float().contiguous() if bias is not None else None
                if not beta.is_contiguous():  # (kernels read the data: no detach needed)
                    beta = beta.contiguous()
                part = torch.empty(part_numel(zr), dtype=torch.float32, device=dev)
                y = torch.empty_like(zr)
                bn_act_forward(zr, W, beta, E, t, b_, buffers["running_mean"],
                               buffers["running_var"], buffers["num_batches_tracked"],
                               bn.momentum, act_observer, act, tick,
                               out=(part, buf[FOLD_VECTORS * pad16(C):], y))
            if plan is not None:
                plan.record_forward(rec, (buf, wf, zr, part, y), zr is not z, part.numel())
            z = zr
        ctx.save_for_backward(xc, wf, w, gamma, buf, z, beta, tick)
        ctx.consts = (conv_args, float(act_observer.dtype.qmin),
                      float(act_observer.dtype.qmax), act, x.dtype,
                      bias.dtype if bias is not None else None,
                      (C, w.numel() // C, float(bn.eps), min_gamma, w_observer is not None,
                       float(w_observer.dtype.qmin), float(w_observer.dtype.qmax)))
        ctx.plan = plan
        return y

    @staticmethod
    @once_differentiable_kernels("Conv + batch-norm layer (training)")
    def backward(ctx, gy):
        xc, wc, w, gamma, buf, z, beta, tick = ctx.saved_tensors
        ((stride, padding, dilation, groups), qmin, qmax, act, x_dtype, bias_dtype,
         fconsts) = ctx.consts
        C = fconsts[0]
        need = ctx.needs_input_grad[:5]
        need_x, need_w, need_g, need_b, need_bias = need
        plan = ctx.plan
        gy = _dense_grad(gy, z)
        # None: record this backward; False: the generic path; else replay
        replays = plan.bwd.get(need) if plan is not None and _launch.replays_on() else False
        part = torch.empty(plan.part_bwd if replays else part_numel(z, backward=True),
                           dtype=torch.float32, device=z.device)
        sums = torch.empty(5 * C, dtype=torch.float32, device=z.device)  # W, beta, E, co
        gz = torch.empty_like(z)
        slots = (z, gy, part, sums, gz, buf, beta, tick, w, gamma)  # then gwc, gw, gg
        if replays:
            b = tuple(v.data_ptr() for v in slots)
            if b[1] & 15:  # an incoming gradient at an odd address: the generic path
                replays = False
        if replays:
            stream = _launch.current_stream()
            replays[0](stream, b)
            replays[1](stream, b)
            gxc, gwc = conv2d_backward(gz, xc, wc, stride, padding, dilation, groups, need_x)
            gwc = _dense_grad(gwc, w)
            gw = torch.empty_like(w) if need_w else gwc
            gg = torch.empty(C, dtype=torch.float32, device=z.device)
            replays[2](stream, b + (gwc.data_ptr(), gw.data_ptr(), gg.data_ptr()))
            gb = sums[C:2 * C]
            gw = gw if need_w else None
        else:
            with recording(replays is None) as rec:
                vec = buf[FOLD_VECTORS * pad16(C):]
                t, _, _, sigma, qs, qz = fold_vectors(buf, C)
                gz, gW, gb, gE = bn_act_backward(gy, z, vec, beta, qmin, qmax, act, tick,
                                                 bufs=(part, sums, gz))
                gxc, gwc = conv2d_backward(gz, xc, wc, stride, padding, dilation, groups,
                                           need_x)
                # (gwc in the convolution's dtype: the fold's backward reads it as float32)
                gwc = _dense_grad(gwc, w)
                gw, gg = fold_backward(gwc, gW, gE, w, gamma, t,
                                       ((sigma, qs, qz), fconsts[1:]), need_w)
            if replays is None:
                plan.record_backward(need, rec, slots + (gwc, gw if need_w else gwc, gg))
        if need_x and gxc.dtype != x_dtype:
            gxc = gxc.to(x_dtype)
        return ((gxc if need_x else None), gw, (gg if need_g else None),
                (gb if need_b else None),
                (torch.zeros(gb.shape, dtype=bias_dtype, device=gb.device) if need_bias
                 else None)) + (None,) * 10


def _misaligned(name: str) -> None:
    """A replay's new tensors must be 16-byte aligned, as the recorded ones were (PyTorch's
    allocators align far more: this is an allocator that does not)."""
    raise RuntimeError(f"{name}: a new tensor's address is not 16-byte aligned; set "
                       f"gpuquant.backends.triton.launch.REPLAYS = False")


def _autocast_dtype(x: torch.Tensor, w: torch.Tensor) -> Optional[torch.dtype]:
    """The dtype the convolution runs in: autocast's for this device where it is on (x and
    w floating), else x's when it is w's; None otherwise (the caller's path raises)."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype if x.dtype == w.dtype else None


# --------------------------------------------------------------------------- layer plans
class _LayerPlan:
    """What a layer's step replays while its :func:`_signature` holds: its six launches
    (three forward, three backward per set of needed gradients) as calls of the compiled
    kernels' launchers with the argument lists that :mod:`.launch`'s plans handed them when
    the step was recorded, each pointer either a tensor the signature pins (a constant) or
    an offset into one of the step's new tensors (:func:`.launch.replays`). A replay skips the
    layer's checks, the launch path's keys and most of its allocations; the GPU work is
    the same. ``fwd`` None: not recorded yet; False: not replayable (the generic path runs
    without recording); else the three forward launches."""
    __slots__ = ("fwd", "bwd", "fixed", "rows_copy", "part", "part_bwd")

    def __init__(self, fixed):
        self.fwd, self.bwd, self.fixed = None, {}, fixed
        self.rows_copy, self.part, self.part_bwd = False, 0, 0

    def record_forward(self, rec, slots, rows_copy: bool, part: int) -> None:
        self.fwd = _launch.replays(rec, slots, self.fixed, 3)
        self.rows_copy, self.part = rows_copy, part

    def record_backward(self, need, rec, slots) -> None:
        self.bwd[need] = _launch.replays(rec, slots, (), 3)
        self.part_bwd = slots[2].numel()


_MAX_LAYER_PLANS = 8  # signatures a layer keeps (train / eval batch sizes, autocast on / off)


def _signature(x, conv, w, bias, bn, gamma, beta, dt, wo, wfq, ao, afq, act, min_gamma):
    """(everything the layer's checks, launch arguments and grids derive from, the
    addresses of the tensors its launches take that live from step to step). Two calls
    with equal signatures make the same launches but for the addresses of the step's new
    tensors. The device's current stream, launch hooks, and distributed state are read at
    each call, not here."""
    b = bn._buffers
    tk = bn.__dict__.get("_gpuquant_tickets")
    (wos, wop), (aos, aop) = observer_signature(wo), observer_signature(ao)
    ptrs = (w.data_ptr(), gamma.data_ptr(), beta.data_ptr(), b["running_mean"].data_ptr(),
            b["running_var"].data_ptr(), b["num_batches_tracked"].data_ptr(),
            bias.data_ptr() if bias is not None else None,
            tk.data_ptr() if tk is not None else None) + wop + aop
    return (x.shape, x.stride(), x.dtype, x.device, dt, act, min_gamma, conv, conv.stride,
            conv.padding, conv.dilation, conv.groups, conv.padding_mode, w.shape, w.stride(),
            w.dtype, None if bias is None else bias.dtype, beta.is_contiguous(), bn,
            bn.eps, bn.momentum, bn.affine, gamma.dtype, beta.dtype,
            b["running_mean"].dtype, b["running_var"].dtype, wos, wfq, wfq.enabled,
            wfq.dtype, aos, afq, afq.enabled, afq.dtype) + ptrs, ptrs


# --------------------------------------------------------------------------- op
@on_tensor_device
def conv_bn_act_train(x: torch.Tensor, conv, bn, w_observer, w_fake_quant, act_observer,
                      act_fake_quant, activation: str, min_gamma: float,
                      name: str = "ConvBn2d") -> Optional[torch.Tensor]:
    """The training forward of a QAT ``ConvBn2d`` / ``ConvBnRelu2d`` / ``ConvBnRelu62d`` in
    its one-convolution form (:mod:`gpuquant.nn.qat.conv`) as one autograd node:
    ``fake_quant(observer(act(normalize_train(conv(x, fq(w_fold))))))``, updating the
    BatchNorm's running statistics and both observers. None for what it does not take.

    A layer's first step with a new :func:`_signature` runs the checks and records its
    launches; later steps with that signature replay them (:class:`_LayerPlan`).

    Raises:
        ValueError: one value per channel (as the module does).
    """
    if x.device.type == "cpu" and auto_interpreter(x):
        return None
    act = _ACTS.get(activation)
    if act is None or type(conv) is not torch.nn.Conv2d or x.dim() != 4 \
            or x.dtype not in _FLOATS:
        return None
    params = conv._parameters  # what __getattr__ reads, directly
    w, bias = params["weight"], params["bias"]
    gamma, beta = bn._parameters["weight"], bn._parameters["bias"]
    if gamma is None or beta is None or syncs_batch_stats(bn):
        return None
    dt = _autocast_dtype(x, w)
    min_gamma = float(min_gamma)
    on = _launch.replays_on()
    plan = plans = None
    if on:
        plans = bn.__dict__.get("_gpuquant_layer_plans")
        sig = _signature(x, conv, w, bias, bn, gamma, beta, dt, w_observer, w_fake_quant,
                         act_observer, act_fake_quant, act, min_gamma)[0]
        plan = plans.get(sig) if plans is not None else None
        if plan is not None and plan.fwd is False:  # recorded, not replayable: the
            plan, on = None, False  # generic path, checks included, not recorded again
    if plan is not None and plan.fwd:  # the checks passed for this signature
        if not (_plain_reduce(w_observer) and _plain_reduce(act_observer)):
            return None  # (distributed observers: the world may have changed since)
    elif not _eligible(x, conv, bn, w, gamma, beta, dt, w_observer, w_fake_quant,
                       act_observer, act_fake_quant):
        return None
    tick = module_tickets(bn, bn._buffers["running_mean"].device)
    record = on and plan is None
    if record:  # this step is recorded; its launches take the addresses of the tensors the
        # signature pins (the checks may have sized the observer's state just now)
        module_tickets(w_observer, w_observer._buffers["min_val"].device)
        ptrs = _signature(x, conv, w, bias, bn, gamma, beta, dt, w_observer, w_fake_quant,
                          act_observer, act_fake_quant, act, min_gamma)[1]
        plan = _LayerPlan(frozenset(p for p in ptrs if p is not None))
    mark_observed(w_observer)  # the weight is observed first, as in the three-node form
    y = _ConvBnActTrain.apply(
        x, w, gamma, beta, bias, bn,
        (conv.stride, conv.padding, conv.dilation, conv.groups), dt, min_gamma,
        w_observer, act_observer, act, tick, name, plan)
    mark_observed(act_observer)  # after: a batch the forward refuses leaves it unobserved
    if record:  # kept under the signature as the next step will find it (observed flags)
        sig = _signature(x, conv, w, bias, bn, gamma, beta, dt, w_observer, w_fake_quant,
                         act_observer, act_fake_quant, act, min_gamma)[0]
        if plans is None:
            plans = bn.__dict__["_gpuquant_layer_plans"] = _launch.PlanCache()
        if len(plans) >= _MAX_LAYER_PLANS:
            plans.clear()
        plans[sig] = plan
    return y


def _eligible(x, conv, bn, w, gamma, beta, dt, w_observer, w_fake_quant, act_observer,
              act_fake_quant) -> bool:
    """The layer's checks: what the fused kernels take (module docstring)."""
    if (not bn.affine or isinstance(conv.padding, str) or conv.padding_mode != "zeros"):
        return False
    buffers = bn._buffers
    running_mean, running_var = buffers["running_mean"], buffers["running_var"]
    f32 = torch.float32
    if (w.dtype != f32 or gamma.dtype != f32 or beta.dtype != f32 or w.numel() == 0
            or running_var.dtype != f32 or running_mean.dtype != f32 or w.device != x.device
            or gamma.numel() != w.shape[0] or not _rows_contiguous(w)):
        return False
    if dt not in _FLOATS:
        return False
    if not _act_pair_ok(x, act_observer, act_fake_quant):
        return False
    return _weight_pair_ok(w, w_observer, w_fake_quant)


OPS = {"conv_bn_act_train": conv_bn_act_train}
KERNELS: dict = {}  # its kernels are bn_fold's and bn_act's
