"""Small array functions that several layers (and the sampler) share.

Each works on NumPy or CuPy arrays alike (`xp` comes from the data) and keeps
the input's dtype.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from tinylm.backend import xp_of


def softmax(x, axis: int = -1, out=None):
    """exp(x) / sum(exp(x)) along `axis`, stabilised by subtracting the row max
    (softmax is unchanged by a constant shift, and exp of a value <= 0 cannot
    overflow). Entries of -inf get probability exactly 0; each row needs at
    least one finite entry.

    `out=x` computes in place (attention's (B, H, T, T) scores are large: one
    pass less over memory, no temporary)."""
    xp = xp_of(x)
    if out is not None and axis in (-1, x.ndim - 1) and _contiguous(x, out) and use_fast(x, out):
        return softmax_fast(x, out)  # the same passes, in chunks on both cores
    out = x - x.max(axis=axis, keepdims=True) if out is None else _shift_into(x, out, axis)
    xp.exp(out, out=out)
    out /= out.sum(axis=axis, keepdims=True)
    return out


def _contiguous(*arrays) -> bool:
    return all(a.flags.c_contiguous for a in arrays)


def _shift_into(x, out, axis):
    xp_of(x).subtract(x, x.max(axis=axis, keepdims=True), out=out)
    return out


def log_softmax(x, axis: int = -1):
    """log softmax along `axis`: x - logsumexp(x), computed stably."""
    xp = xp_of(x)
    shifted = x - x.max(axis=axis, keepdims=True)
    return shifted - xp.log(xp.exp(shifted).sum(axis=axis, keepdims=True))


# ---------------------------------------------------------------------------
# Fast paths: the same arithmetic, in row chunks, on a small thread pool
# ---------------------------------------------------------------------------
#
# The element-wise layers (GELU, LayerNorm, the softmax, the loss, AdamW) each make
# several passes over arrays of megabytes. NumPy runs every pass on one core and
# over the whole array, so (1) the second core idles, while PyTorch uses it, and
# (2) an array larger than the cache is streamed from memory once per pass.
# A fast path cuts its rows into chunks of about CHUNK elements, runs *all* its
# passes on one chunk while the chunk sits in the core's L2 cache, and hands the
# chunks to `num_threads()` threads. NumPy releases the GIL inside its loops over
# large arrays, so the threads really run at the same time.
#
# Each fast path lives beside the plain code it speeds up and computes the same
# numbers (tests/test_fast_paths.py checks them against each other in float64).
# They run on NumPy only: on CuPy the plain code already runs on the whole GPU.

FAST = True  # False: every layer runs its plain reference code (`simple_paths()`)
CHUNK = 1 << 18  # elements per chunk: 1 MiB of float32, about one core's L2 cache

_pool = None  # the ThreadPoolExecutor, made on first use
_pool_lock = threading.Lock()
_pool_size = [0]  # its number of worker threads


_threads = None  # the thread count, read from the environment once (see num_threads)


def num_threads() -> int:
    """Threads for the element-wise work: set_num_threads(n), else TINYLM_NUM_THREADS,
    else the BLAS setting (OMP_NUM_THREADS / OPENBLAS_NUM_THREADS), else every core:
    the same count as BLAS, so `--threads 1` benchmarks really use one core."""
    global _threads
    if _threads is None:
        _threads = os.cpu_count() or 1
        for var in ("TINYLM_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            value = os.environ.get(var, "")
            if value.isdigit() and int(value) > 0:
                _threads = int(value)
                break
    return _threads


def set_num_threads(n: int | None) -> None:
    """Use n threads for the element-wise work (None: read the environment again)."""
    global _threads
    if n is not None and n < 1:
        raise ValueError(f"the thread count must be >= 1, got {n}")
    _threads = n


MIN_FAST = 1 << 12  # elements: smaller arrays (a decoding step's) take the plain code,
# whose few NumPy calls cost less than cutting the work into chunks


def use_fast(*arrays) -> bool:
    """Whether a layer should take its fast path for these inputs: NumPy arrays
    (not CuPy) of float32/float64, with FAST on, the first of at least MIN_FAST elements."""
    return FAST and arrays[0].size >= MIN_FAST and all(
        type(a) is np.ndarray and a.dtype in _FAST_DTYPES for a in arrays)


_FAST_DTYPES = (np.dtype("float32"), np.dtype("float64"))


@contextlib.contextmanager
def simple_paths():
    """Run the plain reference code of every layer inside the block (for tests)."""
    global FAST
    old, FAST = FAST, False
    try:
        yield
    finally:
        FAST = old


MIN_SPLIT = 1 << 17  # elements: below this, handing work to a thread costs more than it saves


def row_chunks(n_rows: int, row_size: int) -> list[tuple[int, int]]:
    """[lo, hi) row ranges of at most about CHUNK elements each (whole rows), and at
    least one per thread when the array is big enough to be worth sharing."""
    size = n_rows * max(row_size, 1)
    n_chunks = max(-(-size // CHUNK), min(num_threads(), size // MIN_SPLIT), 1)
    rows = max(1, -(-n_rows // n_chunks))  # rows per chunk, rounded up
    return [(lo, min(lo + rows, n_rows)) for lo in range(0, n_rows, rows)]


def run_chunks(fn, chunks) -> list:
    """fn(*chunk) for every chunk, spread over num_threads() threads; returns the
    results in chunk order. Chunks must touch disjoint parts of any output.

    The chunks go to the threads in contiguous groups, one group per thread, and
    the calling thread works on the first group itself instead of waiting. A hand-over
    costs 25-45 us (measured), so only arrays of MIN_SPLIT elements or more are split."""
    chunks = list(chunks)
    threads = min(num_threads(), len(chunks))
    if threads <= 1:
        return [fn(*c) for c in chunks]
    bounds = [len(chunks) * i // threads for i in range(threads + 1)]
    groups = [chunks[bounds[i]:bounds[i + 1]] for i in range(threads)]

    def work(group):
        return [fn(*c) for c in group]

    futures = [_executor().submit(work, g) for g in groups[1:]]
    results = work(groups[0])
    for f in futures:
        results += f.result()
    return results


def _executor() -> ThreadPoolExecutor:
    global _pool
    workers = max(num_threads() - 1, 1)  # the calling thread is the other one
    with _pool_lock:
        if _pool is None or _pool_size[0] != workers:  # first use, or a new thread count
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tinylm")
            _pool_size[0] = workers
        return _pool


def _forget_pool_after_fork() -> None:
    # a forked child has none of the parent's threads: a new pool is made on demand
    global _pool, _pool_lock
    _pool, _pool_lock = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool_after_fork)


def softmax_fast(x, out):
    """`softmax(x, axis=-1, out=out)` in row chunks on the thread pool (NumPy only);
    the same passes as `softmax`, so the same numbers."""
    n = x.shape[-1]
    x2, o2 = x.reshape(-1, n), out.reshape(-1, n)  # views: both are contiguous

    def rows(lo, hi):
        xs, os_ = x2[lo:hi], o2[lo:hi]
        np.subtract(xs, xs.max(axis=-1, keepdims=True), out=os_)
        np.exp(os_, out=os_)
        os_ /= np.einsum("ij->i", os_)[:, None]  # row sums (faster than .sum on short rows)

    run_chunks(rows, row_chunks(x2.shape[0], n))
    return out


def softmax_backward_fast(p, dp, scale: float = 1.0):
    """The softmax backward along the last axis, in place in dp, times `scale`:
    dp <- scale * p * (dp - rowsum(dp * p)), for p = softmax(s) and dp = dloss/dp; returns
    dp, now dloss/ds. NumPy, both arrays contiguous. The plain code (in
    CausalSelfAttention.backward) makes a full-size temporary dp * p and five passes; here
    each chunk gets them all while it sits in cache, the row sums are `vecdot`s (no
    temporary), and the chunks go to the thread pool."""
    n = p.shape[-1]
    p2, d2 = p.reshape(-1, n), dp.reshape(-1, n)  # (N, n) views

    def rows(lo, hi):
        ps, ds = p2[lo:hi], d2[lo:hi]
        ds -= np.vecdot(ds, ps)[:, None]  # dp - sum_j dp_j p_j, the sum taken first
        ds *= ps
        if scale != 1.0:
            ds *= scale

    run_chunks(rows, row_chunks(*p2.shape))
    return dp


SMALL_MATMUL = 1 << 20  # n * k * m: below this OpenBLAS multiplies a matrix on one thread


def matmul(a, b):
    """a @ b for stacks of matrices, (..., n, k) @ (..., k, m) -> (..., n, m).

    Attention multiplies B*H small matrices at once. OpenBLAS runs a product that small on
    one thread whatever its thread count (64 heads of 128x32 @ 32x128: 0.62 ms on 1 or 2
    BLAS threads on the benchmark machine), so here, on NumPy with more than one thread,
    a stack of small products is split between the threads of the pool (0.38 ms). Larger
    products are left to OpenBLAS, which threads each one itself (256x64 @ 64x256: 2.7 ms
    on 2 BLAS threads, 3.1 ms split). The same products either way, so the same numbers."""
    if not (use_fast(a, b) and num_threads() > 1 and a.ndim > 2
            and a.shape[:-2] == b.shape[:-2]
            and a.shape[-2] * a.shape[-1] * b.shape[-1] <= SMALL_MATMUL):
        return a @ b
    out = np.empty(a.shape[:-1] + b.shape[-1:], dtype=np.result_type(a, b))  # (..., n, m)
    a3, b3, o3 = (x.reshape(-1, *x.shape[-2:]) for x in (a, b, out))  # (S, ., .) stacks
    S, t = a3.shape[0], min(num_threads(), a3.shape[0])

    def part(lo, hi):
        np.matmul(a3[lo:hi], b3[lo:hi], out=o3[lo:hi])

    run_chunks(part, [(S * i // t, S * (i + 1) // t) for i in range(t)])
    return out


# ---------------------------------------------------------------------------
# Memory that is freed, then asked for again: keep it
# ---------------------------------------------------------------------------
#
# Every training step allocates the same activations (hundreds of MB at the medium
# benchmark size), frees them in backward, and allocates them again next step.
# glibc's malloc returns large freed blocks to the operating system (`munmap`, or
# trimming the top of the heap), so the next step gets fresh pages: the kernel
# takes a fault and zeroes each 4 KiB page on first touch. On the benchmark
# machine that was ~20% of a small training step (21,000 faults a step). Raising
# two thresholds keeps freed memory inside the process for the next step; the
# process then holds its peak memory instead of giving it back between steps.

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, <malloc.h>
_kept = False


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory for reuse (once per process; True if
    done). AdamW calls it: a training loop is about to allocate and free the same
    arrays every step. Set TINYLM_KEEP_FREED_MEMORY=0 to leave malloc alone; other
    C libraries (macOS, musl) are left alone too."""
    global _kept
    if _kept:
        return True
    if os.environ.get("TINYLM_KEEP_FREED_MEMORY", "1") == "0" or not sys.platform.startswith(
            "linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        # blocks up to 1 GiB come from the heap (not mmap, which munmap would return),
        # and the heap is trimmed only beyond 2 GiB of free memory at its top
        _kept = bool(libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30)) and bool(
            libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, AttributeError):  # not glibc
        _kept = False
    return _kept
