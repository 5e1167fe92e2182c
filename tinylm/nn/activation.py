"""GELU (the tanh approximation GPT-2 uses), ReLU, SiLU (SwiGLU's gate) and Dropout."""

from __future__ import annotations

import contextlib
import math

import numpy as np

from tinylm.backend import rand, xp_of
from tinylm.nn.functional import row_chunks, run_chunks, use_fast
from tinylm.nn.module import Module

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_GELU_A = 0.044715


class GELU(Module):
    """gelu(x) = 0.5 x (1 + tanh(u)),  u = sqrt(2/pi) (x + 0.044715 x^3).

    Hendrycks & Gimpel (2016), in the tanh form used by GPT-2 (PyTorch's
    `GELU(approximate="tanh")`). Cache: x and t = tanh(u); the fast path in training
    mode keeps dy/dx instead (`_forward_fast`).
    """

    def forward(self, x):
        if use_fast(x):
            return self._forward_fast(x)
        xp = xp_of(x)
        # u = sqrt(2/pi) * (x + a x^3), built in one buffer to avoid temporaries
        u = x * x  # x^2        (avoid x**3: a slow pow on NumPy)
        u *= _GELU_A * x  # a x^3
        u += x
        u *= _SQRT_2_OVER_PI
        t = xp.tanh(u, out=u)  # t = tanh(u), reusing the buffer
        self._cache = (x, t)
        y = t + 1.0
        y *= x
        y *= 0.5  # 0.5 x (1 + t)
        return y

    def backward(self, dout):
        cache = self._take_cache()
        if not isinstance(cache, tuple):  # the fast training forward kept dy/dx itself
            return _product_fast(cache, dout)
        x, t = cache
        if use_fast(x, t, dout):
            return _gelu_backward_fast(x, t, dout)
        # dy/dx = 0.5 (1 + t) + 0.5 x (1 - t^2) du/dx,   du/dx = sqrt(2/pi) (1 + 3a x^2)
        dudx = x * x
        dudx *= 3.0 * _GELU_A * _SQRT_2_OVER_PI
        dudx += _SQRT_2_OVER_PI
        xp = xp_of(t)
        dydx = t * t
        xp.subtract(1.0, dydx, out=dydx)  # 1 - t^2 = sech^2(u)
        dydx *= x
        dydx *= dudx
        dydx += 1.0 + t
        dydx *= 0.5
        dydx *= dout
        return dydx

    def _forward_fast(self, x):
        """`forward` in row chunks on the thread pool (functional.py, "Fast paths"): the
        same formula with the constants folded, u = (c + c a x^2) x, so 4 passes build u
        instead of 5 and no temporary is made; each chunk stays in cache for all of them.

        In training mode it also computes the local derivative dy/dx while the chunk of
        x and t is in cache, and keeps that one array instead of x and t: the backward is
        then one product, dout * dy/dx, and a layer keeps one (N, C) array less (the
        MLP's widest). In eval mode it keeps (x, t), as the plain code does."""
        x2 = _rows(x)  # (N, C) view
        t, y = np.empty_like(x2), np.empty_like(x2)  # (N, C) tanh(u) and the output
        dydx = np.empty_like(x2) if self.training else None  # (N, C)

        def rows(lo, hi):
            xs, ts, ys = x2[lo:hi], t[lo:hi], y[lo:hi]
            x_sq = np.multiply(xs, xs)  # chunk-sized scratch: x^2
            np.multiply(x_sq, _SQRT_2_OVER_PI * _GELU_A, out=ts)  # c a x^2
            ts += _SQRT_2_OVER_PI  # c + c a x^2
            ts *= xs  # u = c (x + a x^3)
            np.tanh(ts, out=ts)  # t
            if dydx is not None:  # dy/dx = 0.5 (1 + t) + 0.5 x (1 - t^2) du/dx (backward)
                ds = dydx[lo:hi]
                x_sq *= 3.0 * _GELU_A * _SQRT_2_OVER_PI
                x_sq += _SQRT_2_OVER_PI  # du/dx = c (1 + 3 a x^2)
                np.multiply(ts, ts, out=ds)
                np.subtract(1.0, ds, out=ds)  # 1 - t^2
                ds *= xs
                ds *= x_sq  # x (1 - t^2) du/dx
                ds += ts
                ds += 1.0
                ds *= 0.5
            np.add(ts, 1.0, out=ys)
            ys *= xs
            ys *= 0.5  # 0.5 x (1 + t)

        run_chunks(rows, row_chunks(*x2.shape))
        self._cache = (x, t.reshape(x.shape)) if dydx is None else dydx.reshape(x.shape)
        return y.reshape(x.shape)


def _rows(a):
    """a (..., C) as a 2-D (N, C) view (a copy only if `a` is not contiguous)."""
    return np.ascontiguousarray(a).reshape(-1, a.shape[-1]) if a.ndim else a.reshape(1, 1)


def _gelu_backward_fast(x, t, dout):
    """GELU.backward in row chunks on the thread pool, with one chunk-sized scratch
    buffer per chunk instead of three full-size temporaries."""
    x2, t2, d2 = _rows(x), _rows(t), _rows(dout)  # (N, C) views
    dx = np.empty_like(d2)  # (N, C)

    def rows(lo, hi):
        xs, ts, ds, out = x2[lo:hi], t2[lo:hi], d2[lo:hi], dx[lo:hi]
        dudx = np.multiply(xs, xs)  # chunk-sized scratch: x^2
        dudx *= 3.0 * _GELU_A * _SQRT_2_OVER_PI
        dudx += _SQRT_2_OVER_PI  # du/dx
        np.multiply(ts, ts, out=out)
        np.subtract(1.0, out, out=out)  # 1 - t^2
        out *= xs
        out *= dudx  # x (1 - t^2) du/dx
        out += ts
        out += 1.0  # + (1 + t)
        out *= 0.5
        out *= ds

    run_chunks(rows, row_chunks(*x2.shape))
    return dx.reshape(dout.shape)


def _product_fast(a, b):
    """a * b, two arrays of one shape, in row chunks on the thread pool."""
    a2, b2 = _rows(a), _rows(b)  # (N, C) views
    out = np.empty_like(b2)

    def rows(lo, hi):
        np.multiply(a2[lo:hi], b2[lo:hi], out=out[lo:hi])

    run_chunks(rows, row_chunks(*b2.shape))
    return out.reshape(b.shape)


class ReLU(Module):
    """relu(x) = max(x, 0), the original Transformer's activation. Cache: the mask x > 0."""

    def forward(self, x):
        positive = x > 0  # (same shape as x) bool
        self._cache = positive
        return x * positive

    def backward(self, dout):
        positive = self._take_cache()
        # the derivative is 1 where x > 0 and 0 elsewhere (0 at x = 0 itself, as PyTorch)
        return dout * positive


class SiLU(Module):
    """silu(x) = x * sigmoid(x) (Elfwing et al. 2017; "swish"), the gate of SwiGLU.

    Cache: x and s = sigmoid(x). The derivative is s + x s (1 - s) = s (1 + x (1 - s)).
    """

    def forward(self, x):
        xp = xp_of(x)
        # sigmoid(x) = 1 / (1 + exp(-x)); exp(-x) overflows to inf for very negative
        # x, which gives s = 0: the right limit, so no special case is needed
        with _quiet_overflow(xp):
            s = 1.0 / (1.0 + xp.exp(-x))  # (same shape as x)
        self._cache = (x, s)
        return x * s

    def backward(self, dout):
        x, s = self._take_cache()
        dydx = 1.0 - s
        dydx *= x
        dydx += 1.0
        dydx *= s  # s (1 + x (1 - s))
        dydx *= dout
        return dydx


def _quiet_overflow(xp):
    """NumPy warns when exp overflows to inf; here inf is the intended value."""
    return np.errstate(over="ignore") if xp is np else contextlib.nullcontext()


class Dropout(Module):
    """Zero each element with probability p in training mode, scale the rest by 1/(1-p).

    Inverted dropout (Srivastava et al. 2014): at evaluation time the layer is
    the identity. The mask is drawn on the host from the layer's own seeded
    generator, so a seed gives the same masks on NumPy and CuPy; `reseed(s)`
    restarts the stream, which is how the gradient checker holds the mask fixed.
    Cache: the scaled mask.
    """

    def __init__(self, p: float = 0.0, *, seed=0):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"Dropout probability p must be in [0, 1), got {p}")
        self.p = float(p)
        self.reseed(seed)

    def extra_repr(self) -> str:
        return f"p={self.p}"

    def reseed(self, seed) -> None:
        self.rng = np.random.default_rng(seed)

    def forward(self, x):
        if not self.training or self.p == 0.0:
            self._cache = 1.0  # identity; backward passes dout through
            return x
        keep = rand(self.rng, x.shape, xp_of(x), x.dtype) >= self.p  # (same shape as x) bool
        self._cache = keep.astype(x.dtype) * (1.0 / (1.0 - self.p))  # the scaled mask
        return x * self._cache

    def backward(self, dout):
        mask = self._take_cache()
        return dout if isinstance(mask, float) else dout * mask


def seed_dropout(layer: Module, seed) -> None:
    """Restart the mask stream of every Dropout inside `layer`, each with its own
    stream: after this, the same forward calls draw the same masks again."""
    drops = [m for m in layer.modules() if isinstance(m, Dropout)]
    for i, d in enumerate(drops):
        d.reseed([seed, i])
