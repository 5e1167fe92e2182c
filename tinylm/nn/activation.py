"""GELU (the tanh approximation GPT-2 uses) and Dropout."""

from __future__ import annotations

import math

import numpy as np

from tinylm.backend import rand, xp_of
from tinylm.nn.module import Module

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_GELU_A = 0.044715


class GELU(Module):
    """gelu(x) = 0.5 x (1 + tanh(u)),  u = sqrt(2/pi) (x + 0.044715 x^3).

    Hendrycks & Gimpel (2016), in the tanh form used by GPT-2 (PyTorch's
    `GELU(approximate="tanh")`). Cache: x and t = tanh(u).
    """

    def __init__(self, device="cpu", dtype="float32"):
        super().__init__(device, dtype)
        self._cache = None

    def forward(self, x):
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
        x, t = self._need_cache(self._cache)
        self._cache = None
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


class Dropout(Module):
    """Zero each element with probability p in training mode, scale the rest by 1/(1-p).

    Inverted dropout (Srivastava et al. 2014): at evaluation time the layer is
    the identity. The mask is drawn on the host from the layer's own seeded
    generator, so a seed gives the same masks on NumPy and CuPy; `reseed(s)`
    restarts the stream, which is how the gradient checker holds the mask fixed.
    Cache: the scaled mask.
    """

    def __init__(self, p: float = 0.0, *, seed=0, device="cpu", dtype="float32"):
        super().__init__(device, dtype)
        if not 0.0 <= p < 1.0:
            raise ValueError(f"Dropout probability p must be in [0, 1), got {p}")
        self.p = float(p)
        self.reseed(seed)
        self._mask = None

    def extra_repr(self) -> str:
        return f"p={self.p}"

    def reseed(self, seed) -> None:
        self.rng = np.random.default_rng(seed)

    def forward(self, x):
        if not self.training or self.p == 0.0:
            self._mask = 1.0  # identity; backward passes dout through
            return x
        keep = rand(self.rng, x.shape, xp_of(x), x.dtype) >= self.p  # (same shape as x) bool
        self._mask = keep.astype(x.dtype) * (1.0 / (1.0 - self.p))
        return x * self._mask

    def backward(self, dout):
        mask = self._need_cache(self._mask)
        self._mask = None
        return dout if isinstance(mask, float) else dout * mask


def seed_dropout(layer: Module, seed) -> None:
    """Restart the mask stream of every Dropout inside `layer`, each with its own
    stream: after this, the same forward calls draw the same masks again."""
    drops = [m for m in layer.modules() if isinstance(m, Dropout)]
    for i, d in enumerate(drops):
        d.reseed([seed, i])
