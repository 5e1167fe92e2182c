"""Generation speed and peak memory of a GPT-2-small-sized model (124M parameters) on the CPU,
with and without the KV cache. Prints a Markdown table.

    python benchmarks/bench_gpt2.py                       # a few minutes on 2 cores
    python benchmarks/bench_gpt2.py --hf-gpt2 DIR         # real GPT-2 weights, if you have them

The model has GPT-2 small's shapes (vocab 50257, context 1024, d 768, 12 layers, 12 heads)
and random weights (GPT-2's init), unless --hf-gpt2 names a Hugging Face GPT-2 directory.
Speed does not depend on the values of the weights.

Each measurement runs in a fresh subprocess, so BLAS thread settings apply before NumPy
loads and the peak resident memory (ru_maxrss) is that run's alone:

    load      to_hf_gpt2 of the random model into a temporary directory (parent process),
              then from_hf_gpt2 (the subprocess): seconds and peak memory of loading a
              124M-parameter safetensors checkpoint (memory-mapped)
    cache     generate(..., use_cache=True): a prefill of the prompt, then one token at a time
    no cache  generate(..., use_cache=False): a forward pass over the whole sequence per token

Tokens are sampled (temperature 1, top_k 50, fixed seed) from a short prompt of random ids.
With --repeat N each generate mode runs N times (alternating) and the fastest run is shown.
"First token" is the time to the first new token (the prompt's prefill with the cache);
"per token" is the mean time of the following tokens. The machine is shared and noisy:
compare rows of one run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GPT2_SMALL = dict(vocab_size=50257, context_length=1024, d_model=768, n_layers=12, n_heads=12)


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def build_model(hf_dir: str | None):
    """(model, seconds to build or load it)."""
    from tinylm import GPT, GPTConfig
    from tinylm.interop import from_hf_gpt2

    t0 = time.perf_counter()
    model = from_hf_gpt2(hf_dir) if hf_dir else GPT(GPTConfig(**GPT2_SMALL), seed=0)
    model.eval()
    return model, time.perf_counter() - t0


def worker(mode: str, args) -> dict:
    """One measurement, in this (fresh) process."""
    import numpy as np

    if mode == "load":
        model, seconds = build_model(args.hf_gpt2)
        return {"mode": mode, "load_s": seconds, "params": model.num_parameters(),
                "peak_rss_mb": peak_rss_mb()}

    from tinylm.sampling import stream

    model, build_s = build_model(args.hf_gpt2)
    use_cache = mode == "cache"
    n_new = args.new_tokens_cache if use_cache else args.new_tokens_no_cache
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, model.config.vocab_size, (1, args.prompt_tokens))  # (1, T0)
    times = []
    t0 = time.perf_counter()
    for _ in stream(model, prompt, n_new, temperature=1.0, top_k=50, seed=0, use_cache=use_cache):
        times.append(time.perf_counter())
    steps = np.diff([t0] + times)  # (n_new,) seconds per new token
    return {"mode": mode, "new_tokens": len(steps), "prompt_tokens": args.prompt_tokens,
            "total_s": float(steps.sum()), "first_token_s": float(steps[0]),
            "per_token_ms": float(steps[1:].mean() * 1e3), "tokens_per_s": len(steps) / steps.sum(),
            "build_s": build_s, "params": model.num_parameters(), "peak_rss_mb": peak_rss_mb()}


def run_worker(mode: str, args, hf_dir: str | None) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(args.threads)
    cmd = [sys.executable, __file__, "--worker", mode, "--prompt-tokens", str(args.prompt_tokens),
           "--new-tokens-cache", str(args.new_tokens_cache),
           "--new-tokens-no-cache", str(args.new_tokens_no_cache)]
    if hf_dir:
        cmd += ["--hf-gpt2", hf_dir]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} run failed:\n{proc.stderr.strip()}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def export_random_model(directory: str) -> float:
    """Write the random GPT-2-small model as a Hugging Face directory; seconds taken."""
    from tinylm.interop import to_hf_gpt2

    model, _ = build_model(None)
    t0 = time.perf_counter()
    to_hf_gpt2(model, directory, eos_token_id=50256)
    return time.perf_counter() - t0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hf-gpt2", metavar="DIR", help="load real GPT-2 weights from DIR")
    parser.add_argument("--prompt-tokens", type=int, default=8)
    parser.add_argument("--new-tokens-cache", type=int, default=128)
    parser.add_argument("--new-tokens-no-cache", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2, help="BLAS threads (default 2)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="runs of each generate mode, alternating; the table shows the "
                             "fastest (least disturbed by other processes)")
    parser.add_argument("--modes", nargs="+", default=["load", "cache", "no-cache"],
                        choices=["load", "cache", "no-cache"])
    parser.add_argument("--json", metavar="FILE", help="also write the results to FILE")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args)))
        return 0

    weights = f"weights from {args.hf_gpt2}" if args.hf_gpt2 else "random weights"
    print(f"GPT-2 small shapes {GPT2_SMALL}, {weights}; {args.threads} thread(s), "
          f"{platform.machine()}, Python {platform.python_version()}", file=sys.stderr)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = args.hf_gpt2
        if "load" in args.modes and not hf_dir:
            hf_dir = os.path.join(tmp, "gpt2-random")
            results.append({"mode": "export", "export_s": export_random_model(hf_dir)})
        rounds = {}
        for i in range(args.repeat):
            for mode in args.modes:
                if mode == "load" and i > 0:
                    continue
                r = run_worker(mode, args, hf_dir if mode == "load" else args.hf_gpt2)
                r["loadavg"] = os.getloadavg()[0]  # other processes on the machine
                rounds.setdefault(mode, []).append(r)
                print(f"  {r}", file=sys.stderr, flush=True)
        for runs in rounds.values():  # the fastest run of each mode
            best = min(runs, key=lambda r: r.get("total_s", r.get("load_s")))
            results.append({**best, "runs": len(runs)})

    print("| run | new tokens | total (s) | first token (s) | per token (ms) | tokens/s "
          "| peak RSS (MB) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        if r["mode"] == "export":
            print(f"| to_hf_gpt2 (write) | | {r['export_s']:.1f} | | | | |")
        elif r["mode"] == "load":
            print(f"| from_hf_gpt2 (load) | | {r['load_s']:.1f} | | | | {r['peak_rss_mb']:.0f} |")
        else:
            print(f"| generate, {r['mode']} | {r['new_tokens']} | {r['total_s']:.1f} | "
                  f"{r['first_token_s']:.2f} | {r['per_token_ms']:.0f} | {r['tokens_per_s']:.1f} "
                  f"| {r['peak_rss_mb']:.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
