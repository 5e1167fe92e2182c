"""Peak memory of one attention layer's training step: standard vs flash attention.

    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 python benchmarks/bench_attention_memory.py
    ... --T 512 1024 2048 --budget-gib 4 --verify

For each context T and each implementation (CausalSelfAttention(attention=...)),
one forward + backward of a single layer (B=1, d_model 64, 4 heads, float32) runs
under tracemalloc, which sees every NumPy allocation; the peak counts everything
allocated from the start of the step: the input, the upstream gradient, the
layer's cache, its temporaries and the gradients. The layer's parameters (~66 KB)
are made before and not counted.

Then the longest context whose step fits in `--budget-gib`: the measured peaks are
fitted by a T^2 + b T + c (standard) or b T + c (flash) and the fit is solved for
the budget. `--verify` runs the standard path once at its predicted longest
context (a few GiB of RAM and some seconds) to check the extrapolation; the
flash prediction is far too long a context to run here (its time grows as T^2).
"""

from __future__ import annotations

import argparse
import gc
import time
import tracemalloc

import numpy as np

from tinylm.nn import CausalSelfAttention

D_MODEL, HEADS = 64, 4


def step_peak(attention: str, T: int, block: int) -> tuple[int, float]:
    """(peak bytes, seconds) of one forward + backward at context T."""
    layer = CausalSelfAttention(D_MODEL, HEADS, attention=attention, block_q=block,
                                block_k=block, rng=0)
    gc.collect()
    tracemalloc.start()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, T, D_MODEL), dtype=np.float32)  # (B, T, C)
    dout = rng.standard_normal((1, T, D_MODEL), dtype=np.float32)  # (B, T, C)
    start = time.perf_counter()
    layer.forward(x)
    layer.backward(dout)
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak, seconds


def longest_context(Ts, peaks, budget: float, quadratic: bool) -> int:
    """The largest T with fit(T) <= budget, from a least-squares polynomial fit."""
    Ts = np.asarray(Ts, dtype=np.float64)
    coef = np.polyfit(Ts, np.asarray(peaks, dtype=np.float64), 2 if quadratic else 1)
    roots = np.roots(coef - np.array([0.0] * (len(coef) - 1) + [budget]))
    return int(max(r.real for r in roots if abs(r.imag) < 1e-9 and r.real > 0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--T", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192])
    parser.add_argument("--block", type=int, default=128, help="flash tile size (both)")
    parser.add_argument("--standard-max-T", type=int, default=8192,
                        help="skip the standard path above this context")
    parser.add_argument("--budget-gib", type=float, default=4.0)
    parser.add_argument("--verify", action="store_true",
                        help="run the standard path at its predicted longest context")
    args = parser.parse_args()

    MiB = 2**20
    rows = {"standard": [], "flash": []}
    print(f"one attention layer, forward + backward: B=1, d_model={D_MODEL}, heads={HEADS}, "
          f"float32, flash tiles {args.block}x{args.block}")
    print(f"{'T':>6} | {'standard peak':>14} {'time':>8} | {'flash peak':>11} {'time':>8} | ratio")
    for T in args.T:
        line = f"{T:>6} |"
        for attention in ("standard", "flash"):
            if attention == "standard" and T > args.standard_max_T:
                line += f" {'skipped':>14} {'':>8} |"
                continue
            peak, seconds = step_peak(attention, T, args.block)
            rows[attention].append((T, peak))
            width = 14 if attention == "standard" else 11
            line += f" {peak / MiB:>{width - 4}.1f} MiB {seconds:>7.2f}s |"
        if len(rows["standard"]) and rows["standard"][-1][0] == T:
            line += f" {rows['standard'][-1][1] / rows['flash'][-1][1]:.0f}x"
        print(line, flush=True)

    budget = args.budget_gib * 2**30
    fits = {}
    for attention, quadratic in (("standard", True), ("flash", False)):
        Ts, peaks = zip(*rows[attention], strict=True)
        fits[attention] = longest_context(Ts, peaks, budget, quadratic)
        print(f"longest context in {args.budget_gib:g} GiB, {attention}: ~{fits[attention]:,} "
              f"(extrapolated from the fit)")
    if args.verify:
        T = fits["standard"]
        peak, seconds = step_peak("standard", T, args.block)
        print(f"verify: standard at T={T:,}: peak {peak / 2**30:.2f} GiB ({seconds:.1f} s)")


if __name__ == "__main__":
    main()
