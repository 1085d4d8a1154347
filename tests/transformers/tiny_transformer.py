"""A small transformer with planted activation outliers, shared by the transformer tests."""
import torch
import torch.nn as nn
import torch.nn.functional as F


class Attention(nn.Module):
    """Self-attention written with four Linear layers (as HuggingFace models do)."""

    def __init__(self, d, heads):
        super().__init__()
        self.h = heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        b, t, d = x.shape
        sh = lambda y: y.reshape(b, t, self.h, d // self.h).transpose(1, 2)  # noqa: E731
        y = F.scaled_dot_product_attention(sh(self.q(x)), sh(self.k(x)), sh(self.v(x)),
                                           is_causal=True)
        return self.o(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, d, heads, ff, mha):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.mha = mha
        self.attn = (nn.MultiheadAttention(d, heads, batch_first=True) if mha
                     else Attention(d, heads))
        self.fc1, self.fc2 = nn.Linear(d, ff), nn.Linear(ff, d)

    def forward(self, x):
        h = self.ln1(x)
        if self.mha:
            t = x.shape[1]
            mask = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
            a = self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        else:
            a = self.attn(h)
        x = x + a
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TinyTransformer(nn.Module):
    """``depth`` pre-LN blocks (attention from Linears; with ``mha`` every other block uses
    ``torch.nn.MultiheadAttention``), LayerNorm gains with a few outlier channels (x30), and
    a head reading the residual stream directly, whose tokens vary in scale over two orders
    of magnitude (the case per-token activation scales are for)."""

    def __init__(self, d=64, heads=4, ff=128, depth=2, outliers=(3, 17, 40), gain=30.0, mha=False):
        super().__init__()
        self.blocks = nn.ModuleList(Block(d, heads, ff, mha=mha and i % 2 == 0)
                                    for i in range(depth))
        self.head = nn.Linear(d, d)
        with torch.no_grad():
            for blk in self.blocks:
                for ln in (blk.ln1, blk.ln2):
                    ln.weight.uniform_(0.5, 1.5)
                    ln.weight[list(outliers)] = gain
                    ln.bias.normal_(0, 0.1)

    def forward(self, x):
        for blk in self.blocks:
            x = blk(x)
        return self.head(x)


def make_inputs(n, t=12, d=64):
    """Tokens with per-token scales from 0.1 to 10 (log-uniform)."""
    scale = torch.exp(torch.empty(n, t, 1).uniform_(-2.3, 2.3))
    return torch.randn(n, t, d) * scale


def token_cosine(y, ref):
    """Mean over tokens of the cosine similarity of each output vector to the float one."""
    return F.cosine_similarity(y.reshape(-1, y.shape[-1]).float(),
                               ref.reshape(-1, ref.shape[-1]).float(), dim=1).mean().item()
