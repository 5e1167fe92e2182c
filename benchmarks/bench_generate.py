"""Time decoding with and without the KV cache. Prints a Markdown table.

    python benchmarks/bench_generate.py                 # small model, 256 tokens (~1 min)
    python benchmarks/bench_generate.py --gpt2          # + GPT-2-small shape (a few minutes)
    python benchmarks/bench_generate.py --device cuda   # on a GPU (CuPy)
    python benchmarks/bench_generate.py --repeat 5 --threads 1   # medians of 5 rounds
    python benchmarks/bench_generate.py --past-context  # decoding past the context window

Each run decodes greedily (temperature 0) from a random prompt, once with
`use_cache=True` and once with `use_cache=False` (a full forward over the whole
sequence for every token), checks that both give the same tokens, and reports
new tokens per second over the whole call (prompt prefill included) and the
speed-up. Random weights: the speed does not depend on what the weights are.

The GPT-2-small shape (vocab 50257, d 768, 12 layers, 12 heads, context 1024,
124M parameters) decodes fewer tokens by default (--gpt2-tokens), as the
uncached side costs O(T^2) over the run and takes minutes on a CPU.
BLAS threads are set by --threads before NumPy loads; the machine may be shared,
so compare rows of one run. With --repeat N the cached and uncached runs alternate
N times and the table shows the medians.

--past-context decodes 256 tokens from a 16-token prompt with a context of 128
(pos="rope", so a rolling cache is possible), far past the window, four ways:
no cache; the exact cache (`rolling=False`: rebuilt from the window every step);
a rolling cache (`rolling=True`: O(T) a token, but approximate with 4 layers);
and, on a model with `sliding_window=32` (4 x 31 < 128, where rolling is exact),
rebuilt versus rolling.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

# name: (vocab_size, d_model, n_layers, n_heads, context_length)
MODELS = {
    "small": (4096, 256, 4, 4, 512),
    "gpt2-small": (50257, 768, 12, 12, 1024),
}


def time_generate(model, prompt, n_new, use_cache, sync, rolling=None):
    from tinylm.sampling import generate

    sync()
    t0 = time.perf_counter()
    kw = {} if rolling is None else {"rolling": rolling}  # (None: the default)
    out = generate(model, prompt, n_new, temperature=0, use_cache=use_cache, **kw)
    sync()
    return time.perf_counter() - t0, out


def bench(name, n_new, prompt_len, batch, device, seed=0, repeat=1):
    import numpy as np

    from tinylm import GPT, GPTConfig
    from tinylm.backend import get_xp

    V, d, L, H, ctx = MODELS[name]
    if prompt_len + n_new > ctx:
        raise ValueError(f"{name}: prompt {prompt_len} + {n_new} new tokens exceed the "
                         f"context ({ctx}); past it the cache is rebuilt every step")
    xp = get_xp(device)

    def sync():
        if xp is not np:
            xp.cuda.Device().synchronize()

    model = GPT(GPTConfig(vocab_size=V, context_length=ctx, d_model=d, n_layers=L, n_heads=H),
                seed=seed, device=device)
    prompt = np.random.default_rng(seed).integers(0, V, size=(batch, prompt_len))
    time_generate(model, prompt, 2, True, sync)  # warm up (allocations, BLAS threads)
    caches, fulls = [], []
    for _ in range(repeat):  # alternate, so that a busy spell hits both sides
        t_cache, out_cache = time_generate(model, prompt, n_new, True, sync)
        t_full, out_full = time_generate(model, prompt, n_new, False, sync)
        caches.append(t_cache)
        fulls.append(t_full)
    t_cache, t_full = statistics.median(caches), statistics.median(fulls)
    same = bool(np.array_equal(np.asarray(out_cache), np.asarray(out_full)))
    return {
        "model": name, "params": model.num_parameters(), "batch": batch, "prompt": prompt_len,
        "new": n_new, "cache_s": t_cache, "full_s": t_full,
        "cache_tok_s": batch * n_new / t_cache, "full_tok_s": batch * n_new / t_full,
        "speedup": t_full / t_cache, "same_tokens": same,
    }


def bench_past_context(n_new, prompt_len, device, seed=0, repeat=1):
    """Decoding far past a 128-token context, the ways listed in the module docstring."""
    import numpy as np

    from tinylm import GPT, GPTConfig
    from tinylm.backend import get_xp

    xp = get_xp(device)

    def sync():
        if xp is not np:
            xp.cuda.Device().synchronize()

    V, d, L, H, _ = MODELS["small"]
    rows = []
    for window in (None, 32):
        cfg = GPTConfig(vocab_size=V, context_length=128, d_model=d, n_layers=L, n_heads=H,
                        pos="rope", sliding_window=window)
        model = GPT(cfg, seed=seed, device=device)
        prompt = np.random.default_rng(seed).integers(0, V, size=(1, prompt_len))
        ways = [("no cache", False, None), ("cache, rebuilt each step", True, False),
                ("cache, rolling", True, True)]
        if window is not None:
            ways = ways[1:]  # the uncached side is the same as without a window
        time_generate(model, prompt, 2, True, sync)  # warm up
        times = {w: [] for w, _, _ in ways}
        outs = {}
        for _ in range(repeat):
            for way, use_cache, rolling in ways:
                t, outs[way] = time_generate(model, prompt, n_new, use_cache, sync, rolling)
                times[way].append(t)
        exact = outs[ways[0][0]]
        for way, _, _ in ways:
            t = statistics.median(times[way])
            rows.append(("pos=rope, ctx 128" + (f", window {window}" if window else ""), way,
                         n_new / t, t, bool(np.array_equal(outs[way], exact))))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--tokens", type=int, default=256, help="new tokens, small model (256)")
    parser.add_argument("--prompt-len", type=int, default=16, help="prompt tokens (16)")
    parser.add_argument("--batch", type=int, default=1, help="sequences decoded together (1)")
    parser.add_argument("--gpt2", action="store_true", help="also time the GPT-2-small shape")
    parser.add_argument("--gpt2-tokens", type=int, default=64,
                        help="new tokens for the GPT-2-small shape (64)")
    parser.add_argument("--threads", type=int, default=2, help="BLAS threads (2)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="alternating rounds; the table shows medians (1)")
    parser.add_argument("--past-context", action="store_true",
                        help="instead: decode --tokens tokens past a 128-token context")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    args = parser.parse_args(argv)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)  # before NumPy is imported (in bench)

    from tinylm.backend import resolve_device

    device = resolve_device(args.device)
    runs = [("small", args.tokens)] + ([("gpt2-small", args.gpt2_tokens)] if args.gpt2 else [])
    print(f"tinylm generate, greedy, float32, {device}, {args.threads} BLAS thread(s), "
          f"Python {platform.python_version()}, {platform.processor() or platform.machine()}\n")
    if args.past_context:
        print(f"prompt {args.prompt_len}, {args.tokens} new tokens, context 128, 4 layers, "
              f"median of {args.repeat}\n")
        print("| model | decoding | new tok/s | time | same tokens as the first row |")
        print("|---|---|---:|---:|:---:|")
        for model, way, tok_s, t, same in bench_past_context(args.tokens, args.prompt_len,
                                                              device, repeat=args.repeat):
            print(f"| {model} | {way} | {tok_s:.1f} | {t:.2f} s | {'yes' if same else 'no'} |",
                  flush=True)
        return 0
    print("| model | params | batch | prompt | new tokens | no cache (tok/s) | KV cache (tok/s) "
          "| speed-up | same tokens |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|:---:|")
    for name, n_new in runs:
        r = bench(name, n_new, args.prompt_len, args.batch, device, repeat=args.repeat)
        print(f"| {r['model']} | {r['params'] / 1e6:.1f}M | {r['batch']} | {r['prompt']} "
              f"| {r['new']} | {r['full_tok_s']:.1f} ({r['full_s']:.1f} s) "
              f"| {r['cache_tok_s']:.1f} ({r['cache_s']:.1f} s) | {r['speedup']:.1f}x "
              f"| {'yes' if r['same_tokens'] else 'NO'} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
