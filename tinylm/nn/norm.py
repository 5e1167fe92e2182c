"""LayerNorm (Ba, Kiros & Hinton 2016), with the compact backward llm.c uses."""

from __future__ import annotations

import numpy as np

from tinylm.backend import xp_of
from tinylm.nn.functional import row_chunks, run_chunks, use_fast
from tinylm.nn.module import Module


class LayerNorm(Module):
    """y = (x - mean) / sqrt(var + eps) * weight + bias, over the last dimension.

    `var` is the biased variance (divide by C), as in PyTorch. With `bias=False`
    there is no bias parameter (GPT configs without biases).
    Cache: xhat (the normalised input) and rstd = 1/sqrt(var + eps); llm.c keeps
    mean and rstd and recomputes xhat, we keep xhat because NumPy would have to
    allocate it again anyway.
    """

    def __init__(self, dim: int, eps: float = 1e-5, bias: bool = True):
        super().__init__()
        self.dim, self.eps = dim, eps
        self.add_param("weight", np.ones(dim))
        if bias:
            self.add_param("bias", np.zeros(dim))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, eps={self.eps}, bias={'bias' in self.params}"

    def forward(self, x):
        # x (..., C)
        if x.shape[-1] != self.dim:
            raise ValueError(f"LayerNorm expects last dimension {self.dim}, got shape {x.shape}")
        if use_fast(x, *self.params.values()):
            return self._forward_fast(x)
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
        xhat, rstd = self._take_cache()
        if use_fast(xhat, dout, *self.params.values()):
            return self._backward_fast(xhat, rstd, dout)
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

    # -- fast paths (functional.py, "Fast paths"): the formulas above, in row chunks
    # that stay in cache, on the thread pool. Row sums are `einsum`s and sums of
    # products `vecdot`s or `einsum`s: no temporaries, and several times faster than
    # NumPy's .mean over short rows. (Not `x @ ones`: BLAS calls from two threads at once make
    # OpenBLAS's own threads fight over the cores.)

    def _forward_fast(self, x):
        C = self.dim
        x2 = np.ascontiguousarray(x).reshape(-1, C)  # (N, C)
        xhat, y = np.empty_like(x2), np.empty_like(x2)  # (N, C)
        rstd = np.empty((x2.shape[0], 1), dtype=x2.dtype)  # (N, 1)
        w, b = self.params["weight"], self.params.get("bias")

        def rows(lo, hi):
            xs, hs, rs, ys = x2[lo:hi], xhat[lo:hi], rstd[lo:hi], y[lo:hi]
            np.subtract(xs, np.einsum("ij->i", xs)[:, None] / C, out=hs)  # centred
            np.divide(np.vecdot(hs, hs)[:, None], C, out=rs)  # (n, 1) variance (biased)
            rs += self.eps
            np.sqrt(rs, out=rs)
            np.divide(1.0, rs, out=rs)  # rstd
            hs *= rs  # xhat
            np.multiply(hs, w, out=ys)
            if b is not None:
                ys += b

        run_chunks(rows, row_chunks(*x2.shape))
        self._cache = (xhat.reshape(x.shape), rstd.reshape(*x.shape[:-1], 1))
        return y.reshape(x.shape)

    def _backward_fast(self, xhat, rstd, dout):
        C = self.dim
        h2, r2 = xhat.reshape(-1, C), rstd.reshape(-1, 1)  # (N, C), (N, 1)
        d2 = np.ascontiguousarray(dout).reshape(-1, C)  # (N, C)
        dx = np.empty_like(d2)  # (N, C)
        w = self.params["weight"]

        def rows(lo, hi):
            hs, ds, out = h2[lo:hi], d2[lo:hi], dx[lo:hi]
            dw = np.einsum("ij,ij->j", ds, hs)  # (C,) this chunk's share of sum dy * xhat
            db = np.einsum("ij->j", ds)  # (C,)
            np.multiply(ds, w, out=out)  # dxhat
            m1 = np.einsum("ij->i", out)[:, None] / C  # (n, 1) mean(dxhat)
            m2 = np.vecdot(out, hs)[:, None] / C  # (n, 1) mean(dxhat * xhat)
            out -= m1
            out -= hs * m2  # a chunk-sized temporary
            out *= r2[lo:hi]
            return dw, db

        parts = run_chunks(rows, row_chunks(*d2.shape))
        # the chunks' shares are added here, in chunk order, not by the threads
        self.grads["weight"] += sum(dw for dw, _ in parts)
        if "bias" in self.params:
            self.grads["bias"] += sum(db for _, db in parts)
        return dx.reshape(dout.shape)


class RMSNorm(Module):
    """y = x / rms(x) * weight,  rms(x) = sqrt(mean(x^2) + eps), over the last dimension.

    Zhang & Sennrich (2019), used by Llama, Mistral and DeepSeek: LayerNorm
    without the centring and without a bias. It is cheaper (one reduction, not
    two) and works as well in practice. Cache: xhat = x / rms(x) and
    rrms = 1/rms(x), as LayerNorm keeps xhat and rstd.
    """

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.dim, self.eps = dim, eps
        self.add_param("weight", np.ones(dim))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, eps={self.eps}"

    def forward(self, x):
        # x (..., C)
        if x.shape[-1] != self.dim:
            raise ValueError(f"RMSNorm expects last dimension {self.dim}, got shape {x.shape}")
        xp = xp_of(x)
        ms = (x * x).mean(axis=-1, keepdims=True)  # (..., 1) mean square
        rrms = 1.0 / xp.sqrt(ms + self.eps)  # (..., 1)
        xhat = x * rrms  # (..., C)
        self._cache = (xhat, rrms)
        return xhat * self.params["weight"]

    def backward(self, dout):
        xhat, rrms = self._take_cache()
        lead = tuple(range(dout.ndim - 1))  # every axis but the last
        # y = xhat * w  =>  dw = sum dy * xhat,  dxhat = dy * w
        self.grads["weight"] += (dout * xhat).sum(axis=lead)
        dxhat = dout * self.params["weight"]  # (..., C)
        # xhat = x * rrms with rrms = (mean(x^2) + eps)^(-1/2). As for LayerNorm,
        # but with no mean to subtract (derived in docs/backprop.md):
        #   dx = rrms * (dxhat - xhat * mean(dxhat * xhat))
        mean_dxhat_xhat = (dxhat * xhat).mean(axis=-1, keepdims=True)  # (..., 1)
        dx = dxhat
        dx -= xhat * mean_dxhat_xhat
        dx *= rrms
        return dx


def make_norm(kind: str, dim: int, *, eps: float = 1e-5, bias: bool = True) -> Module:
    """The normalisation layer a config names: "layernorm" or "rmsnorm" (which has no bias)."""
    if kind == "layernorm":
        return LayerNorm(dim, eps, bias=bias)
    if kind == "rmsnorm":
        return RMSNorm(dim, eps)
    raise ValueError(f"norm must be 'layernorm' or 'rmsnorm', got {kind!r}")
