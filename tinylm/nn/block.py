"""The transformer block: pre-norm attention and MLP, each on a residual branch."""

from __future__ import annotations

from tinylm.nn.activation import GELU, Dropout
from tinylm.nn.attention import CausalSelfAttention
from tinylm.nn.linear import Linear
from tinylm.nn.module import Module, make_rng
from tinylm.nn.norm import LayerNorm


class MLP(Module):
    """fc (C -> hidden) -> GELU -> proj (hidden -> C) -> dropout. GPT-2 uses hidden = 4C."""

    def __init__(self, d_model: int, hidden: int | None = None, *, bias: bool = True,
                 dropout: float = 0.0, proj_init_std: float = 0.02, rng=None, device="cpu",
                 dtype="float32"):
        super().__init__(device, dtype)
        rng = make_rng(rng)
        hidden = 4 * d_model if hidden is None else hidden
        kw = dict(device=device, dtype=dtype)
        self.fc = Linear(d_model, hidden, bias=bias, rng=rng, **kw)
        self.gelu = GELU(**kw)
        self.proj = Linear(hidden, d_model, bias=bias, init_std=proj_init_std, rng=rng, **kw)
        self.drop = Dropout(dropout, seed=rng.integers(2**32), **kw)

    def forward(self, x):
        # x (B, T, C) -> (B, T, hidden) -> (B, T, C)
        return self.drop.forward(self.proj.forward(self.gelu.forward(self.fc.forward(x))))

    def backward(self, dout):
        # exactly the forward, read from right to left
        return self.fc.backward(self.gelu.backward(self.proj.backward(self.drop.backward(dout))))


class Block(Module):
    """Pre-norm transformer block (GPT-2):

        x = x + attn(ln1(x))     (1)
        x = x + mlp(ln2(x))      (2)

    Each `x + f(x)` forks x into two paths, so in backward the gradient of x is
    the sum of the straight-through path and the branch's gradient (STYLE.md 5).
    """

    def __init__(self, d_model: int, n_heads: int, *, bias: bool = True, dropout: float = 0.0,
                 proj_init_std: float = 0.02, rng=None, device="cpu", dtype="float32"):
        super().__init__(device, dtype)
        rng = make_rng(rng)
        kw = dict(device=device, dtype=dtype)
        self.ln1 = LayerNorm(d_model, bias=bias, **kw)
        self.attn = CausalSelfAttention(d_model, n_heads, bias=bias, dropout=dropout,
                                        proj_init_std=proj_init_std, rng=rng, **kw)
        self.ln2 = LayerNorm(d_model, bias=bias, **kw)
        self.mlp = MLP(d_model, bias=bias, dropout=dropout, proj_init_std=proj_init_std,
                       rng=rng, **kw)

    def forward(self, x):
        x = x + self.attn.forward(self.ln1.forward(x))  # (1)   (B, T, C)
        x = x + self.mlp.forward(self.ln2.forward(x))  # (2)   (B, T, C)
        return x

    def backward(self, dout):
        # (2) backward: the residual passes dout through unchanged; the branch adds its part
        dx = dout + self.ln2.backward(self.mlp.backward(dout))
        # (1) backward, the same shape of computation
        dx = dx + self.ln1.backward(self.attn.backward(dx))
        return dx

    def forward_cached(self, x, k_cache, v_cache, pos: int):
        """Inference with this block's KV cache (see CausalSelfAttention.forward_cached):
        x (B, t, C) at positions pos..pos+t-1 -> (B, t, C). Eval mode only."""
        x = x + self.attn.forward_cached(self.ln1.forward(x), k_cache, v_cache, pos)  # (1)
        x = x + self.mlp.forward(self.ln2.forward(x))  # (2): per position, needs no cache
        return x
