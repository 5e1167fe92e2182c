"""Causal attention in row blocks: the scores above the diagonal blocks are never formed.

A fast path of `attend` and of the standard backward (tinylm/nn/attention.py), for the
training forward, where queries and keys are the same positions 0..T-1. Query t sees
keys 0..t only, so cut the T queries into n row blocks: block [a, b) needs the key
columns [k0, b), with k0 = 0 (causal) or a - W + 1 (a sliding window W). Every column
it skips is masked for all of its rows: -inf before the softmax, exactly 0 after it, and
nothing in any product. So each block computes its scores, softmax and products over
b - k0 columns instead of T, and for n blocks the causal mask leaves (n + 1) / 2n of
the work: 5/8 for n = 4. The numbers are those of `attend` up to rounding (a row's
softmax sees the same visible scores; a product's sum is cut into other pieces).

    block i (queries a..b-1):  S = q[a:b] k[k0:b]^T / sqrt(hs) + M[a:b, k0:b]
                               P = softmax(S);  y[a:b] = P v[k0:b]
    backward, block by block:  dP = dy[a:b] v[k0:b]^T,  dv[k0:b] += P^T dy[a:b]
                               dS = P (dP - rowsum(dP P)) / sqrt(hs)
                               dq[a:b] = dS k[k0:b],  dk[k0:b] += dS^T q[a:b]

When it is used (`use_blocks`): NumPy, one thread, T of at least 2 * MIN_BLOCK, the
layer's own mask, no attention dropout. Measured with benchmarks/bench_attention_parts.py,
the core of one layer's forward and backward, 1 thread: the small config's shape (B 16,
4 heads, T 128, hs 32) 7.06 -> 6.35 ms; the medium config's (B 8, 6 heads, T 256, hs 64)
40.9 -> 29.6 ms. With two threads tinylm splits each stack of products between them
instead (`functional.matmul`), and the blocks' smaller pieces made that slower (small:
4.03 -> 5.81 ms), so the blocks are for one thread only.
"""

from __future__ import annotations

import math

import numpy as np  # NumPy only: see use_blocks

from tinylm.nn.functional import num_threads, softmax, softmax_backward_fast, use_fast

N_BLOCKS = 4  # row blocks: (n + 1) / 2n of the work; more blocks, smaller products
MIN_BLOCK = 32  # rows: smaller products lose more to BLAS overhead than the mask saves


def use_blocks(q, T: int, dropout) -> bool:
    """Whether the standard forward should take the row blocks: see the module doc.
    (The caller checks that the mask is the layer's own causal one.)"""
    return (use_fast(q) and num_threads() == 1 and T >= 2 * MIN_BLOCK
            and (dropout is None or dropout.p == 0.0 or not dropout.training))


def row_blocks(T: int, window: int | None) -> list[tuple[int, int, int]]:
    """[(a, b, k0)]: N_BLOCKS query rows [a, b) covering 0..T-1, and the first key k0
    each needs (the causal mask hides keys >= b; a window W hides keys < a - W + 1)."""
    n = min(N_BLOCKS, T // MIN_BLOCK)
    bounds = [T * i // n for i in range(n + 1)]
    return [(a, b, 0 if window is None else max(0, a - window + 1))
            for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


class RowBlocks(list):
    """The attention weights of a blocked forward: [(a, b, k0, P)] with P the softmax
    weights (B, Hkv, G, b - a, b - k0) of queries a..b-1 over keys k0..b-1."""

    def dense(self, xp, shape):
        """The (B, Hkv, G*T, T) weights `attend` would have kept (zeros elsewhere)."""
        B, Hkv, GT, T = shape
        att = xp.zeros((B, Hkv, GT // T, T, T), dtype=self[0][3].dtype)
        for a, b, k0, p in self:
            att[:, :, :, a:b, k0:b] = p
        return att.reshape(shape)


def attend_blocks(q, kT, v, mask, window: int | None):
    """`attend(q, kT, v, mask)` for a training forward, in row blocks.

    q (B, Hkv, G*T, hs), kT (B, Hkv, hs, T), v (B, Hkv, T, hs), mask (T, T) the
    layer's causal (banded) mask. Returns y (B, Hkv, G*T, hs) and the RowBlocks."""
    B, Hkv, GT, hs = q.shape
    T = v.shape[2]
    scale = 1.0 / math.sqrt(hs)
    q5 = q.reshape(B, Hkv, GT // T, T, hs)  # (B, Hkv, G, T, hs): the G heads apart
    y5 = np.empty_like(q5)  # (B, Hkv, G, T, hs)
    blocks = RowBlocks()
    for a, b, k0 in row_blocks(T, window):
        s = q5[:, :, :, a:b] @ kT[:, :, None, :, k0:b]  # (B, Hkv, G, b-a, b-k0) scores
        s *= scale
        s += mask[a:b, k0:b]  # the diagonal block's future -> -inf
        softmax(s, out=s)  # (B, Hkv, G, b-a, b-k0) weights
        y5[:, :, :, a:b] = s @ v[:, :, None, k0:b]  # (B, Hkv, G, b-a, hs)
        blocks.append((a, b, k0, s))
    return y5.reshape(q.shape), blocks


def attend_blocks_backward(q, kT, v, blocks: RowBlocks, dy):
    """The standard backward's middle (attention.py, B7 to B3) for `attend_blocks`.

    dy (B, Hkv, G*T, hs) -> dq (B, Hkv, G*T, hs), dk and dv (B, Hkv, T, hs); dk and dv
    sum over the G query heads of their group and over the blocks that saw them."""
    B, Hkv, GT, hs = q.shape
    T = v.shape[2]
    G = GT // T
    scale = 1.0 / math.sqrt(hs)
    q5, dy5 = q.reshape(B, Hkv, G, T, hs), dy.reshape(B, Hkv, G, T, hs)
    k, vT = kT.swapaxes(-1, -2), v.swapaxes(-1, -2)  # (B, Hkv, T, hs), (B, Hkv, hs, T)
    dq5 = np.empty_like(q5)  # (B, Hkv, G, T, hs)
    dk, dv = np.zeros_like(v), np.zeros_like(v)  # (B, Hkv, T, hs)
    for a, b, k0, p in blocks:
        dy_b = dy5[:, :, :, a:b]  # (B, Hkv, G, b-a, hs)
        dp = dy_b @ vT[:, :, None, :, k0:b]  # (B, Hkv, G, b-a, b-k0)
        dv[:, :, k0:b] += (p.swapaxes(-1, -2) @ dy_b).sum(axis=2)  # over the G heads
        if use_fast(p, dp):  # softmax backward and scale, chunked (functional.py)
            ds = softmax_backward_fast(p, dp, scale)
        else:
            ds = dp
            ds -= (dp * p).sum(axis=-1, keepdims=True)
            ds *= p
            ds *= scale
        dq5[:, :, :, a:b] = ds @ k[:, :, None, k0:b]  # (B, Hkv, G, b-a, hs)
        dk[:, :, k0:b] += (ds.swapaxes(-1, -2) @ q5[:, :, :, a:b]).sum(axis=2)
    return dq5.reshape(q.shape), dk, dv
