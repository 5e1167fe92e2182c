"""Softmax cross-entropy with label smoothing and ignored positions.

For one row of logits z (V,) with target y and smoothing eps, PyTorch's
`cross_entropy(..., label_smoothing=eps)` is

    log p  = z - logsumexp(z)                         (log-softmax)
    loss   = (1 - eps) * (-log p[y]) + eps * mean_v(-log p[v])

and the reported loss is the mean over positions whose target is not
`ignore_index`. Its gradient is the famous `p - target`, with the smoothed
target distribution q = (1 - eps) * onehot(y) + eps / V:

    dloss/dz = (p - q) / n_valid      (0 for ignored rows)
"""

from __future__ import annotations

import numpy as np

from tinylm.backend import xp_of
from tinylm.nn.functional import row_chunks, run_chunks, use_fast
from tinylm.nn.module import Module


class SoftmaxCrossEntropy(Module):
    """`forward(logits (B,T,V) or (N,V), targets (B,T) or (N,)) -> float`; `backward() -> dlogits`.

    Cache: the softmax probabilities p (N, V), the targets and the valid-row mask.
    No parameters: a layer like the others, so it can be checked like one.
    """

    def __init__(self, label_smoothing: float = 0.0, ignore_index: int = -100):
        if not 0.0 <= label_smoothing <= 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
        super().__init__()
        self.label_smoothing = float(label_smoothing)
        self.ignore_index = int(ignore_index)

    def forward(self, logits, targets) -> float:
        xp = xp_of(logits)
        if logits.ndim not in (2, 3):
            raise ValueError(f"logits must be (B, T, V) or (N, V), got shape {logits.shape}")
        if targets.shape != logits.shape[:-1]:
            raise ValueError(
                f"targets must have shape {logits.shape[:-1]} to match logits {logits.shape}, "
                f"got {targets.shape}"
            )
        if targets.dtype.kind not in "iu":
            raise TypeError(f"targets must be integer class ids, got dtype {targets.dtype}")
        V = logits.shape[-1]
        z = logits.reshape(-1, V)  # (N, V)
        y = targets.reshape(-1)  # (N,)
        valid = y != self.ignore_index  # (N,) bool
        bad = valid & ((y < 0) | (y >= V))
        if bool(bad.any()):
            first = int(y[xp.argmax(bad)])
            raise ValueError(
                f"target {first} is outside [0, {V}) and is not ignore_index ({self.ignore_index})"
            )
        y_safe = xp.where(valid, y, 0)  # ignored rows read column 0, then get weight 0
        n_valid = int(valid.sum())
        if use_fast(z):
            p, per_row = self._softmax_rows_fast(z, y_safe)
            self._cache = (p, y_safe, valid, n_valid, logits.shape)
            return float("nan") if n_valid == 0 else float((per_row * valid).sum()) / n_valid

        # log-softmax and softmax together (both are needed: the loss reads log p, the
        # backward p), stabilised: subtracting the row max changes neither (log-sum-exp)
        shifted = z - z.max(axis=-1, keepdims=True)  # (N, V)
        p = xp.exp(shifted)  # (N, V) unnormalised
        sumexp = p.sum(axis=-1, keepdims=True)  # (N, 1)
        logp_target = shifted[xp.arange(len(y)), y_safe] - xp.log(sumexp[:, 0])  # (N,)
        per_row = -(1.0 - self.label_smoothing) * logp_target
        if self.label_smoothing > 0.0:
            mean_logp = shifted.mean(axis=-1) - xp.log(sumexp[:, 0])  # (N,) mean_v log p[v]
            per_row -= self.label_smoothing * mean_logp
        p /= sumexp  # (N, V) probabilities, kept for backward
        self._cache = (p, y_safe, valid, n_valid, logits.shape)
        if n_valid == 0:
            return float("nan")  # as PyTorch: a mean over no positions
        return float((per_row * valid).sum()) / n_valid

    def backward(self, dloss=1.0):
        p, y, valid, n_valid, shape = self._take_cache()
        xp = xp_of(p)
        N, V = p.shape
        if use_fast(p):
            return self._backward_fast(p, y, valid, n_valid, dloss).reshape(shape)
        # dloss/dz = (p - q) / n_valid with q = (1 - eps) onehot(y) + eps / V
        dz = p  # reuse the probabilities' buffer (N, V)
        if self.label_smoothing > 0.0:
            dz -= self.label_smoothing / V
        dz[xp.arange(N), y] -= 1.0 - self.label_smoothing
        scale = float(dloss) / max(n_valid, 1)
        dz *= (valid * scale)[:, None].astype(dz.dtype)  # ignored rows -> 0
        return dz.reshape(shape)

    # -- fast paths (functional.py, "Fast paths"): the same steps in row chunks on the
    # thread pool. The forward makes one (N, V) array, not two: the target's and the
    # mean log-probabilities are read off `shifted` before exp overwrites it in place.

    def _softmax_rows_fast(self, z, y):
        """z (N, V), y (N,) -> p (N, V) softmax, per_row (N,) loss of each row."""
        N, V = z.shape
        p = np.empty_like(z)  # (N, V): shifted logits, then exp, then probabilities
        per_row = np.empty(N, dtype=z.dtype)  # (N,)
        eps = self.label_smoothing

        def rows(lo, hi):
            ps = p[lo:hi]
            np.subtract(z[lo:hi], z[lo:hi].max(axis=-1, keepdims=True), out=ps)  # shifted
            logp_target = ps[np.arange(hi - lo), y[lo:hi]]  # (n,) before the log-sum-exp
            mean_shifted = np.einsum("ij->i", ps) / V if eps > 0.0 else None  # (n,) row means
            np.exp(ps, out=ps)
            sumexp = np.einsum("ij->i", ps)  # (n,) row sums (faster than .sum on rows)
            log_sumexp = np.log(sumexp)
            per_row[lo:hi] = -(1.0 - eps) * (logp_target - log_sumexp)
            if eps > 0.0:
                per_row[lo:hi] -= eps * (mean_shifted - log_sumexp)
            ps /= sumexp[:, None]

        run_chunks(rows, row_chunks(N, V))
        return p, per_row

    def _backward_fast(self, p, y, valid, n_valid, dloss):
        """dz = (p - q) / n_valid, in place in p's buffer, row chunks on the thread pool."""
        N, V = p.shape
        eps = self.label_smoothing
        scale = (valid * (float(dloss) / max(n_valid, 1))).astype(p.dtype)[:, None]  # (N, 1)

        def rows(lo, hi):
            dz = p[lo:hi]
            if eps > 0.0:
                dz -= eps / V
            dz[np.arange(hi - lo), y[lo:hi]] -= 1.0 - eps
            dz *= scale[lo:hi]  # ignored rows -> 0

        run_chunks(rows, row_chunks(N, V))
        return p
