"""NCCLComm: CuPy arrays reduced by NCCL, GPU to GPU, with no copies through the host.

MPI starts it and stays for the small things: rank 0 asks NCCL for a unique id,
MPI broadcasts it, every rank joins the NCCL communicator with it. The array
collectives then run on the GPUs, on the current CuPy stream; objects, host
floats, barriers and aborts still go through MPI.

    comm = distributed.init("nccl")          # under mpirun, one GPU per rank

Each rank must drive its own GPU (NCCL refuses two ranks on one device):
`select_gpu` picks the GPU whose number is the rank's index on its machine.

Status: written against CuPy's documented `cupy.cuda.nccl` API (NcclCommunicator,
allReduce, reduceScatter, allGather, bcast). CI has no GPU and the CuPy test
double has no NCCL, so this file has not been run; MPIComm's host staging is the
tested way to train on GPUs with MPI.
"""

from __future__ import annotations

import importlib

from tinylm.backend import get_xp
from tinylm.distributed.comm import Communicator, MPIComm

_NCCL_DTYPES = {"float16": "NCCL_FLOAT16", "float32": "NCCL_FLOAT32",
                "float64": "NCCL_FLOAT64"}


def _nccl_module(cp):
    try:
        return importlib.import_module(cp.__name__ + ".cuda.nccl")
    except ImportError as exc:
        raise RuntimeError(f"this CuPy has no NCCL ({exc}); use the MPI backend, which "
                           "stages CuPy arrays through host memory") from exc


def select_gpu(mpi: MPIComm) -> int:
    """Make this rank use GPU (local rank mod GPUs per machine); returns its number."""
    cp = get_xp("cuda")
    local = mpi.comm.Split_type(mpi.MPI.COMM_TYPE_SHARED).Get_rank()  # rank on this machine
    device = local % cp.cuda.runtime.getDeviceCount()
    cp.cuda.Device(device).use()
    return device


class NCCLComm(Communicator):
    backend = "nccl"

    def __init__(self, mpi: MPIComm | None = None):
        self.mpi = MPIComm() if mpi is None else mpi
        super().__init__(self.mpi.rank, self.mpi.size)
        self.cp = get_xp("cuda")
        self.nccl = _nccl_module(self.cp)
        self.device = select_gpu(self.mpi)
        uid = self.mpi.broadcast_object(self.nccl.get_unique_id() if self.rank == 0 else None)
        self.comm = self.nccl.NcclCommunicator(self.size, uid, self.rank)

    def _dtype(self, buf) -> int:
        try:
            return getattr(self.nccl, _NCCL_DTYPES[buf.dtype.name])
        except KeyError:
            raise TypeError(f"NCCLComm reduces float arrays, got {buf.dtype}") from None

    def _run(self, op, *args) -> None:
        stream = self.cp.cuda.get_current_stream()
        op(*args, stream.ptr)
        stream.synchronize()  # NCCL is asynchronous: wait, so `stats` times the transfer

    def _allreduce_sum(self, buf):
        self._run(self.comm.allReduce, buf.data.ptr, buf.data.ptr, buf.size,
                  self._dtype(buf), self.nccl.NCCL_SUM)

    def _reduce_scatter_sum(self, buf, out):
        self._run(self.comm.reduceScatter, buf.data.ptr, out.data.ptr, out.size,
                  self._dtype(buf), self.nccl.NCCL_SUM)

    def _allgather(self, shard, out):
        self._run(self.comm.allGather, shard.data.ptr, out.data.ptr, shard.size,
                  self._dtype(shard))

    def _broadcast(self, buf, root):
        self._run(self.comm.bcast, buf.data.ptr, buf.size, self._dtype(buf), root)

    def broadcast_object(self, obj, root: int = 0):
        return self.mpi.broadcast_object(obj, root)

    def allreduce_floats(self, values) -> list[float]:
        return self.mpi.allreduce_floats(values)

    def barrier(self) -> None:
        self.mpi.barrier()

    def abort(self, code: int = 1) -> None:
        self.mpi.abort(code)
