"""Causal self-attention (Vaswani et al. 2017) as in GPT-2, and its modern variants.

    qkv = x @ W_qkv + b_qkv                  (B, T, (H + 2 Hkv) hs) = [q | k | v]
    q split into H heads, k and v into Hkv   (B, H, T, hs), (B, Hkv, T, hs)
    q, k rotated by position (RoPE only)     same shapes
    att = softmax(q k^T / sqrt(hs) + mask)   (B, H, T, T), mask = -inf where not visible
    y = att v, heads concatenated            (B, T, C)
    out = y @ W_proj + b_proj                (B, T, C)

The mask makes position t attend only to positions <= t, so no information
(and no gradient) flows from the future. A masked score of -inf becomes an
attention weight of exactly 0 after the softmax, and a zero weight passes no
gradient back: the softmax backward multiplies by `att`.

Variants (each off by default, which is GPT-2):
- grouped-query attention (Ainslie et al. 2023): Hkv < H key/value heads, each
  shared by a group of G = H / Hkv query heads (Hkv = 1 is multi-query
  attention, Shazeer 2019). The KV cache shrinks by the factor G.
- sliding window (Mistral; Beltagy et al. 2020): query t sees only the keys
  t-W+1..t, a banded causal mask; the KV cache keeps only W positions.
- RoPE (tinylm/nn/positions.py): q and k rotated by their positions.

How the groups are computed: query head h uses kv head h // G (as Hugging Face's
`repeat_kv`). Rather than copying each k and v G times, the G query heads of a
group are stacked along the time axis, (B, Hkv, G*T, hs), so one matmul per kv
head scores all of them. In backward the same matmuls sum the G heads'
gradients into the shared k and v: the fork of a shared value (STYLE.md 5).
"""

from __future__ import annotations

import math

import numpy as np

from tinylm.backend import to_device, xp_of
from tinylm.nn.activation import Dropout
from tinylm.nn.linear import Linear
from tinylm.nn.module import Module, make_rng
from tinylm.nn.positions import RotaryEmbedding


def attention_mask(q_pos, k_pos, window: int | None, xp, dtype):
    """(Tq, Tk) additive mask: 0 where query position q_pos[i] may see key position
    k_pos[j] (k <= q, and q - k < window when there is a window), -inf elsewhere.
    Positions are host integer arrays; the mask is built on the host and moved."""
    q_pos, k_pos = np.asarray(q_pos)[:, None], np.asarray(k_pos)[None, :]  # (Tq, 1), (1, Tk)
    visible = k_pos <= q_pos  # causal
    if window is not None:
        visible &= q_pos - k_pos < window  # banded: the last `window` positions only
    return to_device(np.where(visible, 0.0, -np.inf).astype(dtype), xp)  # (Tq, Tk)


class CausalSelfAttention(Module):
    """Sub-layers: `qkv` = Linear(C, (H + 2 Hkv) hs), `proj` = Linear(C, C); dropout on
    the attention weights and on the output (nanoGPT's attn_dropout/resid_dropout).
    With n_kv_heads = None (or = n_heads) `qkv` is GPT-2's Linear(C, 3C).

    Cache: q (B,Hkv,G*T,hs), k^T (B,Hkv,hs,T), v (B,Hkv,T,hs) (q and k after RoPE),
    the attention weights att (B,Hkv,G*T,T), i.e. the softmax *output* (its
    backward needs that, not the scores), and att after dropout (the same array
    when dropout is off).
    """

    def __init__(self, d_model: int, n_heads: int, *, n_kv_heads: int | None = None,
                 bias: bool = True, dropout: float = 0.0, rope_theta: float | None = None,
                 max_positions: int | None = None, sliding_window: int | None = None,
                 proj_init_std: float = 0.02, rng=None, device="cpu", dtype="float32"):
        super().__init__(device, dtype)
        n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        if d_model % n_heads != 0:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        if n_kv_heads < 1 or n_heads % n_kv_heads != 0:
            raise ValueError(f"n_heads ({n_heads}) must be a multiple of n_kv_heads "
                             f"({n_kv_heads})")
        if sliding_window is not None and sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1 or None, got {sliding_window}")
        rng = make_rng(rng)
        self.d_model, self.n_heads, self.head_size = d_model, n_heads, d_model // n_heads
        self.n_kv_heads, self.sliding_window = n_kv_heads, sliding_window
        kw = dict(device=device, dtype=dtype)
        qkv_out = (n_heads + 2 * n_kv_heads) * self.head_size
        self.qkv = Linear(d_model, qkv_out, bias=bias, rng=rng, **kw)
        self.proj = Linear(d_model, d_model, bias=bias, init_std=proj_init_std, rng=rng, **kw)
        self.attn_drop = Dropout(dropout, seed=rng.integers(2**32), **kw)
        self.resid_drop = Dropout(dropout, seed=rng.integers(2**32), **kw)
        self.rope = None
        if rope_theta is not None:
            if max_positions is None:
                raise ValueError("RoPE needs max_positions (the context length) for its tables")
            self.rope = RotaryEmbedding(self.head_size, max_positions, rope_theta, **kw)
        self._masks = {}  # (T, backend, dtype) -> (G*T, T) additive mask (0 or -inf)
        self._cache = None

    def extra_repr(self) -> str:
        parts = [f"heads={self.n_heads}"]
        if self.n_kv_heads != self.n_heads:
            parts.append(f"kv_heads={self.n_kv_heads}")
        if self.sliding_window is not None:
            parts.append(f"window={self.sliding_window}")
        return ", ".join(parts)

    @property
    def group_size(self) -> int:
        """G: query heads per key/value head."""
        return self.n_heads // self.n_kv_heads

    @property
    def attention_weights(self):
        """The softmax weights (B, H, T, T) of the last `forward`, for plots.

        Row t of head h says how much query position t took from each key
        position; the masked entries (the future, and beyond the window) are
        exactly 0. Available until the matching `backward` frees the cache.
        """
        if self._cache is None:
            raise RuntimeError("no attention weights: call forward first (backward frees them)")
        att = self._cache[3]  # (B, Hkv, G*T, T)
        B, T = att.shape[0], att.shape[-1]
        return att.reshape(B, self.n_heads, T, T)  # query head h = kv head * G + g

    def causal_mask(self, T: int, xp, dtype):
        """(T, T) additive mask: 0 where key position <= query position (and within
        the sliding window, if any), -inf elsewhere."""
        return self._grouped_mask(T, xp, dtype)[:T]

    def _grouped_mask(self, T: int, xp, dtype):
        """The (T, T) mask repeated for the G query heads stacked in a group: (G*T, T)."""
        key = (T, xp.__name__, str(dtype))
        if key not in self._masks:
            mask = attention_mask(np.arange(T), np.arange(T), self.sliding_window, xp, dtype)
            self._masks[key] = xp.tile(mask, (self.group_size, 1))  # (G*T, T)
        return self._masks[key]

    def _split_heads(self, qkv, B: int, T: int):
        """(B, T, (H + 2 Hkv) hs) -> q (B, H, T, hs), k and v (B, Hkv, T, hs)."""
        H, Hkv, hs = self.n_heads, self.n_kv_heads, self.head_size
        q = qkv[..., :H * hs].reshape(B, T, H, hs).transpose(0, 2, 1, 3)
        k = qkv[..., H * hs:(H + Hkv) * hs].reshape(B, T, Hkv, hs).transpose(0, 2, 1, 3)
        v = qkv[..., (H + Hkv) * hs:].reshape(B, T, Hkv, hs).transpose(0, 2, 1, 3)
        return q, k, v

    def forward(self, x):
        xp = xp_of(x)
        B, T, C = x.shape
        Hkv, G, hs = self.n_kv_heads, self.group_size, self.head_size
        q, k, v = self._split_heads(self.qkv.forward(x), B, T)  # (B, H|Hkv, T, hs)
        if self.rope is not None:
            q, k = self.rope.rotate(q), self.rope.rotate(k)  # positions 0..T-1
        # Contiguous operands: batched matmuls on transposed views are slow with
        # multi-threaded OpenBLAS (see PERF_NOTES), so pay one copy each. The G
        # query heads of a group are stacked along time: (B, H, T, hs) is
        # (B, Hkv, G, T, hs) in memory, read as (B, Hkv, G*T, hs).
        q = xp.ascontiguousarray(q).reshape(B, Hkv, G * T, hs)  # (B, Hkv, G*T, hs)
        kT = xp.ascontiguousarray(k.transpose(0, 1, 3, 2))  # (B, Hkv, hs, T)
        v = xp.ascontiguousarray(v)  # (B, Hkv, T, hs)

        att = q @ kT  # (B, Hkv, G*T, T) scores
        att *= 1.0 / math.sqrt(hs)  # keeps the scores' variance ~1 (Vaswani et al. 3.2.1)
        att += self._grouped_mask(T, xp, att.dtype)  # invisible positions -> -inf
        # softmax over the keys, stabilised by subtracting the row max (a finite
        # number: the diagonal is never masked)
        att -= att.max(axis=-1, keepdims=True)
        xp.exp(att, out=att)
        att /= att.sum(axis=-1, keepdims=True)  # (B, Hkv, G*T, T) weights, rows sum to 1
        att_d = self.attn_drop.forward(att)  # (B, Hkv, G*T, T)

        y = att_d @ v  # (B, Hkv, G*T, hs)
        y = y.reshape(B, -1, T, hs).transpose(0, 2, 1, 3).reshape(B, T, C)  # heads side by side
        self._cache = (q, kT, v, att, att_d)  # att_d is att itself without dropout
        return self.resid_drop.forward(self.proj.forward(y))  # (B, T, C)

    def backward(self, dout):
        q, kT, v, att, att_d = self._need_cache(self._cache)
        self._cache = None
        xp = xp_of(dout)
        B, T, C = dout.shape
        H, Hkv, G, hs = self.n_heads, self.n_kv_heads, self.group_size, self.head_size

        dy = self.proj.backward(self.resid_drop.backward(dout))  # (B, T, C)
        dy = xp.ascontiguousarray(dy.reshape(B, T, H, hs).transpose(0, 2, 1, 3))  # (B, H, T, hs)
        dy = dy.reshape(B, Hkv, G * T, hs)  # grouped, as y was

        # y = att_d @ v  =>  datt_d = dy v^T,  dv = att_d^T dy
        # (dv sums over the G*T rows: every query head of the group used this v)
        datt_d = dy @ _transposed(v)  # (B, Hkv, G*T, T)
        dv = _transposed(att_d) @ dy  # (B, Hkv, T, hs)
        datt = self.attn_drop.backward(datt_d)  # (B, Hkv, G*T, T), gradient of att

        # softmax backward: dscore = att * (datt - sum_j datt_j att_j)
        # (masked entries have att = 0, so they get no gradient: nothing from the future)
        dscore = datt
        dscore -= (datt * att).sum(axis=-1, keepdims=True)
        dscore *= att
        dscore *= 1.0 / math.sqrt(hs)

        # scores = q @ k^T  =>  dq = dscore k,  dk^T = q^T dscore (summed over the group)
        dq = (dscore @ _transposed(kT)).reshape(B, H, T, hs)  # (B, H, T, hs)
        dk = _transposed(dscore) @ q  # (B, Hkv, T, hs)
        if self.rope is not None:  # q, k were rotated: rotate their gradients back
            dq, dk = self.rope.rotate(dq, inverse=True), self.rope.rotate(dk, inverse=True)

        # back through the head split: (B, heads, T, hs) -> (B, T, heads * hs), then [q | k | v]
        dqkv = xp.concatenate([_merge_heads(dq), _merge_heads(dk), _merge_heads(dv)], axis=-1)
        return self.qkv.backward(dqkv)  # (B, T, C)

    # -- inference with a KV cache (tinylm/nn/kv_cache.py) -------------------

    def forward_cached(self, x, cache, layer: int, pos: int):
        """Inference only: x (B, t, C) holds positions pos..pos+t-1; the keys and
        values of earlier positions are in `cache` (a KVCache), layer `layer`.

        Adds this chunk's k, v to the cache (keys after RoPE: a cached key keeps
        the rotation of its own position) and attends over the keys the cache
        returns: query i (position pos+i) sees keys j <= pos+i, within the
        window if there is one. t = 1 is one decoding step, a larger t at pos = 0
        the prefill of a prompt. Same math as `forward`, so the outputs equal its
        rows pos..pos+t-1. Keeps no backward cache and applies no dropout (the
        caller is in eval mode, where dropout is the identity).
        """
        xp = xp_of(x)
        B, t, C = x.shape
        Hkv, G, hs = self.n_kv_heads, self.group_size, self.head_size
        q, k, v = self._split_heads(self.qkv.forward(x), B, t)  # (B, H|Hkv, t, hs)
        if self.rope is not None:
            q, k = self.rope.rotate(q, pos), self.rope.rotate(k, pos)  # true positions
        k, v, first = cache.update(layer, k, v, pos)  # (B, Hkv, n, hs): positions first..pos+t-1
        n = k.shape[2]
        q = xp.ascontiguousarray(q).reshape(B, Hkv, G * t, hs)  # (B, Hkv, G*t, hs)

        att = q @ k.swapaxes(-1, -2)  # (B, Hkv, G*t, n) scores
        att *= 1.0 / math.sqrt(hs)
        if t > 1 or (self.sliding_window is not None and n > self.sliding_window):
            # a single query (t = 1) without a window is the newest position and may
            # see every key; otherwise mask as `forward` does, in true positions.
            # Built per call, not memoised: prefill lengths vary.
            q_pos, k_pos = np.arange(pos, pos + t), np.arange(first, first + n)
            mask = attention_mask(q_pos, k_pos, self.sliding_window, xp, att.dtype)  # (t, n)
            att += xp.tile(mask, (G, 1))  # (G*t, n)
        att -= att.max(axis=-1, keepdims=True)  # softmax over the keys, as in forward
        xp.exp(att, out=att)
        att /= att.sum(axis=-1, keepdims=True)  # (B, Hkv, G*t, n)

        y = att @ v  # (B, Hkv, G*t, hs)
        y = y.reshape(B, -1, t, hs).transpose(0, 2, 1, 3).reshape(B, t, C)  # heads side by side
        return self.proj.forward(y)  # (B, t, C)


def _merge_heads(a):
    """(B, heads, T, hs) -> (B, T, heads * hs): the inverse of the head split."""
    B, n, T, hs = a.shape
    return a.transpose(0, 2, 1, 3).reshape(B, T, n * hs)


def _transposed(a):
    """a with its last two axes swapped, as a contiguous copy (..., n, m) -> (..., m, n).

    Same values as `a.swapaxes(-1, -2)`; the copy is for speed only: batched
    matmuls on transposed views run several times slower with multi-threaded
    OpenBLAS on this project's 2-core machine (see PERF_NOTES), and the copy is
    cheap next to the matmul it feeds."""
    return xp_of(a).ascontiguousarray(a.swapaxes(-1, -2))
