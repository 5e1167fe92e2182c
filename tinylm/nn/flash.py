"""FlashAttention-2 (Dao 2023, Algorithms 1 and 2): exact attention in tiles, O(T) memory.

The standard path (`attend` in tinylm/nn/attention.py) forms the (T, T) scores of
every head, and its backward keeps the (T, T) softmax weights: memory grows as T^2.
Flash attention computes the same numbers one (block_q, block_k) tile of scores at
a time and never holds more than a tile of them:

  forward (Algorithm 1): for a tile of queries, loop over the key/value tiles
    with a running row max m and row sum l of exp(s - m). When a new tile raises
    the max, the sum and the output accumulator so far are rescaled by
    exp(m_old - m_new), so at the end acc / l = softmax(s) v exactly (the
    "online softmax", Milakov & Gimelshein 2018). Kept for backward: the
    output O and one number per query row, L = m + log(l), the log-sum-exp.
  backward (Algorithm 2): D = rowsum(dO * O) once, then for each tile the
    weights are recomputed from L, P = exp(s - L), without any row sum, and
    dV, dK, dQ are accumulated tile by tile.

Extra memory: O, L, D and the gradients, all O(T) per head, plus tile-sized
temporaries (B, Hkv, G*block_q, block_k). The price is recomputing the scores
in backward (about one more q k^T per tile).

Layout. q is (B, Hkv, G, Tq, hs): the G query heads that share each kv head. A
query tile takes positions q_lo..q_hi-1 of all G heads and stacks them along
rows, (B, Hkv, G*bq, hs), as `attend` stacks whole heads: one batched matmul
over (B, Hkv) scores the whole group against the shared key tile, and the
transposed products (dK, dV) sum the G heads' contributions inside the matmul.
Each tile step is a batched matmul over (B, Hkv); Python loops only over tiles.

Which tiles. With the built-in causal mask (and optional sliding window W), a
tile is one of (`tile_kind`): SKIP, every key invisible to every query (above
the diagonal, or entirely before the band): never visited, not masked; FULL,
every key visible to every query: computed without a mask; PART: computed and
masked with the layer's `mask(q_pos, k_pos, xp, dtype)` for that tile's
positions. With `causal_tiles=False` (the layer passes it when its `mask` was
replaced) nothing is assumed: every tile is visited and masked.

Rows that see nothing yet. A query row of a visited tile may have all its keys
masked there (a window narrower than the tile, or a replaced mask), so its
running max can still be -inf; the exponentials then use 0 instead of m, which
makes their terms exactly 0 instead of exp(-inf + inf) = NaN.

The paper's algorithms omit the 1/sqrt(hs) scale and the mask; here S is the
scaled, masked score, as in `attend`. Its line 10 of Algorithm 1 shows
diag(e^{m_old - m_new})^{-1}; the factor that rescales the accumulator is
e^{m_old - m_new} itself (as in its line 9 for l), which is what we use.
"""

from __future__ import annotations

import math

import numpy as np

from tinylm.backend import xp_of

DEFAULT_BLOCK = 128  # big tiles: fewer Python steps in NumPy; still O(T) memory

SKIP, FULL, PART = 0, 1, 2  # tile kinds: not visited, visited unmasked, visited and masked


def tile_kind(q_first: int, q_last: int, k_first: int, k_last: int,
              window: int | None) -> int:
    """SKIP, FULL or PART for the tile of query positions q_first..q_last and key
    positions k_first..k_last (inclusive) under the causal mask, banded to the
    last `window` positions when a window is given (see `attention_mask`)."""
    if k_first > q_last:  # every key after every query: the future
        return SKIP
    if window is not None and q_first - k_last >= window:  # every key before every band
        return SKIP
    if k_last <= q_first and (window is None or q_last - k_first < window):
        return FULL  # the earliest query sees the last key, the latest query the first
    return PART


def tile_grid(Tq: int, Tk: int, block_q: int, block_k: int, *, q_start: int = 0,
              k_start: int = 0, window: int | None = None, causal_tiles: bool = True):
    """(ceil(Tq/block_q), ceil(Tk/block_k)) host array of tile kinds: the plan both
    passes follow, for queries at positions q_start.. and keys at k_start..."""
    nq, nk = -(-Tq // block_q), -(-Tk // block_k)
    grid = np.full((nq, nk), PART, dtype=np.int8)  # (nq, nk)
    if causal_tiles:
        for i in range(nq):
            for j in range(nk):
                q_lo, k_lo = i * block_q, j * block_k
                q_hi, k_hi = min(q_lo + block_q, Tq), min(k_lo + block_k, Tk)
                grid[i, j] = tile_kind(q_start + q_lo, q_start + q_hi - 1,
                                       k_start + k_lo, k_start + k_hi - 1, window)
    return grid


def flash_forward(q, k, v, mask, *, q_start: int = 0, k_start: int = 0,
                  block_q: int = DEFAULT_BLOCK, block_k: int = DEFAULT_BLOCK,
                  window: int | None = None, causal_tiles: bool = True):
    """Algorithm 1: O = softmax(q k^T / sqrt(hs) + M) v without forming the scores.

    q (B, Hkv, G, Tq, hs) at positions q_start..; k, v (B, Hkv, Tk, hs) at positions
    k_start..; `mask(q_pos, k_pos, xp, dtype)` builds the (bq, bk) additive mask
    of a PART tile (host position arrays in). Returns O (B, Hkv, G, Tq, hs) and
    L (B, Hkv, G, Tq), each row's log-sum-exp of its scaled, masked scores.
    """
    xp = xp_of(q)
    B, Hkv, G, Tq, hs = q.shape
    Tk = k.shape[2]
    scale = 1.0 / math.sqrt(hs)
    grid = tile_grid(Tq, Tk, block_q, block_k, q_start=q_start, k_start=k_start,
                     window=window, causal_tiles=causal_tiles)  # (nq, nk)
    kT = xp.ascontiguousarray(k.swapaxes(-1, -2))  # (B, Hkv, hs, Tk): one copy, O(T)
    o = xp.empty_like(q)  # (B, Hkv, G, Tq, hs)
    lse = xp.empty(q.shape[:-1], dtype=q.dtype)  # (B, Hkv, G, Tq)
    for i, q_lo in enumerate(range(0, Tq, block_q)):  # line 3: one query tile at a time
        q_hi = min(q_lo + block_q, Tq)
        bq = q_hi - q_lo
        q_i = _rows(q, q_lo, q_hi)  # line 4: (B, Hkv, G*bq, hs), the group stacked
        # line 5: O_i = 0, l_i = 0, m_i = -inf (one running max and sum per row)
        acc = xp.zeros_like(q_i)  # (B, Hkv, G*bq, hs) output, not yet divided by l
        row_sum = xp.zeros((B, Hkv, G * bq, 1), dtype=q.dtype)  # (B, Hkv, G*bq, 1) l
        row_max = xp.full((B, Hkv, G * bq, 1), -math.inf, dtype=q.dtype)  # m
        for j, k_lo in enumerate(range(0, Tk, block_k)):  # line 6: over key/value tiles
            if grid[i, j] == SKIP:
                continue  # nothing visible: not even computed
            k_hi = min(k_lo + block_k, Tk)
            # lines 7-8: S_ij = Q_i K_j^T (scaled, and masked where only part is visible)
            s = _scores(q_i, kT[..., k_lo:k_hi], scale, mask, grid[i, j], G,
                        q_start + q_lo, q_start + q_hi, k_start + k_lo, k_start + k_hi)
            # line 9: m_new = max(m_old, rowmax(S)), P~ = exp(S - m_new),
            #         l = e^(m_old - m_new) l + rowsum(P~)
            new_max = xp.maximum(row_max, s.max(axis=-1, keepdims=True))  # (B, Hkv, G*bq, 1)
            shift = _finite(new_max)  # 0 for rows that saw no key yet (their terms are 0)
            s -= shift
            p = xp.exp(s, out=s)  # (B, Hkv, G*bq, bk) P~, in the scores' buffer
            rescale = xp.exp(row_max - shift)  # (B, Hkv, G*bq, 1) e^(m_old - m_new)
            row_sum *= rescale
            row_sum += p.sum(axis=-1, keepdims=True)
            # line 10: O_i = e^(m_old - m_new) O_i + P~ V_j (the old terms, re-based)
            acc *= rescale
            acc += p @ v[:, :, k_lo:k_hi]  # (B, Hkv, G*bq, hs)
            row_max = new_max
        # lines 12-15: O_i = O_i / l, L_i = m + log(l); written to their rows
        acc /= row_sum
        o[:, :, :, q_lo:q_hi] = acc.reshape(B, Hkv, G, bq, hs)
        lse[:, :, :, q_lo:q_hi] = (row_max + xp.log(row_sum)).reshape(B, Hkv, G, bq)
    return o, lse


def flash_backward(q, k, v, o, lse, do, mask, *, q_start: int = 0, k_start: int = 0,
                   block_q: int = DEFAULT_BLOCK, block_k: int = DEFAULT_BLOCK,
                   window: int | None = None, causal_tiles: bool = True):
    """Algorithm 2: the gradients of `flash_forward`, recomputing the weights per tile.

    q, o, do (B, Hkv, G, Tq, hs); k, v (B, Hkv, Tk, hs); lse (B, Hkv, G, Tq) as
    `flash_forward` returned it; the same tiles (same keyword arguments). Returns
    dq (B, Hkv, G, Tq, hs), dk and dv (B, Hkv, Tk, hs).
    """
    xp = xp_of(q)
    B, Hkv, G, Tq, hs = q.shape
    Tk = k.shape[2]
    scale = 1.0 / math.sqrt(hs)
    grid = tile_grid(Tq, Tk, block_q, block_k, q_start=q_start, k_start=k_start,
                     window=window, causal_tiles=causal_tiles)  # (nq, nk)
    kT = xp.ascontiguousarray(k.swapaxes(-1, -2))  # (B, Hkv, hs, Tk)
    vT = xp.ascontiguousarray(v.swapaxes(-1, -2))  # (B, Hkv, hs, Tk)
    # line 4: D = rowsum(dO * O), which equals rowsum(dP * P) (docs/backprop.md, "Flash attention")
    D = (do * o).sum(axis=-1)  # (B, Hkv, G, Tq)
    dq = xp.zeros_like(q)  # line 3: (B, Hkv, G, Tq, hs), accumulated over key tiles
    dk = xp.empty_like(k)  # (B, Hkv, Tk, hs), one key tile at a time
    dv = xp.empty_like(v)  # (B, Hkv, Tk, hs)
    for j, k_lo in enumerate(range(0, Tk, block_k)):  # line 5: one key/value tile at a time
        k_hi = min(k_lo + block_k, Tk)
        bk = k_hi - k_lo
        # lines 6-7: K_j, V_j, and dK_j = dV_j = 0
        dk_j = xp.zeros((B, Hkv, bk, hs), dtype=k.dtype)  # (B, Hkv, bk, hs)
        dv_j = xp.zeros((B, Hkv, bk, hs), dtype=v.dtype)  # (B, Hkv, bk, hs)
        for i, q_lo in enumerate(range(0, Tq, block_q)):  # line 8: over query tiles
            if grid[i, j] == SKIP:
                continue  # all weights 0 here: no gradient to add
            q_hi = min(q_lo + block_q, Tq)
            # line 9: Q_i, dO_i, L_i, D_i (the G heads stacked along rows, as in forward)
            q_i, do_i = _rows(q, q_lo, q_hi), _rows(do, q_lo, q_hi)  # (B, Hkv, G*bq, hs)
            lse_i = _rows(lse[..., None], q_lo, q_hi)  # (B, Hkv, G*bq, 1)
            D_i = _rows(D[..., None], q_lo, q_hi)  # (B, Hkv, G*bq, 1)
            # line 10: S_ij = Q_i K_j^T, the same scaled, masked scores as in forward
            s = _scores(q_i, kT[..., k_lo:k_hi], scale, mask, grid[i, j], G,
                        q_start + q_lo, q_start + q_hi, k_start + k_lo, k_start + k_hi)
            # line 11: P_ij = exp(S_ij - L_i): the final softmax weights, no row sum needed
            s -= lse_i
            p = xp.exp(s, out=s)  # (B, Hkv, G*bq, bk)
            # line 12: dV_j += P_ij^T dO_i (summed over the G*bq rows: every head of the group)
            dv_j += _transposed(p) @ do_i  # (B, Hkv, bk, hs)
            # line 13: dP_ij = dO_i V_j^T
            dp = do_i @ vT[..., k_lo:k_hi]  # (B, Hkv, G*bq, bk)
            # line 14: dS_ij = P_ij * (dP_ij - D_i), the softmax backward; times the scale
            dp -= D_i
            dp *= p
            ds = dp  # (B, Hkv, G*bq, bk), zero where masked (P is 0 there)
            ds *= scale
            # line 15: dQ_i += dS_ij K_j, into the rows of this query tile
            dq_i = ds @ k[:, :, k_lo:k_hi]  # (B, Hkv, G*bq, hs)
            dq[:, :, :, q_lo:q_hi] += dq_i.reshape(B, Hkv, G, q_hi - q_lo, hs)
            # line 16: dK_j += dS_ij^T Q_i (summed over the group, as dV_j)
            dk_j += _transposed(ds) @ q_i  # (B, Hkv, bk, hs)
        # line 18: write dK_j, dV_j
        dk[:, :, k_lo:k_hi] = dk_j
        dv[:, :, k_lo:k_hi] = dv_j
    return dq, dk, dv


def _rows(a, lo: int, hi: int):
    """Rows lo..hi-1 of every head of a (B, Hkv, G, T, n) array, the G heads stacked:
    (B, Hkv, G*(hi-lo), n). A view when G = 1, a tile-sized copy otherwise."""
    B, Hkv, G, _, n = a.shape
    return a[:, :, :, lo:hi].reshape(B, Hkv, G * (hi - lo), n)


def _scores(q_i, kT_j, scale: float, mask, kind: int, G: int,
            q_lo: int, q_hi: int, k_lo: int, k_hi: int):
    """(B, Hkv, G*bq, bk) scores q_i k_j^T / sqrt(hs), plus the mask of positions
    q_lo..q_hi-1 against k_lo..k_hi-1 when the tile is only partly visible."""
    s = q_i @ kT_j  # (B, Hkv, G*bq, bk)
    s *= scale  # as in `attend`: the scale first, then the mask
    if kind == PART:
        xp = xp_of(s)
        B, Hkv, GBq, bk = s.shape
        m = mask(np.arange(q_lo, q_hi), np.arange(k_lo, k_hi), xp, s.dtype)  # (bq, bk)
        # the same mask for each of the G stacked heads: add through a view
        s.reshape(B, Hkv, G, GBq // G, bk)[...] += m
    return s


def _finite(row_max):
    """The row max to subtract before exp: itself, or 0 where it is still -inf (no
    visible key yet), so that exp gives 0 there instead of NaN."""
    xp = xp_of(row_max)
    return xp.where(xp.isneginf(row_max), 0.0, row_max).astype(row_max.dtype, copy=False)


def _transposed(a):
    """a with its last two axes swapped, as a contiguous (tile-sized) copy: batched
    matmuls on transposed views are slow with multi-threaded OpenBLAS."""
    return xp_of(a).ascontiguousarray(a.swapaxes(-1, -2))
