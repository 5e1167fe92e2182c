"""Time data-parallel training steps: tokens/s, time in collectives, optimizer memory.

    OMP_NUM_THREADS=2 python -m tinylm.distributed.bench --config small medium
    OMP_NUM_THREADS=1 mpirun -n 2 python -m tinylm.distributed.bench --config small medium
    OMP_NUM_THREADS=1 mpirun -n 2 python -m tinylm.distributed.bench --zero

The configurations are tinylm.bench's (`tinylm bench`), with the same global batch
whatever the number of ranks: each rank runs B / N rows. A step is forward, label-
smoothed cross-entropy, backward, the distributed optimizer step (allreduce or
ZeRO-1, clip at 1.0, AdamW). "comm" is the time spent inside collectives (waiting for
a slower rank included), as `Communicator.stats` counts it. Rank 0 prints one JSON
line per configuration.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from tinylm.bench import CONFIGS
from tinylm.distributed.batch import shard_batch
from tinylm.distributed.comm import init
from tinylm.distributed.failure import abort_on_failure
from tinylm.distributed.optimizers import make_optimizer
from tinylm.model import GPT, GPTConfig
from tinylm.nn import SoftmaxCrossEntropy


def bench_config(comm, name: str, steps: int, warmup: int, zero: bool) -> dict:
    V, d, L, H, T, B = CONFIGS[name]
    model = GPT(GPTConfig(vocab_size=V, context_length=T, d_model=d, n_layers=L, n_heads=H))
    loss_fn = SoftmaxCrossEntropy(label_smoothing=0.1)
    opt = make_optimizer(model.parameters(), comm, zero=zero, lr=1e-4, betas=(0.9, 0.95),
                         weight_decay=0.1)
    rng = np.random.default_rng(0)
    batches = [(rng.integers(0, V, (B, T)), rng.integers(0, V, (B, T))) for _ in range(4)]
    for i in range(warmup + steps):
        if i == warmup:  # start the clock together, after the warm-up steps
            comm.barrier()
            comm.reset_stats()
            t0 = time.perf_counter()
        x, y = batches[i % len(batches)]  # (B, T): the global batch
        x_r, y_r, w = shard_batch(x, y, comm.rank, comm.size)  # (B / N, T)
        model.zero_grad()
        loss_fn.forward(model.forward(x_r), y_r)
        model.backward(loss_fn.backward(w))
        opt.reduce_and_clip(1.0)
        opt.step()
    comm.barrier()
    elapsed = time.perf_counter() - t0
    comm_s = comm.stats["seconds"]
    worst_comm = max(comm.allreduce_floats(np.eye(comm.size)[comm.rank] * comm_s))
    return {
        "config": name, "world_size": comm.size, "zero": zero, "rows_per_rank": len(x_r),
        "tokens_per_s": steps * B * T / elapsed, "step_ms": elapsed / steps * 1e3,
        "comm_ms_per_step": worst_comm / steps * 1e3, "comm_share": worst_comm / elapsed,
        "grad_mb": 4 * model.num_parameters() / 1e6,
        "optimizer_state_mb_per_rank": opt.state_bytes() / 1e6,
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", nargs="+", default=["small", "medium"], choices=list(CONFIGS))
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--zero", action="store_true", help="ZeRO-1: shard AdamW's moments")
    args = ap.parse_args(argv)
    comm = init()
    with abort_on_failure(comm):
        for name in args.config:
            result = bench_config(comm, name, args.steps, args.warmup, args.zero)
            if comm.rank == 0:
                print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
