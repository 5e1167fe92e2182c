"""Causal multi-head self-attention (Vaswani et al. 2017), as in GPT-2.

    qkv = x @ W_qkv + b_qkv                  (B, T, 3C) = [q | k | v]
    q, k, v split into H heads of size hs    (B, H, T, hs) each
    att = softmax(q k^T / sqrt(hs) + mask)   (B, H, T, T), mask = -inf above the diagonal
    y = att v, heads concatenated            (B, T, C)
    out = y @ W_proj + b_proj                (B, T, C)

The mask makes position t attend only to positions <= t, so no information
(and no gradient) flows from the future. A masked score of -inf becomes an
attention weight of exactly 0 after the softmax, and a zero weight passes no
gradient back: the softmax backward multiplies by `att`.
"""

from __future__ import annotations

import math

from tinylm.backend import xp_of
from tinylm.nn.activation import Dropout
from tinylm.nn.linear import Linear
from tinylm.nn.module import Module, make_rng


class CausalSelfAttention(Module):
    """Sub-layers: `qkv` = Linear(C, 3C), `proj` = Linear(C, C); dropout on the
    attention weights and on the output (nanoGPT's attn_dropout/resid_dropout).

    Cache: q (B,H,T,hs), k^T (B,H,hs,T), v (B,H,T,hs), the attention weights
    att (B,H,T,T), i.e. the softmax *output* (its backward needs that, not the
    scores), and att after dropout (the same array when dropout is off).
    """

    def __init__(self, d_model: int, n_heads: int, *, bias: bool = True, dropout: float = 0.0,
                 proj_init_std: float = 0.02, rng=None, device="cpu", dtype="float32"):
        super().__init__(device, dtype)
        if d_model % n_heads != 0:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        rng = make_rng(rng)
        self.d_model, self.n_heads, self.head_size = d_model, n_heads, d_model // n_heads
        kw = dict(device=device, dtype=dtype)
        self.qkv = Linear(d_model, 3 * d_model, bias=bias, rng=rng, **kw)
        self.proj = Linear(d_model, d_model, bias=bias, init_std=proj_init_std, rng=rng, **kw)
        self.attn_drop = Dropout(dropout, seed=rng.integers(2**32), **kw)
        self.resid_drop = Dropout(dropout, seed=rng.integers(2**32), **kw)
        self._masks = {}  # (T, backend, dtype) -> (T, T) additive mask (0 or -inf)
        self._cache = None

    @property
    def attention_weights(self):
        """The softmax weights (B, H, T, T) of the last `forward`, for plots.

        Row t of head h says how much query position t took from each key
        position; the upper triangle is exactly 0 (the causal mask). Available
        until the matching `backward` frees the cache.
        """
        if self._cache is None:
            raise RuntimeError("no attention weights: call forward first (backward frees them)")
        return self._cache[3]

    def causal_mask(self, T: int, xp, dtype):
        """(T, T) additive mask: 0 where key position <= query position, -inf above."""
        key = (T, xp.__name__, str(dtype))
        if key not in self._masks:
            future = xp.triu(xp.ones((T, T), dtype=bool), k=1)  # True where j > i
            self._masks[key] = xp.where(future, -xp.inf, 0.0).astype(dtype)
        return self._masks[key]

    def forward(self, x):
        xp = xp_of(x)
        B, T, C = x.shape
        H, hs = self.n_heads, self.head_size
        qkv = self.qkv.forward(x).reshape(B, T, 3, H, hs)  # (B, T, 3, H, hs)
        # Contiguous per-head operands: batched matmuls on transposed views are
        # slow with multi-threaded OpenBLAS (see PERF_NOTES), so pay one copy each.
        q = xp.ascontiguousarray(qkv[:, :, 0].transpose(0, 2, 1, 3))  # (B, H, T, hs)
        kT = xp.ascontiguousarray(qkv[:, :, 1].transpose(0, 2, 3, 1))  # (B, H, hs, T)
        v = xp.ascontiguousarray(qkv[:, :, 2].transpose(0, 2, 1, 3))  # (B, H, T, hs)

        att = q @ kT  # (B, H, T, T) scores
        att *= 1.0 / math.sqrt(hs)  # keeps the scores' variance ~1 (Vaswani et al. 3.2.1)
        att += self.causal_mask(T, xp, att.dtype)  # future positions -> -inf
        # softmax over the keys, stabilised by subtracting the row max (a finite
        # number: the diagonal is never masked)
        att -= att.max(axis=-1, keepdims=True)
        xp.exp(att, out=att)
        att /= att.sum(axis=-1, keepdims=True)  # (B, H, T, T) weights, rows sum to 1
        att_d = self.attn_drop.forward(att)  # (B, H, T, T)

        y = att_d @ v  # (B, H, T, hs)
        y = y.transpose(0, 2, 1, 3).reshape(B, T, C)  # heads side by side again
        self._cache = (q, kT, v, att, att_d)  # att_d is att itself without dropout
        return self.resid_drop.forward(self.proj.forward(y))  # (B, T, C)

    def backward(self, dout):
        q, kT, v, att, att_d = self._need_cache(self._cache)
        self._cache = None
        xp = xp_of(dout)
        B, T, C = dout.shape
        H, hs = self.n_heads, self.head_size

        dy = self.proj.backward(self.resid_drop.backward(dout))  # (B, T, C)
        dy = xp.ascontiguousarray(dy.reshape(B, T, H, hs).transpose(0, 2, 1, 3))  # (B, H, T, hs)

        # y = att_d @ v  =>  datt_d = dy v^T,  dv = att_d^T dy
        datt_d = dy @ _transposed(v)  # (B, H, T, T)
        dv = _transposed(att_d) @ dy  # (B, H, T, hs)
        datt = self.attn_drop.backward(datt_d)  # (B, H, T, T), gradient of att

        # softmax backward: dscore = att * (datt - sum_j datt_j att_j)
        # (masked entries have att = 0, so they get no gradient: nothing from the future)
        dscore = datt
        dscore -= (datt * att).sum(axis=-1, keepdims=True)
        dscore *= att
        dscore *= 1.0 / math.sqrt(hs)

        # scores = q @ k^T  =>  dq = dscore k,  dk^T = q^T dscore
        dq = dscore @ _transposed(kT)  # (B, H, T, hs)
        dk = _transposed(dscore) @ q  # (B, H, T, hs)

        # back through the head split: (B, H, T, hs) x3 -> (B, T, 3, H, hs) -> (B, T, 3C)
        dqkv = xp.stack([dq, dk, dv], axis=2).transpose(0, 3, 2, 1, 4).reshape(B, T, 3 * C)
        return self.qkv.backward(dqkv)  # (B, T, C)

    # -- inference with a KV cache (tinylm/nn/kv_cache.py) -------------------

    def forward_cached(self, x, k_cache, v_cache, pos: int):
        """Inference only: x (B, t, C) holds positions pos..pos+t-1; the keys and
        values of positions 0..pos-1 are already in k_cache, v_cache (B, H, L, hs).

        Writes this chunk's k, v into the caches at [pos:pos+t] and attends over
        keys [0:pos+t]: query i (position pos+i) sees keys j <= pos+i, the causal
        mask of `forward` shifted right by pos. t = 1 is one decoding step, a
        larger t at pos = 0 the prefill of a prompt. Same math as `forward`, so
        the outputs equal its rows pos..pos+t-1. Keeps no backward cache and
        applies no dropout (the caller is in eval mode, where dropout is the identity).
        """
        xp = xp_of(x)
        B, t, C = x.shape
        H, hs = self.n_heads, self.head_size
        n = pos + t  # keys visible to the last query
        qkv = self.qkv.forward(x).reshape(B, t, 3, H, hs)  # (B, t, 3, H, hs)
        q = xp.ascontiguousarray(qkv[:, :, 0].transpose(0, 2, 1, 3))  # (B, H, t, hs)
        k_cache[:, :, pos:n] = qkv[:, :, 1].transpose(0, 2, 1, 3)  # (B, H, t, hs), in place
        v_cache[:, :, pos:n] = qkv[:, :, 2].transpose(0, 2, 1, 3)  # (B, H, t, hs), in place
        k = k_cache[:, :, :n]  # (B, H, n, hs) view: every key so far
        v = v_cache[:, :, :n]  # (B, H, n, hs) view

        att = q @ k.swapaxes(-1, -2)  # (B, H, t, n) scores
        att *= 1.0 / math.sqrt(hs)
        if t > 1:
            # query i is position pos+i: keys j > pos+i are its future. (A single
            # query, t = 1, is the newest position and may see every key.) Built
            # per call, not memoised like causal_mask: prefill lengths vary.
            future = xp.triu(xp.ones((t, n), dtype=bool), k=pos + 1)  # (t, n) True where j > pos+i
            att += xp.where(future, -xp.inf, 0.0).astype(att.dtype)
        att -= att.max(axis=-1, keepdims=True)  # softmax over the keys, as in forward
        xp.exp(att, out=att)
        att /= att.sum(axis=-1, keepdims=True)  # (B, H, t, n)

        y = att @ v  # (B, H, t, hs)
        y = y.transpose(0, 2, 1, 3).reshape(B, t, C)  # heads side by side again
        return self.proj.forward(y)  # (B, t, C)


def _transposed(a):
    """a with its last two axes swapped, as a contiguous copy (..., n, m) -> (..., m, n).

    Same values as `a.swapaxes(-1, -2)`; the copy is for speed only: batched
    matmuls on transposed views run several times slower with multi-threaded
    OpenBLAS on this project's 2-core machine (see PERF_NOTES), and the copy is
    cheap next to the matmul it feeds."""
    return xp_of(a).ascontiguousarray(a.swapaxes(-1, -2))
