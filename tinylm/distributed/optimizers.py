"""The optimizer step of data-parallel training, with and without ZeRO-1.

After the backward passes of a step, every rank holds the gradient of its own
slice of the global batch. Two calls turn that into the update one process would
make with the whole batch, as `clip_grad_norm` and `AdamW.step` do in one process:

    norm = opt.reduce_and_clip(max_norm)      # collective; the same norm on every rank
    opt.step()                                # the update (ZeRO-1: then an allgather)

    DataParallelAdamW (every rank keeps all of AdamW's state)
        reduce_and_clip  allreduce the flat gradient (mean), clip by its global norm
        step             AdamW on every parameter, identical on every rank

    ZeroAdamW (zero.py: each rank keeps 1/N of AdamW's state)
        reduce_and_clip  reduce-scatter the flat gradient (mean): each rank gets its
                         shard; the global norm from the shards' squared norms
        step             AdamW on this rank's shard, then allgather the shards

The two calls are separate so a trainer can refuse a non-finite norm before any
weight changes. The all-reduce runs once per optimizer step, however many
micro-batches were accumulated. Both classes hold a tinylm.optim.AdamW and use its
arithmetic unchanged, and both have its interface (lr, betas, eps, weight_decay, t,
state_dict, load_state_dict, zero_grad), so a trainer can use them in its place.
"""

from __future__ import annotations

import math

from tinylm.distributed.flat import GradientAllReduce
from tinylm.optim import AdamW, clip_grad_norm


def _forwarded(name: str) -> property:
    """A property that reads and writes the inner AdamW's attribute `name`."""
    return property(lambda self: getattr(self.optimizer, name),
                    lambda self, value: setattr(self.optimizer, name, value))


class _AdamWFace:
    """AdamW's interface, forwarded to the AdamW inside (`self.optimizer`)."""

    lr = _forwarded("lr")  # the trainer sets it every step (the schedule)
    betas = _forwarded("betas")
    eps = _forwarded("eps")
    weight_decay = _forwarded("weight_decay")
    t = _forwarded("t")

    def zero_grad(self) -> None:
        for _, _, g in self.params:
            g.fill(0)

    def state_bytes(self) -> int:
        return state_bytes(self)


class DataParallelAdamW(_AdamWFace):
    """AdamW after a gradient all-reduce; every rank keeps the full optimizer state."""

    zero = False

    def __init__(self, params, comm, **adamw):
        self.params = list(params)  # [(name, p, g)]
        self.comm = comm
        self.optimizer = AdamW(self.params, **adamw)
        self.allreduce = GradientAllReduce(self.params, comm)

    def reduce_and_clip(self, max_norm: float = math.inf) -> float:
        """Average the gradients over the ranks (one allreduce), clip them by their
        global norm; returns the norm before clipping (the same on every rank)."""
        self.allreduce()
        return clip_grad_norm(self.params, max_norm)

    def step(self) -> None:
        self.optimizer.step()

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()  # the same on every rank

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)


def state_bytes(optimizer) -> int:
    """Bytes of AdamW state (m and v) this rank holds: of an AdamW, or of either wrapper."""
    inner = getattr(optimizer, "optimizer", optimizer)
    return sum(int(a.nbytes) for store in (inner.m, inner.v) for a in store.values())


def make_optimizer(params, comm, zero: bool = False, **adamw):
    """DataParallelAdamW, or ZeroAdamW when `zero` (AdamW's keyword arguments pass on)."""
    if zero:
        from tinylm.distributed.zero import ZeroAdamW

        return ZeroAdamW(params, comm, **adamw)
    return DataParallelAdamW(params, comm, **adamw)
