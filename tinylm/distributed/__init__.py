"""Data-parallel training: N processes, one global batch, the update of one process.

    comm = distributed.init()                  # MPI under mpirun, else one process
    opt = distributed.make_optimizer(model.parameters(), comm, zero=False, lr=...)
    with distributed.abort_on_failure(comm):   # a failing rank ends the job
        for step in ...:
            model.zero_grad()
            for _ in range(k):                 # gradient accumulation
                x, y = batches.next()          # the GLOBAL batch, same on every rank
                x_r, y_r, w = distributed.shard_batch(x, y, comm.rank, comm.size)
                loss = loss_fn.forward(model.forward(x_r), y_r)
                model.backward(loss_fn.backward(w / k))
            norm = opt.reduce_and_clip(max_norm)   # one collective, clip by the global norm
            opt.step()                             # AdamW

The pieces, one file each:
    comm.py        Communicator: SingleProcess, MPIComm (CuPy arrays staged via the host)
    nccl.py        NCCLComm: CuPy arrays reduced by NCCL, bootstrapped by MPI
    simulated.py   ThreadComm / run_ranks: N ranks as threads of one process
    flat.py        FlatBuffer: every gradient in one flat vector, one allreduce
    batch.py       shard_batch: a rank's rows of the global batch and their weight
    optimizers.py  DataParallelAdamW (allreduce, clip, AdamW), make_optimizer
    zero.py        ZeroAdamW: ZeRO-1, AdamW's moments sharded over the ranks
    failure.py     abort_on_failure: an exception on one rank aborts them all
    coordination.py  run_on_root, agreed_stop, broadcast_parameters: the trainer's needs

docs/distributed.md tells how to install MPI and launch; notebook 21 explains why.
"""

from tinylm.distributed.batch import row_ranges, shard_batch
from tinylm.distributed.comm import (
    Communicator,
    MPIComm,
    SingleProcess,
    init,
    launched_world_size,
)
from tinylm.distributed.coordination import agreed_stop, broadcast_parameters, run_on_root
from tinylm.distributed.failure import abort_on_failure
from tinylm.distributed.flat import FlatBuffer, GradientAllReduce, buckets_by_dtype
from tinylm.distributed.optimizers import DataParallelAdamW, make_optimizer, state_bytes
from tinylm.distributed.simulated import ThreadComm, run_ranks
from tinylm.distributed.zero import ZeroAdamW

__all__ = [
    "Communicator", "DataParallelAdamW", "FlatBuffer", "GradientAllReduce", "MPIComm",
    "SingleProcess", "ThreadComm", "ZeroAdamW", "abort_on_failure", "agreed_stop",
    "broadcast_parameters", "buckets_by_dtype", "init", "launched_world_size",
    "make_optimizer", "row_ranges", "run_on_root", "run_ranks", "shard_batch", "state_bytes",
]
