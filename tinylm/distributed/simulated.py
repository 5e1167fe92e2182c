"""N ranks in one process: each rank is a thread with a ThreadComm.

    results = run_ranks(train_fn, size=3)    # train_fn(comm) runs on ranks 0, 1, 2

The ranks exchange arrays through a shared list and a barrier instead of a network,
so a notebook or a test can run the real data-parallel code with no MPI installed.
Each collective reduces the ranks' arrays in rank order (rank 0 + rank 1 + ...),
so every rank gets bitwise the same result, as MPI's allreduce gives.

A rank that raises breaks the barrier: the others get BrokenBarrierError at their
next collective instead of waiting forever, which is what MPI_Abort does to a job.
"""

from __future__ import annotations

import threading

import numpy as np

from tinylm.backend import xp_of
from tinylm.distributed.comm import Communicator


class _World:
    """What the threads share: one slot per rank and a barrier."""

    def __init__(self, size: int):
        self.size = size
        self.slots: list = [None] * size
        self.barrier = threading.Barrier(size)


class ThreadComm(Communicator):
    backend = "threads"

    def __init__(self, world: _World, rank: int):
        super().__init__(rank, world.size)
        self.world = world

    def _exchange(self, value) -> list:
        """Every rank's `value`, in rank order."""
        w = self.world
        w.slots[self.rank] = value
        w.barrier.wait()  # all values are in
        values = list(w.slots)
        w.barrier.wait()  # all ranks have read them: the slots may be reused
        return values

    def _sum(self, buf) -> object:
        parts = self._exchange(buf.copy())  # a copy: this rank overwrites buf next
        total = parts[0].copy()
        for part in parts[1:]:
            total += part
        return total

    def _allreduce_sum(self, buf):
        buf[...] = self._sum(buf)

    def _reduce_scatter_sum(self, buf, out):
        S = out.size
        out[...] = self._sum(buf)[self.rank * S:(self.rank + 1) * S]

    def _allgather(self, shard, out):
        out[...] = xp_of(shard).concatenate(self._exchange(shard.copy()))

    def _broadcast(self, buf, root):
        buf[...] = self._exchange(buf.copy())[root]

    def broadcast_object(self, obj, root: int = 0):
        return self._exchange(obj)[root]

    def allreduce_floats(self, values) -> list[float]:
        rows = self._exchange(np.array(values, dtype=np.float64))
        return [float(v) for v in np.sum(rows, axis=0)]

    def barrier(self) -> None:
        self._exchange(None)

    def abort(self, code: int = 1) -> None:
        self.world.barrier.abort()  # the other ranks' next (or current) wait raises


def run_ranks(fn, size: int) -> list:
    """Run `fn(comm)` on `size` simulated ranks (threads); return their results in rank
    order. If a rank raises, the others are stopped and its exception is raised here."""
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    world = _World(size)
    results: list = [None] * size
    errors: list = [None] * size

    def target(rank):
        comm = ThreadComm(world, rank)
        try:
            results[rank] = fn(comm)
        except BaseException as exc:  # noqa: B036 - handed to the caller below
            errors[rank] = exc
            comm.abort()

    threads = [threading.Thread(target=target, args=(r,), name=f"rank{r}") for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # the first rank that failed for a reason of its own, not because another aborted
    first = next((e for e in errors if e is not None
                  and not isinstance(e, threading.BrokenBarrierError)), None)
    first = first or next((e for e in errors if e is not None), None)
    if first is not None:
        raise first
    return results
