"""LayerNorm (Ba, Kiros & Hinton 2016), with the compact backward llm.c uses."""

from __future__ import annotations

import numpy as np

from tinylm.backend import xp_of
from tinylm.nn.module import Module


class LayerNorm(Module):
    """y = (x - mean) / sqrt(var + eps) * weight + bias, over the last dimension.

    `var` is the biased variance (divide by C), as in PyTorch. With `bias=False`
    there is no bias parameter (GPT configs without biases).
    Cache: xhat (the normalised input) and rstd = 1/sqrt(var + eps); llm.c keeps
    mean and rstd and recomputes xhat, we keep xhat because NumPy would have to
    allocate it again anyway.
    """

    def __init__(self, dim: int, eps: float = 1e-5, bias: bool = True, *, device="cpu",
                 dtype="float32"):
        super().__init__(device, dtype)
        self.dim, self.eps = dim, eps
        self.add_param("weight", np.ones(dim))
        if bias:
            self.add_param("bias", np.zeros(dim))
        self._cache = None

    def extra_repr(self) -> str:
        return f"dim={self.dim}, eps={self.eps}, bias={'bias' in self.params}"

    def forward(self, x):
        # x (..., C)
        if x.shape[-1] != self.dim:
            raise ValueError(f"LayerNorm expects last dimension {self.dim}, got shape {x.shape}")
        xp = xp_of(x)
        mean = x.mean(axis=-1, keepdims=True)  # (..., 1)
        xhat = x - mean  # (..., C), centred; becomes xhat below
        var = (xhat * xhat).mean(axis=-1, keepdims=True)  # (..., 1)
        rstd = 1.0 / xp.sqrt(var + self.eps)  # (..., 1)
        xhat *= rstd
        self._cache = (xhat, rstd)
        y = xhat * self.params["weight"]
        if "bias" in self.params:
            y += self.params["bias"]
        return y

    def backward(self, dout):
        xhat, rstd = self._need_cache(self._cache)
        self._cache = None
        C = self.dim
        lead = tuple(range(dout.ndim - 1))  # every axis but the last
        # y = xhat * w + b  =>  dw = sum dy * xhat,  db = sum dy,  dxhat = dy * w
        self.grads["weight"] += (dout * xhat).sum(axis=lead)
        if "bias" in self.params:
            self.grads["bias"] += dout.sum(axis=lead)
        dxhat = dout * self.params["weight"]  # (..., C)
        # xhat = (x - mean) * rstd. Differentiating through mean and rstd gives
        #   dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))
        # (derived in docs/backprop.md; both means are over the last axis).
        mean_dxhat = dxhat.mean(axis=-1, keepdims=True)  # (..., 1)
        mean_dxhat_xhat = (dxhat * xhat).sum(axis=-1, keepdims=True) / C  # (..., 1)
        dx = dxhat
        dx -= mean_dxhat
        dx -= xhat * mean_dxhat_xhat
        dx *= rstd
        return dx
