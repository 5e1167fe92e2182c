"""Where does a training step's time go? Per layer type, forward and backward, in a real step.

    OPENBLAS_NUM_THREADS=1 python benchmarks/profile_step.py --config small
    python benchmarks/profile_step.py --config medium --steps 3 --threads 2

Wraps `forward` and `backward` of every layer class in the model (and the loss, the
tied head, clipping and AdamW) with a timer, runs `--steps` full training steps
(after one warm-up step) exactly as `tinylm bench` does, and prints each one's
*exclusive* time: a layer's time minus the time of the layers it calls (so
CausalSelfAttention's row is its own work, without its `qkv` and `proj` Linears).
The timers cost a few microseconds per call: negligible next to these layers.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import defaultdict


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--config", default="small", choices=["tiny", "small", "medium"])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="wall: perf_counter; cpu: process_time (CPU seconds of every thread "
                        "of this process, kernel time included: steadier on a busy machine)")
    p.add_argument("--threads", type=int, default=None,
                   help="BLAS threads (default: leave the environment's setting)")
    args = p.parse_args(argv)
    if args.threads is not None:
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = str(args.threads)  # before NumPy loads

    import numpy as np

    import tinylm.optim as optim
    from tinylm.bench import CONFIGS
    from tinylm.model import GPT, GPTConfig
    from tinylm.nn import SoftmaxCrossEntropy

    V, d, L, H, T, B = CONFIGS[args.config]
    model = GPT(GPTConfig(vocab_size=V, context_length=T, d_model=d, n_layers=L, n_heads=H))
    loss_fn = SoftmaxCrossEntropy(label_smoothing=0.1)
    opt = optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)

    clock = time.perf_counter if args.clock == "wall" else time.process_time
    totals = defaultdict(float)  # (name, "fwd"|"bwd") -> exclusive seconds
    stack = []  # [child seconds] of the calls in progress

    def timed(name, kind, fn):
        def wrapper(*a, **kw):
            stack.append(0.0)
            t0 = clock()
            try:
                return fn(*a, **kw)
            finally:
                dt = clock() - t0
                children = stack.pop()
                totals[(name, kind)] += dt - children
                if stack:
                    stack[-1] += dt
        return wrapper

    classes = {type(m) for m in model.modules()} | {SoftmaxCrossEntropy}
    for cls in classes:
        for kind, meth in (("fwd", "forward"), ("bwd", "backward")):
            if meth in vars(cls):
                setattr(cls, meth, timed(cls.__name__, kind, vars(cls)[meth]))
    GPT._head = timed("head (tied)", "fwd", GPT._head)
    clip = timed("clip_grad_norm", "opt", optim.clip_grad_norm)
    opt.step = timed("AdamW", "opt", opt.step)
    zero = timed("zero_grad", "opt", model.zero_grad)

    rng = np.random.default_rng(0)
    batch = [rng.integers(0, V, (B, T)) for _ in "xy"]
    step_times = []
    for i in range(args.steps + 1):
        if i == 1:
            totals.clear()  # the first step is a warm-up
        t0 = clock()
        zero()
        loss_fn.forward(model.forward(batch[0]), batch[1])
        model.backward(loss_fn.backward())
        clip(model.parameters(), 1.0)
        opt.step()
        if i >= 1:
            step_times.append(clock() - t0)

    n = args.steps
    step = sum(step_times) / n
    # GPT.forward/backward's own rows include the tied head's backward matmuls
    rows = sorted(totals.items(), key=lambda kv: -kv[1])
    print(f"{args.config} (V={V}, d={d}, L={L}, H={H}, T={T}, B={B}), "
          f"{os.environ.get('OPENBLAS_NUM_THREADS', '?')} BLAS thread(s), "
          f"mean step {step * 1e3:.1f} ms ({args.clock}) over {n} steps")
    print(f"{'layer':<22} {'pass':<4} {'ms/step':>8} {'share':>6}")
    for (name, kind), sec in rows:
        print(f"{name:<22} {kind:<4} {sec / n * 1e3:>8.2f} {sec / n / step:>6.1%}")
    other = step - sum(totals.values()) / n
    print(f"{'(untimed glue)':<22} {'':<4} {other * 1e3:>8.2f} {other / step:>6.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
