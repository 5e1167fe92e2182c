"""Attention's pieces, plain against fast, on one layer's shapes (float32).

    python benchmarks/bench_attention_parts.py --threads 2
    python benchmarks/bench_attention_parts.py --threads 1 --shape 8,6,256,64

Times, with the same inputs in one process, each choice tinylm's attention makes
(tinylm/nn/attention.py, functional.py, causal_blocks.py):
- the softmax backward: the plain three lines against `softmax_backward_fast`;
- a stack of small products: `a @ b` against `functional.matmul` (split between threads);
- a transposed (T, T) left operand: a contiguous copy and its product, against the view;
- a transposed (T, hs) right operand: the view against a contiguous copy;
- the whole core of one layer's forward and backward (attend and B7-B3): full (T, T)
  matrices against the causal row blocks (`attend_blocks`).
Each figure is the median of --rounds rounds of --repeat calls, the two sides alternating.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--shape", default="16,4,128,32", help="B,H,T,hs (default: the small config)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--repeat", type=int, default=20)
    args = p.parse_args(argv)
    if "numpy" in sys.modules:
        sys.exit("run this as a script: the thread count must be set before NumPy loads")
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    import tinylm  # noqa: F401  (first: it sets OpenBLAS's thread spin before NumPy loads)

    # isort: split
    import numpy as np

    from tinylm.nn import functional as F
    from tinylm.nn.attention import _transposed, attend, attention_mask
    from tinylm.nn.causal_blocks import attend_blocks, attend_blocks_backward

    F.set_num_threads(args.threads)
    F.keep_freed_memory()  # as in training: no page faults in the timings
    B, H, T, hs = (int(n) for n in args.shape.split(","))
    rng = np.random.default_rng(0)

    def rand(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    q, kT, v, dy = rand(B, H, T, hs), rand(B, H, hs, T), rand(B, H, T, hs), rand(B, H, T, hs)
    mask = attention_mask(np.arange(T), np.arange(T), None, np, np.float32)
    att = F.softmax(q @ kT + mask)  # (B, H, T, T) weights
    datt = rand(B, H, T, T)
    scale = 1.0 / math.sqrt(hs)

    def softmax_backward_plain():
        d = datt.copy()
        d -= (d * att).sum(axis=-1, keepdims=True)
        d *= att
        d *= scale

    def softmax_backward_fast():
        F.softmax_backward_fast(att, datt.copy(), scale)

    def full_core():
        y, a, _ = attend(q, kT, v, mask)
        dd = F.matmul(dy, _transposed(v))
        F.matmul(a.swapaxes(-1, -2), dy)
        ds = F.softmax_backward_fast(a, dd, scale)
        F.matmul(ds, _transposed(kT)), F.matmul(ds.swapaxes(-1, -2), q)

    def blocked_core():
        y, blocks = attend_blocks(q, kT, v, mask, None)
        attend_blocks_backward(q, kT, v, blocks, dy)

    k = _transposed(kT)  # (B, H, T, hs)
    pairs = [
        ("softmax backward", softmax_backward_plain, softmax_backward_fast),
        ("q @ k^T (stack of small products)", lambda: q @ kT, lambda: F.matmul(q, kT)),
        ("att^T @ dy: copy, or view", lambda: _transposed(att) @ dy,
         lambda: att.swapaxes(-1, -2) @ dy),
        ("q @ k^T: view, or copy", lambda: q @ k.swapaxes(-1, -2), lambda: q @ _transposed(k)),
        ("attention core, fwd + bwd: full, or row blocks", full_core, blocked_core),
    ]
    print(f"B={B} H={H} T={T} hs={hs}, float32, {args.threads} thread(s); ms per call, "
          f"median of {args.rounds} rounds")
    print(f"{'piece':<50} {'plain':>8} {'fast':>8}")
    for name, plain, fast in pairs:
        times = {plain: [], fast: []}
        for _ in range(args.rounds):
            for fn in (plain, fast):
                fn()
                t0 = time.perf_counter()
                for _ in range(args.repeat):
                    fn()
                times[fn].append((time.perf_counter() - t0) / args.repeat * 1e3)
        print(f"{name:<50} {statistics.median(times[plain]):>8.3f} "
              f"{statistics.median(times[fast]):>8.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
