"""The transformer block: attention and an MLP, each on a residual branch.

GPT-2's block is pre-norm with a GELU MLP. The variants a GPTConfig can pick:
- `norm`: LayerNorm or RMSNorm (tinylm/nn/norm.py);
- `norm_placement`: "pre" (GPT-2, Llama: normalise each branch's input) or
  "post" (the original Transformer: normalise after each residual sum);
- `mlp`: "gelu" (GPT-2), "relu" (the original Transformer), "swiglu" (Llama),
  or a mixture of experts of either kind (tinylm/nn/moe.py).
"""

from __future__ import annotations

from tinylm.nn.attention import CausalSelfAttention
from tinylm.nn.mlp import make_mlp
from tinylm.nn.module import Module, init_rng
from tinylm.nn.moe import MoE
from tinylm.nn.norm import make_norm


class Block(Module):
    """A transformer block. Pre-norm (GPT-2, the default):

        x = x + attn(ln1(x))     (1)
        x = x + mlp(ln2(x))      (2)

    or post-norm (norm_placement="post", the original Transformer):

        x = ln1(x + attn(x))     (1')
        x = ln2(x + mlp(x))      (2')

    Each `x + f(x)` forks x into two paths, so in backward the gradient of x is
    the sum of the straight-through path and the branch's gradient, added
    exactly where the fork is.
    Pre-norm keeps that straight path free of any layer, which is why deep
    pre-norm stacks train without warmup tricks (Xiong et al. 2020).

    `attn_kw` go to CausalSelfAttention (n_kv_heads, rope_theta, max_positions,
    sliding_window, and attention="standard"|"flash" with its tiles block_q,
    block_k); `mlp` is "gelu", "relu" or "swiglu", and with n_experts > 0
    the block's MLP is a MoE of n_experts such MLPs.
    """

    def __init__(self, d_model: int, n_heads: int, *, bias: bool = True, dropout: float = 0.0,
                 norm: str = "layernorm", norm_eps: float = 1e-5, norm_placement: str = "pre",
                 mlp: str = "gelu", mlp_hidden: int | None = None, n_experts: int = 0,
                 experts_per_token: int = 2, moe_aux_loss_coef: float = 0.01, rng=None,
                 **attn_kw):
        super().__init__()
        if norm_placement not in ("pre", "post"):
            raise ValueError(f"norm_placement must be 'pre' or 'post', got {norm_placement!r}")
        rng = init_rng(rng)
        self.pre_norm = norm_placement == "pre"
        self.ln1 = make_norm(norm, d_model, eps=norm_eps, bias=bias)
        self.attn = CausalSelfAttention(d_model, n_heads, bias=bias, dropout=dropout, rng=rng,
                                        **attn_kw)
        self.ln2 = make_norm(norm, d_model, eps=norm_eps, bias=bias)
        mlp_kw = dict(bias=bias, dropout=dropout, rng=rng)
        if n_experts > 0:
            self.mlp = MoE(d_model, n_experts, experts_per_token, kind=mlp, hidden=mlp_hidden,
                           aux_loss_coef=moe_aux_loss_coef, **mlp_kw)
        else:
            self.mlp = make_mlp(mlp, d_model, mlp_hidden, **mlp_kw)

    def extra_repr(self) -> str:
        return "" if self.pre_norm else "post-norm"

    def forward(self, x):
        if self.pre_norm:
            x = x + self.attn.forward(self.ln1.forward(x))  # (1)   (B, T, C)
            x = x + self.mlp.forward(self.ln2.forward(x))  # (2)   (B, T, C)
        else:
            x = self.ln1.forward(x + self.attn.forward(x))  # (1')  (B, T, C)
            x = self.ln2.forward(x + self.mlp.forward(x))  # (2')  (B, T, C)
        return x

    def backward(self, dout):
        """dout (B, T, C) -> dx (B, T, C)."""
        if self.pre_norm:
            # (2) backward: the residual passes dout through unchanged; the branch adds its part
            dx = dout + self.ln2.backward(self.mlp.backward(dout))
            # (1) backward, the same shape of computation
            dx = dx + self.ln1.backward(self.attn.backward(dx))
        else:
            ds = self.ln2.backward(dout)  # (2') the sum s = x + mlp(x) feeds ln2
            dx = ds + self.mlp.backward(ds)  # fork: straight path + branch
            ds = self.ln1.backward(dx)  # (1')
            dx = ds + self.attn.backward(ds)
        return dx

    def forward_cached(self, x, cache, layer: int):
        """Inference with the KV cache (see CausalSelfAttention.forward_cached): x (B, t, C)
        at positions cache.pos..cache.pos+t-1 -> (B, t, C). Eval mode only."""
        pos = cache.pos
        if self.pre_norm:
            x = x + self.attn.forward_cached(self.ln1.forward(x), cache, layer, pos)  # (1)
            x = x + self.mlp.forward(self.ln2.forward(x))  # (2): per position, needs no cache
        else:
            x = self.ln1.forward(x + self.attn.forward_cached(x, cache, layer, pos))  # (1')
            x = self.ln2.forward(x + self.mlp.forward(x))  # (2')
        return x
