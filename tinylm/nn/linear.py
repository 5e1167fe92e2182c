"""Linear and Embedding: the two layers that hold most of a GPT's parameters.

Shape letters used across tinylm: B batch, T time (sequence), C channels (d_model),
V vocabulary, H heads, hs head size, N = B*T rows when flattened.
"""

from __future__ import annotations

import numpy as np

from tinylm.backend import scatter_add_rows, xp_of
from tinylm.nn.functional import use_fast
from tinylm.nn.module import Module, init_rng


class Linear(Module):
    """y = x @ weight + bias, with weight of shape (in_features, out_features).

    The weight is stored (in, out), the transpose of PyTorch's nn.Linear, so the
    forward is a plain `x @ W` and the backward reads as its mirror image.
    Initialised as GPT-2: weight ~ normal(0, init_std), bias = 0.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 init_std: float = 0.02, rng=None):
        super().__init__()
        rng = init_rng(rng)
        self.in_features, self.out_features = in_features, out_features
        self.add_param("weight", rng.standard_normal((in_features, out_features)) * init_std)
        if bias:
            self.add_param("bias", np.zeros(out_features))

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bias={'bias' in self.params}"

    def forward(self, x):
        # x (..., in) -> y (..., out)
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"Linear expects inputs with last dimension {self.in_features}, got shape {x.shape}"
            )
        self._cache = x  # the weight gradient needs the input
        # one 2-D matmul over all rows: NumPy runs (B,T,C) @ (C,D) as B separate
        # products, which is up to 2x slower than (B*T, C) @ (C, D)
        y = x.reshape(-1, self.in_features) @ self.params["weight"]  # (N, out)
        if "bias" in self.params:
            y += self.params["bias"]
        return y.reshape(*x.shape[:-1], self.out_features)  # (..., out)

    def backward(self, dout):
        x = self._take_cache()
        x2 = x.reshape(-1, self.in_features)  # (N, in)
        d2 = dout.reshape(-1, self.out_features)  # (N, out)
        # y = x @ W + b  =>  dW = x^T dy,  db = sum over rows of dy,  dx = dy W^T
        self.grads["weight"] += x2.T @ d2  # (in, out)
        if "bias" in self.params:
            if use_fast(d2):  # column sums as a BLAS vector-matrix product: ~3x faster
                self.grads["bias"] += np.ones(len(d2), dtype=d2.dtype) @ d2  # (out,)
            else:
                self.grads["bias"] += d2.sum(axis=0)  # (out,)
        dx = d2 @ self.params["weight"].T  # (N, in)
        return dx.reshape(*dout.shape[:-1], self.in_features)  # (..., in)


class Embedding(Module):
    """A lookup table: row `ids[b, t]` of `weight` (num_embeddings, dim).

    Its backward is a scatter-add: every occurrence of a token adds its
    gradient row into that token's row of `dweight`, so repeated ids sum up.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, *, init_std: float = 0.02,
                 rng=None):
        super().__init__()
        rng = init_rng(rng)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.add_param("weight", rng.standard_normal((num_embeddings, embedding_dim)) * init_std)

    def extra_repr(self) -> str:
        return f"num={self.num_embeddings}, dim={self.embedding_dim}"

    def forward(self, ids):
        # ids (...) integers -> (..., dim)
        check_ids(ids, self.num_embeddings, "Embedding")
        self._cache = ids  # the backward scatters into these rows
        return self.params["weight"][ids]

    def backward(self, dout):
        ids = self._take_cache()
        # out[n] = W[ids[n]]  =>  dW[v] = sum of dout[n] over all n with ids[n] == v
        d2 = dout.reshape(-1, self.embedding_dim)  # (N, dim)
        scatter_add_rows(self.grads["weight"], ids.reshape(-1), d2)
        return None  # integer ids have no gradient


def check_ids(ids, num: int, who: str) -> None:
    """Token ids must be integers in [0, num); name the first bad one if not."""
    xp = xp_of(ids)
    if not hasattr(ids, "dtype") or ids.dtype.kind not in "iu":
        raise TypeError(
            f"{who} expects integer token ids, got {getattr(ids, 'dtype', type(ids).__name__)}"
        )
    if ids.size == 0:
        return
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= num:
        bad = lo if lo < 0 else hi
        where = tuple(int(i) for i in xp.argwhere(ids == bad)[0])
        raise ValueError(
            f"{who}: token id {bad} at position {where} is outside the vocabulary [0, {num})"
        )
