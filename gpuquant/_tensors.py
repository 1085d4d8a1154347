"""Tensor helpers shared across the package."""
from __future__ import annotations

__all__ = ["version", "batch_norm_eps0", "keep_dtype", "keep_dtype_of"]


def version(t) -> int:
    """``t._version``, the in-place version counter that caches key on; -1 for an inference
    tensor (made under ``torch.inference_mode``: it has none, so callers key on identity and
    storage only), -2 for None or anything that is not a tensor."""
    try:
        return t._version
    except RuntimeError:
        return -1
    except AttributeError:
        return -2


def batch_norm_eps0(z, mean, var_eps, weight, bias):
    """``(z - mean) / sqrt(var_eps) * weight + bias`` per channel (dimension 1) in one pass:
    eval-form batch_norm with ``var + eps`` already in ``var_eps`` and eps 0, mixed dtypes
    allowed (a float16 / bfloat16 ``z`` with float32 per-channel vectors).

    Calls the ATen op, not ``torch.nn.functional.batch_norm``: torch 2.10 and 2.11 refuse eps
    0 there even in eval form (pytorch/pytorch#173337; 2.13 allows it). With eps 0 ATen never
    picks cuDNN (it needs eps >= 1e-5) and runs its native kernel."""
    import torch
    return torch.batch_norm(z, weight, bias, mean, var_eps, False, 0.0, 0.0,
                            torch.backends.cudnn.enabled)


def keep_dtype(fn):
    """``fn`` (a ``torch.nn.Module._apply`` conversion) for tensors that keep their dtype:
    a conversion that would change a floating tensor's dtype (``model.half()``,
    ``.to(torch.bfloat16)``) only moves it to the device ``fn`` chose. For quantizer state
    (observer ranges, scales, learned step sizes): float32 by the contract; in bfloat16 a
    moving average stalls (an update below its resolution rounds away) and the qparams change."""
    def apply(t):
        out = fn(t)
        if t.is_floating_point() and getattr(out, "dtype", t.dtype) != t.dtype:
            return t.to(device=out.device)
        return out
    return apply


def keep_dtype_of(fn, tensors):
    """``fn`` as :func:`keep_dtype` makes it for the tensors in ``tensors`` (by identity;
    None entries skipped), ``fn`` itself for the rest: a module's float32 constants (qparam
    scales, SmoothQuant's factors) keep float32 under ``model.half()`` while its weights
    follow the cast."""
    ids = {id(t) for t in tensors if t is not None}
    kept = keep_dtype(fn)

    def apply(t):
        return kept(t) if id(t) in ids else fn(t)
    return apply
