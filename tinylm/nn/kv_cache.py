"""The key/value cache for fast generation (inference only).

Without a cache, generating token n+1 runs the whole model over all n tokens
again, although the keys and values of tokens 1..n did not change: with a causal
mask, position t's hidden states depend only on tokens <= t. The cache keeps
every layer's keys and values, so each new token only computes its own q, k, v
and attends over the stored ones: O(T) work per token instead of O(T^2).

    k[layer], v[layer]    (B, H, L, hs) preallocated, L = context_length
    pos                   positions 0..pos-1 are filled

`CausalSelfAttention.forward_cached` writes new keys/values at [pos:pos+t] and
reads [0:pos+t]; `GPT.forward_cached` advances `pos` once all layers are done.
Buffers are allocated once, in the model's dtype on its device, and never grow:
positions beyond the context do not exist for a model with learned position
embeddings (what happens when the window slides: see `tinylm/sampling.py`).
"""

from __future__ import annotations

import numpy as np

from tinylm.backend import to_device, xp_of


class KVCache:
    """Per-layer key and value buffers of shape (B, H, L, hs)."""

    def __init__(self, n_layers: int, batch_size: int, n_heads: int, context_length: int,
                 head_size: int, *, xp, dtype):
        shape = (batch_size, n_heads, context_length, head_size)  # (B, H, L, hs)
        # zeros, not empty: the unfilled tail is never read, but a cache that is
        # printed or inspected in a notebook should not show garbage
        self.k = [xp.zeros(shape, dtype=dtype) for _ in range(n_layers)]  # (B, H, L, hs) each
        self.v = [xp.zeros(shape, dtype=dtype) for _ in range(n_layers)]  # (B, H, L, hs) each
        self.context_length = context_length
        self.pos = 0  # number of filled positions

    @classmethod
    def for_model(cls, model, batch_size: int) -> KVCache:
        """An empty cache sized for `model` (a GPT) and `batch_size` sequences."""
        cfg = model.config
        return cls(cfg.n_layers, batch_size, cfg.n_heads, cfg.context_length, cfg.head_size,
                   xp=model.xp, dtype=model.dtype)

    @property
    def batch_size(self) -> int:
        return self.k[0].shape[0]

    @property
    def free(self) -> int:
        """How many more positions fit."""
        return self.context_length - self.pos

    def reset(self) -> None:
        """Forget every position (the buffers are kept and overwritten later)."""
        self.pos = 0

    def reorder(self, rows) -> None:
        """Keep row rows[i] as the new row i (beam search: each surviving beam
        continues from the cache of the beam it extends). `rows` (B,) ints on the host."""
        rows = to_device(np.asarray(rows), xp_of(self.k[0]))  # (B,)
        p = self.pos
        for k, v in zip(self.k, self.v, strict=True):
            # the gather on the right makes a copy first, so writing it back in
            # place is safe even when two new rows share a parent; only the
            # filled positions are moved, and the buffers keep their identity
            k[:, :, :p] = k[rows, :, :p]  # (B, H, pos, hs)
            v[:, :, :p] = v[rows, :, :p]  # (B, H, pos, hs)

    def nbytes(self) -> int:
        """Memory held by the buffers: 2 * n_layers * B * H * L * hs * itemsize."""
        return sum(int(a.nbytes) for a in self.k + self.v)
