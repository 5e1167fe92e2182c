"""Causal self-attention (Vaswani et al. 2017) as in GPT-2, and its modern variants.

    qkv = x @ W_qkv + b_qkv                  (B, T, (H + 2 Hkv) hs) = [q | k | v]
    q split into H heads, k and v into Hkv   (B, H, T, hs), (B, Hkv, T, hs)
    q, k rotated by position (RoPE only)     same shapes
    att = softmax(q k^T / sqrt(hs) + mask)   (B, H, T, T), mask = -inf where not visible
    y = att v, heads concatenated            (B, T, C)
    out = y @ W_proj + b_proj                (B, T, C)

The mask makes position t attend only to positions <= t, so no information
(and no gradient) flows from the future. One method builds it, `mask(q_pos,
k_pos, ...)`, for training (`forward`) and for generation (`forward_cached`)
alike; assign another function to `attn.mask` to change what attention may see
(notebooks 03 and 05 switch it off to show what the mask is for). A masked score of -inf becomes an
attention weight of exactly 0 after the softmax, and a zero weight passes no
gradient back: the softmax backward multiplies by `att`.

Variants (each off by default, which is GPT-2):
- grouped-query attention (Ainslie et al. 2023): Hkv < H key/value heads, each
  shared by a group of G = H / Hkv query heads (Hkv = 1 is multi-query
  attention, Shazeer 2019). The KV cache shrinks by the factor G.
- sliding window (Mistral; Beltagy et al. 2020): query t sees only the keys
  t-W+1..t, a banded causal mask; the KV cache keeps only W positions.
- RoPE (tinylm/nn/positions.py): q and k rotated by their positions.

Two implementations of the same attention, chosen by `attention`:
- "standard" (the default): `attend` below, (B, H, T, T) weights kept for backward;
- "flash": FlashAttention-2 (tinylm/nn/flash.py), the same numbers computed in
  (block_q, block_k) tiles, O(T) memory; tiles that the causal (banded) mask
  hides entirely are skipped. It asks `mask` only for the tiles the mask cuts
  through; when `mask` has been replaced (on the instance or in a subclass), it
  cannot know which tiles are invisible, so it visits and masks every tile.
  No attention dropout (a ValueError), and no `attention_weights` to plot.

How the groups are computed: query head h uses kv head h // G (as Hugging Face's
`repeat_kv`). Rather than copying each k and v G times, the G query heads of a
group are stacked along the time axis, (B, Hkv, G*T, hs), so one matmul per kv
head scores all of them. In backward the same matmuls sum the G heads'
gradients into the shared k and v: a value used twice gets the sum of both uses'
gradients.
"""

from __future__ import annotations

import math

import numpy as np

from tinylm.backend import to_device, xp_of
from tinylm.nn.activation import Dropout
from tinylm.nn.causal_blocks import RowBlocks, attend_blocks, attend_blocks_backward, use_blocks
from tinylm.nn.flash import DEFAULT_BLOCK, flash_backward, flash_forward
from tinylm.nn.functional import matmul, softmax, softmax_backward_fast, use_fast
from tinylm.nn.linear import Linear
from tinylm.nn.module import Module, init_rng
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


def attend(q, kT, v, mask, dropout=None):
    """The attention step both paths share: softmax(q k^T / sqrt(hs) + mask) v.

    q (B, Hkv, G*Tq, hs): the G query heads of each kv head stacked along time;
    kT (B, Hkv, hs, Tk); v (B, Hkv, Tk, hs); mask (Tq, Tk) additive, or None
    (every key visible). Returns y (B, Hkv, G*Tq, hs), the attention weights
    att (B, Hkv, G*Tq, Tk) (the softmax *output*, which its backward needs) and
    att_d, the weights after `dropout` (att itself without one).
    """
    B, Hkv, GTq, hs = q.shape
    att = matmul(q, kT)  # (B, Hkv, G*Tq, Tk) scores (matmul: a @ b, see functional.py)
    att *= 1.0 / math.sqrt(hs)  # keeps the scores' variance ~1 (Vaswani et al. 3.2.1)
    if mask is not None:
        Tq, Tk = mask.shape
        # the same (Tq, Tk) mask for each of the G stacked heads: add through a view
        att.reshape(B, Hkv, GTq // Tq, Tq, Tk)[...] += mask  # invisible -> -inf
    # over the keys; each row has a finite entry (a query always sees itself)
    softmax(att, out=att)  # (B, Hkv, G*Tq, Tk) weights, rows sum to 1
    att_d = att if dropout is None else dropout.forward(att)
    return matmul(att_d, v), att, att_d  # y (B, Hkv, G*Tq, hs)


class CausalSelfAttention(Module):
    """Sub-layers: `qkv` = Linear(C, (H + 2 Hkv) hs), `proj` = Linear(C, C); dropout on
    the attention weights and on the output (nanoGPT's attn_dropout/resid_dropout).
    With n_kv_heads = None (or = n_heads) `qkv` is GPT-2's Linear(C, 3C).

    Cache: q (B,Hkv,G*T,hs), k^T (B,Hkv,hs,T), v (B,Hkv,T,hs) (q and k after RoPE),
    the attention weights att (B,Hkv,G*T,T), i.e. the softmax *output* (its
    backward needs that, not the scores), and att after dropout (the same array
    when dropout is off).
    With attention="flash": q (B,Hkv,G,T,hs), k and v (B,Hkv,T,hs) (after RoPE),
    the output o (B,Hkv,G,T,hs) and each row's log-sum-exp L (B,Hkv,G,T), all O(T).
    """

    def __init__(self, d_model: int, n_heads: int, *, n_kv_heads: int | None = None,
                 bias: bool = True, dropout: float = 0.0, rope_theta: float | None = None,
                 max_positions: int | None = None, sliding_window: int | None = None,
                 attention: str = "standard", block_q: int = DEFAULT_BLOCK,
                 block_k: int = DEFAULT_BLOCK, rng=None):
        super().__init__()
        n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        if d_model % n_heads != 0:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        if n_kv_heads < 1 or n_heads % n_kv_heads != 0:
            raise ValueError(f"n_heads ({n_heads}) must be a multiple of n_kv_heads "
                             f"({n_kv_heads})")
        if sliding_window is not None and sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1 or None, got {sliding_window}")
        if attention not in ("standard", "flash"):
            raise ValueError(f"attention must be 'standard' or 'flash', got {attention!r}")
        if attention == "flash" and dropout > 0:
            raise ValueError(f"attention='flash' does not support attention dropout: dropout "
                             f"must be 0 (got {dropout}); use attention='standard' to train "
                             "with dropout")
        for name, size in (("block_q", block_q), ("block_k", block_k)):
            if isinstance(size, bool) or not isinstance(size, int) or size < 1:
                raise ValueError(f"{name} (a flash attention tile size) must be an int >= 1, "
                                 f"got {size!r}")
        rng = init_rng(rng)
        self.d_model, self.n_heads, self.head_size = d_model, n_heads, d_model // n_heads
        self.n_kv_heads, self.sliding_window = n_kv_heads, sliding_window
        self.attention, self.block_q, self.block_k = attention, block_q, block_k
        qkv_out = (n_heads + 2 * n_kv_heads) * self.head_size
        self.qkv = Linear(d_model, qkv_out, bias=bias, rng=rng)
        self.proj = Linear(d_model, d_model, bias=bias, rng=rng)
        self.attn_drop = Dropout(dropout, seed=rng.integers(2**32))
        self.resid_drop = Dropout(dropout, seed=rng.integers(2**32))
        self.rope = None
        if rope_theta is not None:
            if max_positions is None:
                raise ValueError("RoPE needs max_positions (the context length) for its tables")
            self.rope = RotaryEmbedding(self.head_size, max_positions, rope_theta)

    def extra_repr(self) -> str:
        parts = [f"heads={self.n_heads}"]
        if self.n_kv_heads != self.n_heads:
            parts.append(f"kv_heads={self.n_kv_heads}")
        if self.sliding_window is not None:
            parts.append(f"window={self.sliding_window}")
        if self.attention == "flash":
            parts.append(f"flash={self.block_q}x{self.block_k}")
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
        if self.attention == "flash":
            raise RuntimeError("attention='flash' never forms the attention weights; use "
                               "attention='standard' to look at them")
        att = self._cache[3]  # (B, Hkv, G*T, T)
        if isinstance(att, RowBlocks):  # the blocked fast path kept only the visible blocks
            q = self._cache[0]
            att = att.dense(xp_of(q), (*q.shape[:3], q.shape[2] // self.group_size))
        B, T = att.shape[0], att.shape[-1]
        return att.reshape(B, self.n_heads, T, T)  # query head h = kv head * G + g

    def mask(self, q_pos, k_pos, xp, dtype):
        """(Tq, Tk) additive mask for queries at positions q_pos and keys at k_pos:
        0 where the key is visible (not in the future, and within the sliding
        window if there is one), -inf elsewhere.

        The one place that decides what attention may see: `forward` and
        `forward_cached` both call it. Assign a function of the same signature
        to an instance's `mask` to experiment (for example, no mask at all)."""
        return attention_mask(q_pos, k_pos, self.sliding_window, xp, dtype)

    def causal_mask(self, T: int, xp, dtype):
        """(T, T) mask of a training forward over positions 0..T-1 (see `mask`)."""
        return self.mask(np.arange(T), np.arange(T), xp, dtype)

    @property
    def _own_mask(self) -> bool:
        """Whether `mask` is the built-in causal (banded) one. Skipping what it hides
        (flash's tiles, the row blocks' columns) is only right then: a replaced mask (an
        instance attribute, or a subclass's method) may show anything."""
        return "mask" not in vars(self) and type(self).mask is CausalSelfAttention.mask

    def _flash_kwargs(self, q_start: int = 0, k_start: int = 0) -> dict:
        """The tiles of flash_forward/flash_backward: those the causal band hides are
        skipped with the built-in `mask`; with a replaced one every tile is visited and
        masked with it."""
        return dict(q_start=q_start, k_start=k_start, block_q=self.block_q,
                    block_k=self.block_k, window=self.sliding_window,
                    causal_tiles=self._own_mask)

    def _split_heads(self, qkv, B: int, T: int):
        """(B, T, (H + 2 Hkv) hs) -> q (B, H, T, hs), k and v (B, Hkv, T, hs)."""
        H, Hkv, hs = self.n_heads, self.n_kv_heads, self.head_size
        q = qkv[..., :H * hs].reshape(B, T, H, hs).transpose(0, 2, 1, 3)
        k = qkv[..., H * hs:(H + Hkv) * hs].reshape(B, T, Hkv, hs).transpose(0, 2, 1, 3)
        v = qkv[..., (H + Hkv) * hs:].reshape(B, T, Hkv, hs).transpose(0, 2, 1, 3)
        return q, k, v

    def _merge_heads(self, y, B: int, T: int):
        """(B, Hkv, G*T, hs) grouped heads -> (B, T, C), the heads side by side."""
        return y.reshape(B, -1, T, self.head_size).transpose(0, 2, 1, 3).reshape(B, T, -1)

    def forward(self, x):
        xp = xp_of(x)
        B, T, C = x.shape
        Hkv, G, hs = self.n_kv_heads, self.group_size, self.head_size
        q, k, v = self._split_heads(self.qkv.forward(x), B, T)  # (B, H|Hkv, T, hs)
        if self.rope is not None:
            q, k = self.rope.rotate(q), self.rope.rotate(k)  # positions 0..T-1
        if self.attention == "flash":  # the same attention in tiles (tinylm/nn/flash.py)
            y = self._flash_forward(q, k, v)  # (B, Hkv, G, T, hs)
            return self.resid_drop.forward(self.proj.forward(self._merge_heads(y, B, T)))
        # Contiguous operands: batched matmuls on transposed views are several
        # times slower with multi-threaded OpenBLAS (CONTRIBUTING.md, benchmarks),
        # so pay one copy each. The G query heads of a group are stacked along
        # time: (B, H, T, hs) is (B, Hkv, G, T, hs) in memory, read as (B, Hkv, G*T, hs).
        q = xp.ascontiguousarray(q).reshape(B, Hkv, G * T, hs)  # (B, Hkv, G*T, hs)
        kT = xp.ascontiguousarray(k.transpose(0, 1, 3, 2))  # (B, Hkv, hs, T)
        v = xp.ascontiguousarray(v)  # (B, Hkv, T, hs)
        positions = np.arange(T)
        mask = self.mask(positions, positions, xp, x.dtype)  # (T, T)
        if self._own_mask and use_blocks(q, T, self.attn_drop):  # a fast path (NumPy, 1 thread)
            y, att = attend_blocks(q, kT, v, mask, self.sliding_window)  # skips hidden columns
            att_d = att
        else:
            y, att, att_d = attend(q, kT, v, mask, self.attn_drop)  # (B, Hkv, G*T, hs)
        self._cache = (q, kT, v, att, att_d)  # att_d is att itself without dropout
        return self.resid_drop.forward(self.proj.forward(self._merge_heads(y, B, T)))  # (B, T, C)

    def backward(self, dout):
        if self.attention == "flash":
            return self._flash_backward(dout)
        q, kT, v, att, att_d = self._take_cache()
        B, T, C = dout.shape
        H, Hkv, G, hs = self.n_heads, self.n_kv_heads, self.group_size, self.head_size
        dy = self._output_backward(dout).reshape(B, Hkv, G * T, hs)  # grouped, as y was
        if isinstance(att, RowBlocks):  # the forward took the row blocks: so does this
            dq, dk, dv = attend_blocks_backward(q, kT, v, att, dy)  # tinylm/nn/causal_blocks.py
            return self._qkv_backward(dq.reshape(B, H, T, hs), dk, dv)

        # y = att_d @ v  =>  datt_d = dy v^T,  dv = att_d^T dy
        # (dv sums over the G*T rows: every query head of the group used this v)
        datt_d = matmul(dy, _transposed(v))  # (B, Hkv, G*T, T)
        dv = matmul(att_d.swapaxes(-1, -2), dy)  # (B, Hkv, T, hs)
        datt = self.attn_drop.backward(datt_d)  # (B, Hkv, G*T, T), gradient of att

        # softmax backward: dscore = att * (datt - sum_j datt_j att_j), then the scale
        # (masked entries have att = 0, so they get no gradient: nothing from the future)
        if use_fast(att, datt) and att.flags.c_contiguous and datt.flags.c_contiguous:
            dscore = softmax_backward_fast(att, datt, 1.0 / math.sqrt(hs))  # the same, chunked
        else:
            dscore = datt
            dscore -= (datt * att).sum(axis=-1, keepdims=True)
            dscore *= att
            dscore *= 1.0 / math.sqrt(hs)

        # scores = q @ k^T  =>  dq = dscore k,  dk^T = q^T dscore (summed over the group)
        dq = matmul(dscore, _transposed(kT)).reshape(B, H, T, hs)  # (B, H, T, hs)
        dk = matmul(dscore.swapaxes(-1, -2), q)  # (B, Hkv, T, hs)
        return self._qkv_backward(dq, dk, dv)  # (B, T, C)

    def _output_backward(self, dout):
        """dout (B, T, C) -> dy (B, H, T, hs), contiguous: back through the output
        dropout, `proj` and the merge of the heads (the forward's last three steps)."""
        B, T, C = dout.shape
        dy = self.proj.backward(self.resid_drop.backward(dout))  # (B, T, C)
        dy = dy.reshape(B, T, self.n_heads, self.head_size).transpose(0, 2, 1, 3)
        return xp_of(dy).ascontiguousarray(dy)  # (B, H, T, hs)

    def _qkv_backward(self, dq, dk, dv):
        """dq (B, H, T, hs), dk and dv (B, Hkv, T, hs) -> dx (B, T, C): back through RoPE,
        the head split and `qkv` (the forward's first three steps)."""
        if self.rope is not None:  # q, k were rotated: rotate their gradients back
            dq, dk = self.rope.rotate(dq, inverse=True), self.rope.rotate(dk, inverse=True)
        # (B, heads, T, hs) -> (B, T, heads * hs) each, then side by side as [q | k | v]
        dqkv = xp_of(dq).concatenate([_heads_last(dq), _heads_last(dk), _heads_last(dv)],
                                     axis=-1)
        return self.qkv.backward(dqkv)  # (B, T, C)

    # -- attention="flash": the same steps with flash.py in the middle ---------

    def _flash_forward(self, q, k, v):
        """q (B, H, T, hs), k and v (B, Hkv, T, hs), after RoPE -> y (B, Hkv, G, T, hs).
        Keeps q, k, v (contiguous), the output and its log-sum-exp L: O(T) each."""
        xp = xp_of(q)
        B, H, T, hs = q.shape
        Hkv, G = self.n_kv_heads, self.group_size
        # (B, H, T, hs) is (B, Hkv, G, T, hs) in memory: query head h = kv head * G + g
        q = xp.ascontiguousarray(q).reshape(B, Hkv, G, T, hs)  # (B, Hkv, G, T, hs)
        k, v = xp.ascontiguousarray(k), xp.ascontiguousarray(v)  # (B, Hkv, T, hs)
        o, lse = flash_forward(q, k, v, self.mask, **self._flash_kwargs())  # Algorithm 1
        self._cache = (q, k, v, o, lse)
        return o  # (B, Hkv, G, T, hs)

    def _flash_backward(self, dout):
        """dout (B, T, C) -> dx (B, T, C), with Algorithm 2 between the projections."""
        q, k, v, o, lse = self._take_cache()
        B, T, C = dout.shape
        H, Hkv, G, hs = self.n_heads, self.n_kv_heads, self.group_size, self.head_size
        dy = self._output_backward(dout).reshape(B, Hkv, G, T, hs)  # grouped, as o was
        dq, dk, dv = flash_backward(q, k, v, o, lse, dy, self.mask, **self._flash_kwargs())
        return self._qkv_backward(dq.reshape(B, H, T, hs), dk, dv)  # (B, T, C)

    # -- inference with a KV cache (tinylm/nn/kv_cache.py) -------------------

    def forward_cached(self, x, cache, layer: int, pos: int):
        """Inference only: x (B, t, C) holds positions pos..pos+t-1; the keys and
        values of earlier positions are in `cache` (a KVCache), layer `layer`.

        Adds this chunk's k, v to the cache (keys after RoPE: a cached key keeps
        the rotation of its own position) and attends over the keys the cache
        returns, through the same `mask` and `attend` as `forward`, in true
        positions, so the outputs equal its rows pos..pos+t-1. t = 1 is one
        decoding step, a larger t at pos = 0 the prefill of a prompt. Keeps no
        backward cache and applies no dropout (the caller is in eval mode).

        With attention="flash" the t queries go through `flash_forward` in true
        positions as well (a decoding step is one query tile against the cached
        key tiles; a long prefill never forms its (t, n) weights).
        """
        xp = xp_of(x)
        B, t, C = x.shape
        Hkv, G, hs = self.n_kv_heads, self.group_size, self.head_size
        q, k, v = self._split_heads(self.qkv.forward(x), B, t)  # (B, H|Hkv, t, hs)
        if self.rope is not None:
            q, k = self.rope.rotate(q, pos), self.rope.rotate(k, pos)  # true positions
        k, v, first = cache.update(layer, k, v, pos)  # (B, Hkv, n, hs): positions first..pos+t-1
        n = k.shape[2]
        if self.attention == "flash":
            q = xp.ascontiguousarray(q).reshape(B, Hkv, G, t, hs)  # (B, Hkv, G, t, hs)
            y, _ = flash_forward(q, k, v, self.mask, **self._flash_kwargs(pos, first))
            return self.proj.forward(self._merge_heads(y, B, t))  # (B, t, C)
        q = xp.ascontiguousarray(q).reshape(B, Hkv, G * t, hs)  # (B, Hkv, G*t, hs)
        mask = self.mask(np.arange(pos, pos + t), np.arange(first, first + n), xp, x.dtype)
        y, _, _ = attend(q, k.swapaxes(-1, -2), v, mask)  # (B, Hkv, G*t, hs)
        return self.proj.forward(self._merge_heads(y, B, t))  # (B, t, C)


def _heads_last(a):
    """(B, heads, T, hs) -> (B, T, heads * hs): the inverse of the head split."""
    B, n, T, hs = a.shape
    return a.transpose(0, 2, 1, 3).reshape(B, T, n * hs)


def _transposed(a):
    """a with its last two axes swapped, as a contiguous copy (..., n, m) -> (..., m, n).

    Same values as `a.swapaxes(-1, -2)`; the copy is for speed only. At the small
    config's shape a stacked matmul whose *right* operand is a transposed (T, hs) view
    ran 1.3x slower than the copy and the product together (docs/backends.md). A
    transposed (T, T) *left* operand (att_d^T, dscore^T) runs as fast as a view, and
    copying it costs more than the product, so the backward passes those as views."""
    return xp_of(a).ascontiguousarray(a.swapaxes(-1, -2))
