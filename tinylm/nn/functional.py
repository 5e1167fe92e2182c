"""Small array functions that several layers (and the sampler) share.

Each works on NumPy or CuPy arrays alike (`xp` comes from the data) and keeps
the input's dtype.
"""

from __future__ import annotations

from tinylm.backend import xp_of


def softmax(x, axis: int = -1, out=None):
    """exp(x) / sum(exp(x)) along `axis`, stabilised by subtracting the row max
    (softmax is unchanged by a constant shift, and exp of a value <= 0 cannot
    overflow). Entries of -inf get probability exactly 0; each row needs at
    least one finite entry.

    `out=x` computes in place (attention's (B, H, T, T) scores are large: one
    pass less over memory, no temporary)."""
    xp = xp_of(x)
    out = x - x.max(axis=axis, keepdims=True) if out is None else _shift_into(x, out, axis)
    xp.exp(out, out=out)
    out /= out.sum(axis=axis, keepdims=True)
    return out


def _shift_into(x, out, axis):
    xp_of(x).subtract(x, x.max(axis=axis, keepdims=True), out=out)
    return out


def log_softmax(x, axis: int = -1):
    """log softmax along `axis`: x - logsumexp(x), computed stably."""
    xp = xp_of(x)
    shifted = x - x.max(axis=axis, keepdims=True)
    return shifted - xp.log(xp.exp(shifted).sum(axis=axis, keepdims=True))
