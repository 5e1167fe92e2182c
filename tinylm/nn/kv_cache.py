"""The key/value cache for fast generation (inference only).

Without a cache, generating token n+1 runs the whole model over all n tokens
again, although the keys and values of tokens 1..n did not change: with a causal
mask, position t's hidden states depend only on tokens <= t. The cache keeps
every layer's keys and values, so each new token only computes its own q, k, v
and attends over the stored ones: O(T) work per token instead of O(T^2).

    k[layer], v[layer]    (B, Hkv, S, hs) preallocated; Hkv key/value heads (fewer than
                          the query heads with grouped-query attention), S slots
    pos                   positions 0..pos-1 have been seen

S is the context length, or the sliding window W when the model has one: a
query then never looks further back than W-1 positions, so older keys can go.
The buffers always hold the last min(pos, S) positions, oldest first.
`KVCache.update` (called by `CausalSelfAttention.forward_cached`) adds a
chunk's keys and values and returns every key the chunk's queries may need;
`GPT.forward_cached` advances `pos` once all layers are done. Keys are stored
after RoPE: a key's rotation depends only on its own position, which never
changes. Buffers are allocated once, in the model's dtype on its device, and
never grow: positions beyond the context do not exist for a model with learned
position embeddings (what happens when the window slides: see `Decoder` in tinylm/decoding.py).

A *rolling* cache (`rolling=True`, for pos="rope" or "none" only) goes on past the
context instead: it holds the last T-1 positions (T the context), so that with the
new token attention sees T of them, as a forward over the last T tokens does, and
`GPT.forward_cached` renumbers the held positions as the window slides. That is
exact (equal to the cropped forward up to rounding) only where no cached key
depends on a token that has left the window: layer 0's keys always, so a 1-layer
model; or a sliding window W with n_layers * (W - 1) < T. A deeper layer's key
was computed while older tokens were still in view, so elsewhere a rolling cache
is an approximation (a longer effective context than T), traded for speed.

Memory: 2 (k and v) x n_layers x B x Hkv x S x hs x bytes per number.
"""

from __future__ import annotations

import numpy as np

from tinylm.backend import to_device, xp_of


class KVCache:
    """Per-layer key and value buffers of shape (B, Hkv, S, hs)."""

    def __init__(self, n_layers: int, batch_size: int, n_kv_heads: int, context_length: int,
                 head_size: int, *, window: int | None = None, rolling: bool = False, xp,
                 dtype):
        self.context_length = context_length
        self.rolling = rolling
        # a rolling cache keeps T-1 positions: with the new one, the T of the window
        limit = context_length - 1 if rolling else context_length
        self.slots = limit if window is None else min(window, limit)  # S
        shape = (batch_size, n_kv_heads, self.slots, head_size)  # (B, Hkv, S, hs)
        # zeros, not empty: the unfilled tail is never read, but a cache that is
        # printed or inspected in a notebook should not show garbage
        self.k = [xp.zeros(shape, dtype=dtype) for _ in range(n_layers)]  # (B, Hkv, S, hs) each
        self.v = [xp.zeros(shape, dtype=dtype) for _ in range(n_layers)]  # (B, Hkv, S, hs) each
        self.pos = 0  # number of positions seen (a rolling cache renumbers them)
        # (model, its layers): GPT.forward_cached clears every layer's backward cache
        # after each call; listing the layer tree costs more than a small model's
        # decoding step, so it is listed once per KVCache (one cache, one model)
        self.layers = None

    @classmethod
    def for_model(cls, model, batch_size: int, *, rolling: bool = False) -> KVCache:
        """An empty cache sized for `model` (a GPT) and `batch_size` sequences.
        `rolling=True`: a rolling cache (see the module docstring), which needs
        positions that only act through offsets (pos="rope" or "none")."""
        cfg = model.config
        if rolling and cfg.pos not in ("rope", "none"):
            raise ValueError(f"a rolling KV cache needs pos='rope' or pos='none' (positions "
                             f"seen only through offsets), not pos={cfg.pos!r}: absolute "
                             "positions past the context do not exist")
        return cls(cfg.n_layers, batch_size, cfg.kv_heads, cfg.context_length, cfg.head_size,
                   window=cfg.sliding_window, rolling=rolling, xp=model.xp, dtype=model.dtype)

    @property
    def held(self) -> int:
        """How many positions the buffers hold now: the last `held` of the `pos` seen."""
        return min(self.pos, self.slots)

    def update(self, layer: int, k, v, pos: int):
        """Add keys and values k, v (B, Hkv, t, hs) of positions pos..pos+t-1 to `layer`;
        return (keys, values, first): every key from position `first` to pos+t-1,
        (B, Hkv, n, hs) each, the ones the new queries may attend to."""
        K, V = self.k[layer], self.v[layer]  # (B, Hkv, S, hs)
        t, S = k.shape[2], self.slots
        if pos + t <= S:  # everything fits: write in place, read a view of the filled part
            K[:, :, pos:pos + t] = k
            V[:, :, pos:pos + t] = v
            return K[:, :, :pos + t], V[:, :, :pos + t], 0
        # a sliding window that is full: the buffers hold positions pos-held..pos-1;
        # join the new ones, then keep the last S positions for the next call
        held = min(pos, S)
        xp = xp_of(K)
        keys = xp.concatenate([K[:, :, :held], k], axis=2)  # (B, Hkv, held + t, hs)
        values = xp.concatenate([V[:, :, :held], v], axis=2)  # (B, Hkv, held + t, hs)
        if S:  # (a rolling cache of a 1-token context keeps nothing)
            K[...] = keys[:, :, -S:]  # held + t > S here, so this fills every slot
            V[...] = values[:, :, -S:]
        return keys, values, pos - held

    @property
    def batch_size(self) -> int:
        return self.k[0].shape[0]

    @property
    def free(self) -> int:
        """How many more positions fit (a rolling cache never runs out: it slides)."""
        return self.context_length - self.pos

    def reset(self) -> None:
        """Forget every position (the buffers are kept and overwritten later)."""
        self.pos = 0

    def reorder(self, rows) -> None:
        """Keep row rows[i] as the new row i (beam search: each surviving beam
        continues from the cache of the beam it extends). `rows` (B,) ints on the host."""
        rows = to_device(np.asarray(rows), xp_of(self.k[0]))  # (B,)
        p = self.held
        for k, v in zip(self.k, self.v, strict=True):
            # the gather on the right makes a copy first, so writing it back in
            # place is safe even when two new rows share a parent; only the
            # filled positions are moved, and the buffers keep their identity
            k[:, :, :p] = k[rows, :, :p]  # (B, Hkv, held, hs)
            v[:, :, :p] = v[rows, :, :p]  # (B, Hkv, held, hs)

    def nbytes(self) -> int:
        """Memory held by the buffers: 2 * n_layers * B * Hkv * S * hs * itemsize."""
        return sum(int(a.nbytes) for a in self.k + self.v)
