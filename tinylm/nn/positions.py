"""Position information: fixed sinusoidal encodings and rotary embeddings (RoPE).

A transformer's attention is blind to order: permute the keys and the weights
permute with them. GPT-2 adds a learned table (`GPT.pos_emb`) to the token
embeddings. The alternatives a GPTConfig can pick (`pos`):

"sinusoidal"  (Vaswani et al. 2017, section 3.5) a fixed table added the same way,
              no parameters and no gradient:
                  PE[t, 2i]   = sin(t / 10000^(2i/d))
                  PE[t, 2i+1] = cos(t / 10000^(2i/d))
              Each pair of channels is a rotation at its own frequency, so
              PE[t + k] is a linear function of PE[t].
"rope"        (Su et al. 2021, RoFormer; Llama, Mistral) nothing is added to x;
              instead every query and key is *rotated* by an angle proportional
              to its position, pair of channels by pair of channels. The score
              q_t . k_s then depends on t - s only (a rotation by t times a
              rotation by -s is a rotation by t - s): relative positions.
"none"        (NoPE, Kazemnejad et al. 2023) no position signal at all; the
              causal mask alone lets a decoder work out where it is.
"""

from __future__ import annotations

import numpy as np

from tinylm.backend import to_device, xp_of
from tinylm.nn.module import Module


def sinusoidal_positions(T: int, d: int, xp=np, dtype="float32", base: float = 10000.0):
    """(T, d) table of sinusoidal encodings for positions 0..T-1 (d must be even)."""
    if d % 2 != 0:
        raise ValueError(f"sinusoidal encodings need an even dimension, got d={d}")
    t = np.arange(T)[:, None]  # (T, 1)
    inv_freq = base ** (-np.arange(0, d, 2) / d)  # (d/2,) frequencies 1 .. 1/base
    angles = t * inv_freq  # (T, d/2)
    table = np.empty((T, d))
    table[:, 0::2] = np.sin(angles)
    table[:, 1::2] = np.cos(angles)
    table = table.astype(dtype)
    return table if xp is np else xp.asarray(table)


# ---------------------------------------------------------------------------
# Rotary position embeddings
# ---------------------------------------------------------------------------


def rope_angles(T: int, head_size: int, theta: float = 10000.0) -> np.ndarray:
    """(T, hs) rotation angles, float64 on the host: angle[t, i] = t * theta^(-2j/hs)
    with j = i mod hs/2, so channels i and i + hs/2 form a pair that turns together
    (the "rotate half" layout of GPT-NeoX and Hugging Face Llama, not RoFormer's
    interleaved pairs (0,1), (2,3)...; the two differ by a fixed permutation of
    the q/k channels)."""
    if head_size % 2 != 0:
        raise ValueError(f"RoPE needs an even head size, got {head_size}")
    inv_freq = theta ** (-np.arange(0, head_size, 2) / head_size)  # (hs/2,) 1 .. ~1/theta
    angles = np.arange(T)[:, None] * inv_freq  # (T, hs/2)
    return np.concatenate([angles, angles], axis=-1)  # (T, hs)


def rotate_half(x):
    """[x1 | x2] -> [-x2 | x1] on the last axis: each pair (x1[j], x2[j]) turned by 90 degrees."""
    h = x.shape[-1] // 2
    return xp_of(x).concatenate([-x[..., h:], x[..., :h]], axis=-1)


def apply_rope(x, cos, sin):
    """Rotate each channel pair of x (..., T, hs) by its angle: x cos + rotate_half(x) sin.

    For the pair (a, b) = (x[j], x[j + hs/2]) at angle w this is the 2-D rotation
    (a cos w - b sin w, b cos w + a sin w). cos, sin (T, hs) broadcast over the heads.
    """
    return x * cos + rotate_half(x) * sin


class RotaryEmbedding(Module):
    """Rotates queries or keys (B, H, T, hs) by their positions; no parameters.

    Keeps cos and sin tables (n, hs), computed in float64 on the host and moved
    to the input's device in the input's dtype (one pair of tables per device
    and dtype, so the layer needs no `to`): for the first min(max_positions,
    2048) positions at first, extended on demand up to max_positions (a
    checkpoint may allow 131072 positions, and every layer has its own tables).
    `rotate(x, start)` treats x's T rows as positions start..start+T-1 (the KV
    cache rotates new keys at their true positions).

    Backward: a rotation is orthogonal, so its transpose is its inverse, the
    rotation by -angle: dx = apply_rope(dy, cos, -sin). `forward`/`backward`
    make the layer checkable on its own; attention calls `rotate` twice (q and
    k) and `rotate(..., inverse=True)` on their gradients, and needs no cache.
    """

    def __init__(self, head_size: int, max_positions: int, theta: float = 10000.0):
        super().__init__()
        self.head_size, self.max_positions, self.theta = head_size, max_positions, theta
        self._tables = {}  # (array module name, dtype) -> (cos, sin), each (n, hs)
        self._last = None  # the key of the tables used last

    def tables(self, n: int, xp, dtype):
        """cos, sin (n', hs) with n' >= n rows on `xp` in `dtype`; (re)built, at least
        doubled, when short."""
        key = (xp.__name__, str(dtype))
        have = len(self._tables[key][0]) if key in self._tables else 0
        if have < n:
            size = min(max(n, 2048, 2 * have), self.max_positions)
            angles = rope_angles(size, self.head_size, self.theta)  # (size, hs)
            cos = to_device(np.cos(angles).astype(dtype), xp)  # (size, hs)
            sin = to_device(np.sin(angles).astype(dtype), xp)  # (size, hs)
            self._tables[key] = (cos, sin)
        self._last = key
        return self._tables[key]

    @property
    def cos(self):
        """The cos table (n, hs) used last (for plots; built in the layer's dtype if none was)."""
        return self._latest()[0]

    @property
    def sin(self):
        """The sin table (n, hs) used last."""
        return self._latest()[1]

    def _latest(self):
        return self._tables[self._last] if self._last else self.tables(1, self.xp, self.dtype)

    def extra_repr(self) -> str:
        return f"head_size={self.head_size}, theta={self.theta:g}"

    def rotate(self, x, start: int = 0, inverse: bool = False):
        # x (..., T, hs) at positions start..start+T-1
        T = x.shape[-2]
        if start + T > self.max_positions:
            raise ValueError(f"RoPE tables cover {self.max_positions} positions, asked for "
                             f"{start}..{start + T - 1}")
        cos, sin = self.tables(start + T, xp_of(x), x.dtype)
        cos, sin = cos[start:start + T], sin[start:start + T]  # (T, hs)
        return apply_rope(x, cos, -sin if inverse else sin)

    def forward(self, x, start: int = 0):
        self._cache = start
        return self.rotate(x, start)

    def backward(self, dout):
        start = self._take_cache()
        return self.rotate(dout, start, inverse=True)  # the transpose of a rotation
