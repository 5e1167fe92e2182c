"""Communicators: how the ranks of a data-parallel job exchange arrays.

A job is `size` processes (ranks 0..size-1) running the same script. Training
needs only a few collective operations, each called by every rank at the same
point of the script, on 1-D contiguous arrays of one dtype:

    allreduce_sum(buf)              buf <- sum over ranks of buf              (n,)
    reduce_scatter_sum(buf, out)    out <- sum over ranks of my chunk of buf  (size*S,) -> (S,)
    allgather(shard, out)           out <- [shard of rank 0 | rank 1 | ...]  (S,) -> (size*S,)
    broadcast(buf, root)            buf <- root's buf
    broadcast_object, allreduce_floats, barrier, abort

Implementations (`init()` picks one):
    SingleProcess   world size 1: every collective is the identity; no MPI needed
    MPIComm         mpi4py; NumPy arrays go straight to MPI; CuPy arrays are staged
                    through host memory (copied to the host, reduced, copied back),
                    which works with any MPI build, CUDA-aware or not
    NCCLComm        CuPy arrays reduced by NCCL on the GPUs, with MPI only to start
                    it (see nccl.py); written against CuPy's API but not run in CI
    ThreadComm      N ranks as threads of one process (simulated.py): notebooks, tests

Every communicator counts its collectives' calls, bytes and seconds in `stats`,
which is how the communication share of a step is measured.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time

import numpy as np

from tinylm.backend import to_device, to_numpy, xp_of

# What launchers set in each rank's environment: Open MPI's mpirun, MPICH's and
# Intel MPI's Hydra (PMI, as Slurm's `srun --mpi=pmi2`), MVAPICH's mpirun_rsh.
WORLD_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE")

INSTALL_HINT = ('pip install -e ".[distributed]" (mpi4py and an Open MPI that pip installs; '
                "see docs/distributed.md)")


def launched_world_size() -> int | None:
    """The world size an MPI launcher announced in the environment, or None when this
    process was not started by mpirun/mpiexec/srun."""
    for var in WORLD_SIZE_VARS:
        value = os.environ.get(var)
        if value and value.isdigit():
            return int(value)
    return None


class Communicator:
    """The collectives data-parallel training needs. Subclasses implement the `_ops`."""

    backend = "abstract"

    def __init__(self, rank: int, size: int):
        self.rank, self.size = rank, size
        self.stats = {"calls": 0, "bytes": 0, "seconds": 0.0}

    def __repr__(self) -> str:
        return f"<{type(self).__name__} rank {self.rank} of {self.size}>"

    @contextlib.contextmanager
    def _timed(self, nbytes: int):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.stats["calls"] += 1
            self.stats["bytes"] += int(nbytes)
            self.stats["seconds"] += time.perf_counter() - t0

    def reset_stats(self) -> dict:
        """Return the counters so far and start again from zero."""
        old, self.stats = self.stats, {"calls": 0, "bytes": 0, "seconds": 0.0}
        return old

    # -- the collectives: every rank calls each one, in the same order -----------------

    def allreduce_sum(self, buf) -> None:
        _check_flat(buf)
        with self._timed(buf.nbytes):
            self._allreduce_sum(buf)

    def reduce_scatter_sum(self, buf, out) -> None:
        _check_flat(buf, out)
        if buf.size != out.size * self.size:
            raise ValueError(f"reduce_scatter_sum: buf has {buf.size} elements, expected "
                             f"size * out.size = {self.size} * {out.size}")
        with self._timed(buf.nbytes):
            self._reduce_scatter_sum(buf, out)

    def allgather(self, shard, out) -> None:
        _check_flat(shard, out)
        if out.size != shard.size * self.size:
            raise ValueError(f"allgather: out has {out.size} elements, expected "
                             f"size * shard.size = {self.size} * {shard.size}")
        with self._timed(out.nbytes):
            self._allgather(shard, out)

    def broadcast(self, buf, root: int = 0) -> None:
        _check_flat(buf)
        with self._timed(buf.nbytes):
            self._broadcast(buf, root)

    def broadcast_object(self, obj, root: int = 0):
        """Root's `obj` (any picklable value) on every rank."""
        return obj

    def allreduce_floats(self, values) -> list[float]:
        """Sum a few host numbers (a loss, a token count, a stop flag) over the ranks."""
        return [float(v) for v in values]

    def barrier(self) -> None:
        pass

    def abort(self, code: int = 1) -> None:
        """End every rank of the job now (MPI_Abort); used by `abort_on_failure`."""
        sys.stderr.flush()
        os._exit(code)

    # -- implementations ---------------------------------------------------------------

    def _allreduce_sum(self, buf):
        raise NotImplementedError

    def _reduce_scatter_sum(self, buf, out):
        raise NotImplementedError

    def _allgather(self, shard, out):
        raise NotImplementedError

    def _broadcast(self, buf, root):
        raise NotImplementedError


class SingleProcess(Communicator):
    """World size 1: the sum over one rank is its own value, so nothing moves."""

    backend = "single"

    def __init__(self):
        super().__init__(0, 1)

    def _allreduce_sum(self, buf):
        pass

    def _reduce_scatter_sum(self, buf, out):
        out[...] = buf

    def _allgather(self, shard, out):
        out[...] = shard

    def _broadcast(self, buf, root):
        pass


class MPIComm(Communicator):
    """Collectives through mpi4py. NumPy buffers are handed to MPI as they are; CuPy
    buffers are staged through host memory: copied to a NumPy array, reduced there,
    copied back. Staging costs two PCIe copies per collective but needs no CUDA-aware
    MPI (the pip-installed Open MPI is not one); NCCLComm avoids the copies."""

    backend = "mpi"

    def __init__(self, comm=None):
        try:
            from mpi4py import MPI
        except ImportError as exc:
            raise RuntimeError(f"distributed training needs mpi4py: {INSTALL_HINT}") from exc
        self.MPI = MPI
        self.comm = MPI.COMM_WORLD if comm is None else comm
        super().__init__(self.comm.Get_rank(), self.comm.Get_size())

    def _allreduce_sum(self, buf):
        host = _host(buf)
        self.comm.Allreduce(self.MPI.IN_PLACE, host, op=self.MPI.SUM)
        _put_back(host, buf)

    def _reduce_scatter_sum(self, buf, out):
        host_out = _host(out)
        self.comm.Reduce_scatter_block(_host(buf), host_out, op=self.MPI.SUM)
        _put_back(host_out, out)

    def _allgather(self, shard, out):
        host_out = _host(out)
        self.comm.Allgather(_host(shard), host_out)
        _put_back(host_out, out)

    def _broadcast(self, buf, root):
        host = _host(buf)
        self.comm.Bcast(host, root=root)
        _put_back(host, buf)

    def broadcast_object(self, obj, root: int = 0):
        return self.comm.bcast(obj, root=root)

    def allreduce_floats(self, values) -> list[float]:
        buf = np.array(values, dtype=np.float64)  # (k,)
        self.comm.Allreduce(self.MPI.IN_PLACE, buf, op=self.MPI.SUM)
        return [float(v) for v in buf]

    def barrier(self) -> None:
        self.comm.Barrier()

    def abort(self, code: int = 1) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        self.comm.Abort(code)  # Open MPI's mpirun then kills every rank


def init(backend: str = "auto") -> Communicator:
    """The communicator for this process.

    "auto": MPI when an MPI launcher started this process (mpirun -n N sets
    OMPI_COMM_WORLD_SIZE, Hydra sets PMI_SIZE; even for N = 1), else SingleProcess.
    "mpi" forces MPI (an error without mpi4py); "single" forces one process;
    "nccl" is MPI plus NCCL for CuPy arrays (nccl.py)."""
    if backend not in ("auto", "mpi", "single", "nccl"):
        raise ValueError(f"backend must be 'auto', 'mpi', 'single' or 'nccl', got {backend!r}")
    if backend == "single" or (backend == "auto" and launched_world_size() is None):
        return SingleProcess()
    if backend == "nccl":
        from tinylm.distributed.nccl import NCCLComm

        return NCCLComm(MPIComm())
    return MPIComm()


def _check_flat(*arrays) -> None:
    for a in arrays:
        if a.ndim != 1 or not a.flags.c_contiguous:
            raise ValueError(f"collectives take 1-D contiguous arrays, got shape {a.shape}")


def _host(buf) -> np.ndarray:
    """`buf` itself when it is a NumPy array, else a host copy (staging)."""
    return buf if xp_of(buf) is np else to_numpy(buf)


def _put_back(host: np.ndarray, buf) -> None:
    """Copy a staged result back into the device buffer (nothing to do on the host)."""
    if host is not buf:
        buf[...] = to_device(host, xp_of(buf))
