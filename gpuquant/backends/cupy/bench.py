"""Benchmark providers ``gpuquant-cupy-<tier>`` for the ``gemm`` and ``conv`` suites.

A suite adds every tier beside its other providers, e.g. in ``suites/gemm.py``::

    from ...backends.cupy.bench import tier_providers
    providers.update(tier_providers(
        "linear", args_of=lambda inp: (inp["x"], 0, inp["w"], inp["bias"], inp["rq"]),
        check=_check_requant))

and in ``suites/conv.py`` (several layers a case: ``args_of`` returns a list of calls and the
provider returns the list of outputs, as the suite's other providers do)::

    providers.update(tier_providers(
        "conv2d", args_of=lambda layers: [
            (L["x"], L["zp"], L["w"], L["bias"], (L["spec"].stride,) * 2,
             (L["spec"].pad,) * 2, (1, 1), 1, L["rq"]) for L in layers],
        check=_check))

Each provider times the backend op as a user calls it (host plan + kernel launch; the weight
re-layout is cached per weight tensor, as a converted module would hold it), with the tier
forced, on CUDA tensors. Where CuPy or a GPU is missing, or the GPU cannot run a tier, the
provider's ``setup`` raises ``ProviderUnavailable`` with the reason (the harness leaves it
out and says why); so does a tier whose case runs another tier's kernel (a linear of M <= 8
runs the dp4a GEMV kernel whatever the tier: one row, not five of the same kernel).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional

from . import dispatch, is_available
from .launch import execute, plan_conv2d, plan_linear

__all__ = ["tier_providers"]

_PLANS = {"linear": plan_linear, "conv2d": plan_conv2d}


def tier_providers(op: str, args_of: Callable[[Any], tuple] = tuple,
                   check: Optional[Callable[[Any, Any], Optional[bool]]] = None,
                   tiers=dispatch.TIERS) -> Dict[str, Any]:
    """Providers ``gpuquant-cupy-<tier>`` for ``op`` ("linear" or "conv2d").

    Args:
        op: which op the case times.
        args_of: input set -> the op's positional arguments, in the reference backend's
            signature (``linear(x, x_zp, w, bias, rq)``, ``conv2d(x, x_zp, w, bias, stride,
            padding, dilation, groups, rq)``), tensors on the GPU; or a list of such tuples
            (the timed call then runs them all and returns the list of outputs).
        check: the suite's ``exact_vs_numpy`` check, passed through.
        tiers: the tiers to offer (default: all; those the GPU cannot run report unavailable).

    Raises:
        ValueError: unknown op or tier name.
    """
    from ...bench.harness import Provider, ProviderUnavailable
    if op not in _PLANS:
        raise ValueError(f"op must be one of {sorted(_PLANS)}, got {op!r}")
    for t in tiers:
        if t not in dispatch.TIERS:
            raise ValueError(f"unknown tier {t!r}; allowed: {list(dispatch.TIERS)}")
    plan_fn = _PLANS[op]

    def make(tier):
        def setup(inputs):
            ok, reason = is_available()
            if not ok:
                raise ProviderUnavailable(f"cupy backend: {reason}")
            import torch
            got = args_of(inputs)
            many = isinstance(got, list)
            calls = [tuple(c) for c in got] if many else [tuple(got)]
            from . import _capability
            try:  # a device CuPy's compiler cannot build for, then a tier it cannot run
                cap = _capability(calls[0][0].device)
                dispatch.check_tier(tier, cap)
            except ValueError as e:
                raise ProviderUnavailable(str(e))
            if tier in dispatch.OPT_IN_TIERS:  # never run on a GPU before: first in a child
                from .selfcheck import check_isolated
                passed, why = check_isolated(tier)
                if not passed:
                    raise ProviderUnavailable(why)

            if many:
                def run():
                    return [execute(plan_fn(*c, tier), cap) for c in calls]
            else:
                args = calls[0]
                ran = plan_fn(*args, tier).tier
                if ran != tier:  # (M <= 8 linears: the GEMV kernel whatever the tier)
                    raise ProviderUnavailable(
                        f"this case runs the {ran} tier's kernel whatever the tier forced "
                        f"(timed once, as gpuquant-cupy-{ran})")

                def run():
                    return execute(plan_fn(*args, tier), cap)
            return run
        return Provider(setup, check)
    return {f"gpuquant-cupy-{t}": make(t) for t in tiers}
