"""Fixed sinusoidal position encodings (Vaswani et al. 2017, section 3.5).

GPT-2 learns its position table (`GPT.pos_emb`); the original Transformer used
a fixed one instead, with no parameters and no gradient:

    PE[t, 2i]   = sin(t / 10000^(2i/d))
    PE[t, 2i+1] = cos(t / 10000^(2i/d))

Each pair of channels is a rotation at its own frequency, from one turn every
2*pi positions (i = 0) to one every 2*pi*10000 positions, so nearby positions
get similar vectors and PE[t + k] is a linear function of PE[t].
"""

from __future__ import annotations

import numpy as np


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
