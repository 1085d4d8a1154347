"""Multi-head attention over two projection modules: ``torch.nn.MultiheadAttention``'s forward
(its math path) shared by the served int8 attention
(:class:`gpuquant.nn.quantized.linear_dynamic.DynamicMultiheadAttention`) and its QAT version
(:class:`gpuquant.nn.qat.linear_dynamic.DynamicMultiheadAttention`), which differ in their
projections only; and which MHAs they take (:func:`mha_supported`)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .._compile import EagerUnderCompile
from .module import Module

__all__ = ["AttentionOverProjections", "mha_supported", "require_supported"]


def mha_supported(mha: torch.nn.MultiheadAttention) -> Optional[str]:
    """None if ``mha`` can be converted, else the reason it cannot."""
    if not isinstance(mha, torch.nn.MultiheadAttention):
        return f"not a torch.nn.MultiheadAttention ({type(mha).__name__})"
    if type(mha).forward is not torch.nn.MultiheadAttention.forward:
        # (as Linear subclasses with their own forward: replacing it would drop that)
        return f"its forward ({type(mha).__name__}'s) is not torch.nn.MultiheadAttention's"
    if not mha._qkv_same_embed_dim:
        return "kdim / vdim differ from embed_dim (separate q/k/v projection weights)"
    if mha.bias_k is not None or mha.add_zero_attn:
        return "add_bias_kv / add_zero_attn are not supported"
    return None


def require_supported(mha, what: str) -> None:
    """Raise unless :func:`mha_supported` takes ``mha``: TypeError for something that is no
    ``torch.nn.MultiheadAttention``, ValueError for a configuration it does not take; the
    message is ``what`` and the reason."""
    why = mha_supported(mha)
    if why is not None:
        raise (TypeError if not isinstance(mha, torch.nn.MultiheadAttention) else ValueError)(
            f"{what}: {why}")


class AttentionOverProjections(EagerUnderCompile, Module):
    """``torch.nn.MultiheadAttention``'s forward (its math path) over two projection modules,
    ``in_proj`` (packed q / k / v, 3E x E) and ``out_proj`` (E x E), and ``_project(x, part)``
    for one part of the in-projection (cross-attention): the forward of the served
    :class:`gpuquant.nn.quantized.linear_dynamic.DynamicMultiheadAttention` and of its QAT
    version
    (:class:`gpuquant.nn.qat.linear_dynamic.DynamicMultiheadAttention`), which differ in
    their projections only. Subclasses set ``embed_dim``, ``num_heads``, ``head_dim``,
    ``batch_first`` and ``dropout``."""

    # torch.nn.TransformerEncoderLayer reads these to decide on its fused fast path
    # (torch._transformer_encoder_layer_fwd, which takes the float weights). Like torch's
    # own MHA without a packed float in-projection, this one has no in_proj_weight, so the
    # layer runs its ordinary forward, which calls this module.
    _qkv_same_embed_dim = False
    in_proj_weight = None

    @property
    def in_proj_bias(self) -> Optional[torch.Tensor]:
        """The bias of the packed in-projection (read by torch's Transformer layers)."""
        return self.in_proj.bias

    def _project(self, x, part: int):
        raise NotImplementedError

    def _check_inputs(self, query, key, value, key_padding_mask, attn_mask) -> bool:
        """torch's MultiheadAttention shape checks, made before any projection, as
        ValueError naming the shape received and the one expected; True: unbatched (2-D)."""
        name = type(self).__name__
        for t, what in ((query, "query"), (key, "key"), (value, "value"),
                        (key_padding_mask, "key_padding_mask")):
            if not isinstance(t, torch.Tensor) and not (t is None and what == "key_padding_mask"):
                raise TypeError(f"{name}: {what} must be a tensor, got {type(t).__name__}")
        bf, e = self.batch_first, self.embed_dim
        if query.dim() not in (2, 3):
            raise ValueError(f"{name}: query must be unbatched 2-D (L, E) or batched 3-D "
                             f"{'(N, L, E)' if bf else '(L, N, E)'}, got a {query.dim()}-D "
                             f"tensor of shape {tuple(query.shape)}")
        unbatched = query.dim() == 2
        if key.dim() != query.dim() or value.dim() != query.dim():
            raise ValueError(f"{name}: for a {query.dim()}-D query, key and value must be "
                             f"{query.dim()}-D too, got shapes {tuple(key.shape)} and "
                             f"{tuple(value.shape)}")
        for t, what in ((query, "query"), (key, "key"), (value, "value")):
            if t.shape[-1] != e:
                raise ValueError(f"{name}: {what} must have embedding dimension {e} (its "
                                 f"last), got shape {tuple(t.shape)}")
        if key.shape != value.shape:
            raise ValueError(f"{name}: key and value must have the same shape, got key "
                             f"{tuple(key.shape)} and value {tuple(value.shape)}")
        b = 0 if bf else 1  # batch dimension, batched input
        if not unbatched and key.shape[b] != query.shape[b]:
            raise ValueError(f"{name}: key and value must have the query's batch size "
                             f"{query.shape[b]} (dimension {b}), got key shape "
                             f"{tuple(key.shape)} for query shape {tuple(query.shape)}")
        if isinstance(attn_mask, torch.Tensor):  # (other types: _additive's TypeError)
            seq = 1 if bf and not unbatched else 0
            tgt, src = query.shape[seq], key.shape[seq]
            heads = self.num_heads if unbatched else query.shape[b] * self.num_heads
            if attn_mask.dim() not in (2, 3):
                raise ValueError(f"{name}: attn_mask must be 2-D (L, S) = {(tgt, src)} or 3-D "
                                 f"({'num_heads' if unbatched else 'N * num_heads'}, L, S) = "
                                 f"{(heads, tgt, src)}, got a {attn_mask.dim()}-D tensor of "
                                 f"shape {tuple(attn_mask.shape)}")
            want = (tgt, src) if attn_mask.dim() == 2 else (heads, tgt, src)
            if tuple(attn_mask.shape) != want:
                raise ValueError(f"{name}: the shape of the {attn_mask.dim()}-D attn_mask is "
                                 f"{tuple(attn_mask.shape)}, but should be {want}")
        return unbatched

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True,
                attn_mask=None, average_attn_weights=True, is_causal=False):
        unbatched = self._check_inputs(query, key, value, key_padding_mask, attn_mask)
        same = query is key and key is value
        if unbatched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        if self.batch_first and not unbatched:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        if same:  # self-attention: one projection (the views above are new objects)
            key = value = query
        # now (L, N, E) as in torch's functional MHA
        tgt_len, bsz, e = query.shape
        src_len = key.shape[0]
        h, d = self.num_heads, self.head_dim
        out_dtype = query.dtype
        dev = query.device
        mask = None  # the masks (checked) before the projections
        if attn_mask is None and is_causal:
            attn_mask = torch.ones(tgt_len, src_len, dtype=torch.bool, device=dev).triu(1)
        if attn_mask is not None:
            mask = _additive(attn_mask, dev)
            if mask.dim() == 2:
                mask = mask.unsqueeze(0)
        if key_padding_mask is not None:
            if tuple(key_padding_mask.shape) != (bsz, src_len):
                want = (src_len,) if unbatched else (bsz, src_len)
                got = tuple(key_padding_mask.shape)[1:] if unbatched else \
                    tuple(key_padding_mask.shape)
                raise ValueError(f"{type(self).__name__}: key_padding_mask must have shape "
                                 f"{want} (batch, source length), got {got}")
            kpm = _additive(key_padding_mask, dev, "key_padding_mask").reshape(
                bsz, 1, 1, src_len)
            kpm = kpm.expand(bsz, h, 1, src_len).reshape(bsz * h, 1, src_len)
            mask = kpm if mask is None else mask + kpm
        if same:
            q, k, v = self.in_proj(query).chunk(3, dim=-1)
        else:
            q, k, v = self._project(query, 0), self._project(key, 1), self._project(value, 2)
        q = q.to(torch.float32).reshape(tgt_len, bsz * h, d).transpose(0, 1)
        k = k.to(torch.float32).reshape(src_len, bsz * h, d).transpose(0, 1)
        v = v.to(torch.float32).reshape(src_len, bsz * h, d).transpose(0, 1)
        scores = torch.bmm(q * (1.0 / d ** 0.5), k.transpose(1, 2))
        if mask is not None:
            scores = scores + mask
        attn = torch.softmax(scores, dim=-1)
        if self.training and self.dropout > 0:  # as torch's math path: weights, after softmax
            attn = F.dropout(attn, p=self.dropout)
        out = torch.bmm(attn, v).transpose(0, 1).reshape(tgt_len * bsz, e).to(out_dtype)
        out = self.out_proj(out).reshape(tgt_len, bsz, e)
        if self.batch_first and not unbatched:
            out = out.transpose(0, 1)
        if unbatched:
            out = out.squeeze(1)
        weights = None
        if need_weights:
            weights = attn.reshape(bsz, h, tgt_len, src_len)
            if average_attn_weights:
                weights = weights.mean(dim=1)
            if unbatched:
                weights = weights.squeeze(0)
            weights = weights.to(out_dtype)
        return out, weights



def _additive(mask: torch.Tensor, device, what: str = "attn_mask") -> torch.Tensor:
    """A boolean (True = masked) or float mask as a float32 additive mask.

    Raises:
        TypeError: another dtype (as torch's MultiheadAttention: the old byte masks with
            1 = masked would otherwise be added as +1 to the scores).
    """
    if not isinstance(mask, torch.Tensor) or not (mask.dtype == torch.bool
                                                  or mask.is_floating_point()):
        raise TypeError(f"DynamicMultiheadAttention: only bool and floating types of {what} are "
                        f"supported, got {getattr(mask, 'dtype', type(mask).__name__)}")
    mask = mask.to(device)
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, device=device).masked_fill_(mask, float("-inf"))
    return mask.to(torch.float32)
