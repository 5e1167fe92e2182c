"""A tiny float64 GPT trained a few steps, one process or data-parallel: the check
that N ranks make the same update as one process.

    python -m tinylm.distributed.tiny --out one.npz                 # one process, plain AdamW
    mpirun -n 3 python -m tinylm.distributed.tiny --out three.npz   # 3 ranks
    mpirun -n 3 python -m tinylm.distributed.tiny --zero --out z.npz

Both runs draw the same global batches, clip, and accumulate gradients over
micro-batches; the final parameters agree to rounding (~1e-15 relative).
tests/test_distributed.py and notebooks/21_data_parallel.ipynb use it.
"""

from __future__ import annotations

import argparse
import os
import signal

import numpy as np

from tinylm.backend import to_device, to_numpy
from tinylm.data import Batches
from tinylm.distributed.batch import shard_batch
from tinylm.distributed.comm import init
from tinylm.distributed.failure import abort_on_failure
from tinylm.distributed.optimizers import make_optimizer, state_bytes
from tinylm.model import GPT, GPTConfig
from tinylm.nn import SoftmaxCrossEntropy
from tinylm.optim import AdamW, clip_grad_norm, cosine_schedule

TINY = dict(vocab_size=13, context_length=8, d_model=16, n_layers=2, n_heads=2)


def train_tiny(comm=None, *, steps: int = 4, batch_size: int = 5, accum: int = 2,
               clip: float = 0.05, zero: bool = False, seed: int = 0,
               device: str = "cpu", fail_at: tuple[int, int] | None = None) -> dict:
    """Train the tiny model `steps` steps; `comm` None is the one-process reference
    (tinylm.optim's AdamW and clip_grad_norm, as the Trainer uses them).

    Returns {"params": {name: array}, "losses", "norms", "state_bytes", "comm_s"}.
    `fail_at` = (rank, step): that rank raises there, or kills itself with SIGKILL
    when the rank is negative (-1 - rank), to test failure handling."""
    model = GPT(GPTConfig(**TINY), seed=seed, device=device, dtype="float64")
    loss_fn = SoftmaxCrossEntropy()
    tokens = np.random.default_rng(seed).integers(0, TINY["vocab_size"], 500)
    batches = Batches(tokens, TINY["context_length"], batch_size, seed=[seed, 1])
    params = list(model.parameters())
    adamw = dict(lr=3e-2, weight_decay=0.1)
    if comm is None:
        opt = AdamW(params, **adamw)
    else:
        opt = make_optimizer(params, comm, zero=zero, **adamw)
    rank, size = (0, 1) if comm is None else (comm.rank, comm.size)
    losses, norms = [], []
    for step in range(steps):
        opt.lr = cosine_schedule(step, max_lr=3e-2, min_lr=3e-3, warmup_steps=1,
                                 decay_steps=steps)
        model.zero_grad()
        loss_sum = 0.0
        for _ in range(accum):
            x, y = batches.next()  # (B, T): the global batch, drawn alike on every rank
            if comm is not None:
                x, y, weight = shard_batch(x, y, rank, size)  # (B_r, T), N n_r / n
            else:
                weight = 1.0
            xp = model.xp  # numpy, or cupy for device="cuda"
            loss = loss_fn.forward(model.forward(to_device(x, xp)), to_device(y, xp))
            model.backward(loss_fn.backward(weight / accum))
            loss_sum += weight * loss / (accum * size)  # this rank's part of the mean
        if fail_at is not None and step == fail_at[1]:
            if fail_at[0] == rank:
                raise RuntimeError(f"rank {rank} fails on purpose at step {step}")
            if fail_at[0] == -1 - rank:
                os.kill(os.getpid(), signal.SIGKILL)
        if comm is None:
            norm = clip_grad_norm(params, clip)
            opt.step()
        else:
            norm = opt.reduce_and_clip(clip)  # the allreduce (once per step), global clip
            opt.step()
            loss_sum = comm.allreduce_floats([loss_sum])[0]
        losses.append(loss_sum)
        norms.append(norm)
    state = opt.state_dict()  # full moments on every rank, also with ZeRO (a collective)
    return {"params": {name: to_numpy(p).copy() for name, p, _ in model.parameters()},
            "losses": losses, "norms": norms, "t": state["t"],
            "state_bytes": state_bytes(opt),
            "comm_s": comm.stats["seconds"] if comm is not None else 0.0,
            "m": state["m"], "v": state["v"]}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="rank 0 writes the final parameters here (.npz)")
    ap.add_argument("--zero", action="store_true", help="ZeRO-1: shard AdamW's moments")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=5)
    ap.add_argument("--accum", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (CuPy arrays)")
    ap.add_argument("--single", action="store_true",
                    help="the one-process reference (plain AdamW), even under mpirun")
    ap.add_argument("--fail", type=int, nargs=2, metavar=("RANK", "STEP"),
                    help="that rank raises at that step (RANK < 0: rank -1-RANK is SIGKILLed)")
    args = ap.parse_args(argv)
    comm = None if args.single else init()
    kw = dict(steps=args.steps, batch_size=args.batch_size, accum=args.accum,
              zero=args.zero, device=args.device, fail_at=tuple(args.fail) if args.fail else None)
    if comm is None:
        result = train_tiny(None, **kw)
    else:
        with abort_on_failure(comm):
            result = train_tiny(comm, **kw)
    rank = 0 if comm is None else comm.rank
    size = 1 if comm is None else comm.size
    bytes_per_rank = [result["state_bytes"]] if comm is None else \
        _gather_ints(comm, result["state_bytes"])
    if rank == 0:
        print(f"world_size {size} zero {int(args.zero)} final loss {result['losses'][-1]:.6f} "
              f"optimizer state bytes per rank {bytes_per_rank}")
        if args.out:
            np.savez(args.out, losses=np.array(result["losses"]),
                     norms=np.array(result["norms"]),
                     **{f"p/{k}": v for k, v in result["params"].items()},
                     **{f"m/{k}": v for k, v in result["m"].items()},
                     **{f"v/{k}": v for k, v in result["v"].items()})


def _gather_ints(comm, value: int) -> list[int]:
    """Every rank's `value`, in rank order (a sum of one-hot vectors)."""
    row = [0.0] * comm.size
    row[comm.rank] = float(value)
    return [int(v) for v in comm.allreduce_floats(row)]


if __name__ == "__main__":
    main()
