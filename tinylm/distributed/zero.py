"""ZeRO stage 1 (Rajbhandari et al. 2020): AdamW's moments sharded over the ranks.

Plain data parallelism keeps a full copy of AdamW's m and v on every rank: 2 P
numbers per rank for P parameters, the same 2 P repeated N times. ZeRO-1 cuts the
flat parameter vector (flat.py, padded to a multiple of N) into N equal shards of
S = P_padded / N and gives rank r the moments of shard r only:

    flat parameters  [ shard 0 | shard 1 | ... | shard N-1 ]      (N S,)
    rank r keeps     m, v of shard r                               2 S = 2 P / N numbers

and one step is

    reduce_and_clip  reduce-scatter (mean): rank r receives the averaged gradient of
                     shard r (S,); the global norm is sqrt(sum over ranks of
                     |g_shard|^2), one tiny allreduce; clip
    step             AdamW on shard r only (its own slice of the parameters), then
                     allgather the N updated shards: every rank has all of them again

A ring reduce-scatter plus a ring allgather move exactly what a ring allreduce
moves (an allreduce *is* the two, back to back), so ZeRO-1 saves memory at no
extra communication.

The AdamW is tinylm.optim.AdamW, unchanged, over "pieces": the parts of each
parameter that fall in this rank's shard, as views of one (S,) shard buffer. A
shard boundary can cut a parameter in two; its pieces are 1-D, so the piece's
decay decision (matrices decay, vectors do not) is looked up from its parameter.
"""

from __future__ import annotations

import math

import numpy as np

from tinylm.backend import to_numpy
from tinylm.distributed.flat import FlatBuffer
from tinylm.distributed.optimizers import _AdamWFace
from tinylm.optim import AdamW

_PADDING = "<padding>"  # the one piece of a rank whose shard is all padding


class _PieceAdamW(AdamW):
    """AdamW over 1-D pieces; `decays` answers for the parameter a piece came from."""

    def __init__(self, pieces, decays_by_id: dict, **adamw):
        self._decays = decays_by_id  # id(piece view) -> does its parameter decay
        super().__init__(pieces, **adamw)

    def decays(self, p) -> bool:
        return self._decays[id(p)]


class ZeroAdamW(_AdamWFace):
    """Data-parallel AdamW whose state is split over the ranks (ZeRO stage 1)."""

    zero = True

    def __init__(self, params, comm, **adamw):
        self.params = list(params)  # [(name, p, g)]
        self.comm = comm
        N, r = comm.size, comm.rank
        self.grads = FlatBuffer([g for _, _, g in self.params], multiple_of=N)  # (N S,)
        self.weights = FlatBuffer([p for _, p, _ in self.params], multiple_of=N)  # (N S,)
        S = self.weights.flat.size // N
        lo, hi = r * S, (r + 1) * S  # this rank's shard of the flat vector
        xp, dtype = self.weights.xp, self.weights.dtype
        self.g_shard = xp.zeros(S, dtype=dtype)  # (S,) averaged gradient of the shard
        self.p_shard = xp.zeros(S, dtype=dtype)  # (S,) the shard's parameters
        # each piece: (name, param, [a, b) in the parameter, [c, d) in the shard)
        self.pieces = []
        views, decays = [], {}
        for (name, p, _), (start, stop) in zip(self.params, self.weights.offsets, strict=True):
            a, b = max(start, lo), min(stop, hi)
            if a >= b:
                continue  # this parameter lies wholly in other ranks' shards
            self.pieces.append((name, p, a - start, b - start, a - lo, b - lo))
            pv, gv = self.p_shard[a - lo:b - lo], self.g_shard[a - lo:b - lo]
            views.append((name, pv, gv))
            decays[id(pv)] = p.ndim >= 2
        if not views:  # more ranks than the parameters fill: a shard of padding
            views = [(_PADDING, self.p_shard, self.g_shard)]
            decays[id(self.p_shard)] = False
        self.optimizer = _PieceAdamW(views, decays, **adamw)

    def reduce_and_clip(self, max_norm: float = math.inf) -> float:
        """Reduce-scatter the gradients (mean), clip by the global norm; returns the norm
        before clipping (the same number on every rank)."""
        self.comm.reduce_scatter_sum(self.grads.pack(), self.g_shard)
        self.g_shard /= self.comm.size  # a sum of rank means -> the mean (see batch.py)
        local = float(self.weights.xp.dot(self.g_shard, self.g_shard))
        norm = math.sqrt(self.comm.allreduce_floats([local])[0])
        scale = max_norm / (norm + 1e-6)  # tinylm.optim.clip_grad_norm's rule
        if scale < 1.0:
            self.g_shard *= scale
        return norm

    def step(self) -> None:
        """AdamW on this rank's shard, then every rank gathers every shard."""
        for _, p, a, b, c, d in self.pieces:  # the parameters' current values
            self.p_shard[c:d] = p.reshape(-1)[a:b]
        self.optimizer.step()
        self.comm.allgather(self.p_shard, self.weights.flat)
        self.weights.unpack()

    # -- checkpoints: the full state, whatever N -------------------------------------

    def state_dict(self) -> dict:
        """AdamW.state_dict() with the *full* moments gathered from every rank: a
        collective (every rank calls it), the same on every rank, and in the format a
        one-process AdamW writes, so a checkpoint resumes with any number of ranks."""
        state = self.optimizer.state_dict()
        xp = self.weights.xp
        for key in ("m", "v"):
            moments = getattr(self.optimizer, key)
            shard = xp.zeros_like(self.p_shard)  # (S,)
            for name, _, _, _, c, d in self.pieces:
                shard[c:d] = moments[name]
            full = xp.zeros_like(self.weights.flat)  # (N S,)
            self.comm.allgather(shard, full)
            state[key] = {name: to_numpy(full[start:stop]).reshape(p.shape)
                          for (name, p, _), (start, stop)
                          in zip(self.params, self.weights.offsets, strict=True)}
        return state

    def load_state_dict(self, state: dict) -> None:
        """Take this rank's shard of a full AdamW state (written with any N)."""
        shapes = {name: tuple(p.shape) for name, p, _ in self.params}
        for key in ("m", "v"):
            got = set(state[key])
            if got != set(shapes):
                raise ValueError(
                    f"optimizer state does not match the parameters: missing "
                    f"{sorted(set(shapes) - got)}, unexpected {sorted(got - set(shapes))}")
            for name, arr in state[key].items():
                if tuple(arr.shape) != shapes[name]:
                    raise ValueError(f"optimizer state {key}[{name}] has shape {arr.shape}, "
                                     f"expected {shapes[name]}")
        mine = {**state, "m": {}, "v": {}}
        for key in ("m", "v"):
            for name, _, a, b, _, _ in self.pieces:
                mine[key][name] = np.asarray(to_numpy(state[key][name])).reshape(-1)[a:b]
            if not self.pieces:
                mine[key][_PADDING] = np.zeros(self.p_shard.size, dtype=self.p_shard.dtype)
        self.optimizer.load_state_dict(mine)

