"""Time full training steps: forward, loss, backward, clipping, AdamW.

Reports tokens/s, median step time, estimated model FLOP/s and peak memory for
fixed configurations. Memory is reported two ways: the process's peak RSS, and the
training memory: that peak minus the RSS just before the model was built (what the
model, optimizer and steps took, without the libraries' own footprint: PyTorch's
is some 300 MB). Each configuration runs in its own subprocess, so that
thread settings apply before NumPy loads and peak memory is per configuration.
With --compare-torch, a plain PyTorch eager model of the same architecture and
the same weights (benchmarks/torch_gpt.py) is timed in another subprocess.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tinylm import BLAS_THREAD_TIMEOUT, USER_BLAS_THREAD_TIMEOUT
from tinylm.fileio import write_json

# name: (vocab_size, d_model, n_layers, n_heads, context_length, batch_size)
CONFIGS = {
    "tiny": (256, 64, 2, 4, 64, 16),
    "small": (512, 128, 4, 4, 128, 16),
    "medium": (4096, 384, 6, 6, 256, 8),
}

TORCH_SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "torch_gpt.py"


def flops_per_token(V: int, d: int, L: int, T: int) -> float:
    """Training FLOPs per token: 6 x (matmul parameters) for forward + backward,
    plus the attention scores and weighted sums (Kaplan et al. 2020, PaLM App. B)."""
    return 6 * (12 * L * d * d + d * V) + 12 * L * T * d


def bench_config(name: str, steps: int, warmup: int, device: str, seed: int = 0,
                 weights_out: str | None = None, recompute: bool = False) -> dict:
    """Time `steps` training steps of config `name` in this process; returns a result dict."""
    import numpy as np

    from tinylm.backend import get_xp, to_device
    from tinylm.model import GPT, GPTConfig
    from tinylm.nn import SoftmaxCrossEntropy
    from tinylm.optim import AdamW, clip_grad_norm

    V, d, L, H, T, B = CONFIGS[name]
    xp = get_xp(device)
    rss_before = current_rss_mb()
    cfg = GPTConfig(vocab_size=V, context_length=T, d_model=d, n_layers=L, n_heads=H)
    model = GPT(cfg, seed=seed, device=device)
    model.recompute = recompute
    if weights_out:
        np.savez(weights_out, **model.state_dict())
    loss_fn = SoftmaxCrossEntropy(label_smoothing=0.1)
    opt = AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    rng = np.random.default_rng(seed)
    batches = [tuple(to_device(rng.integers(0, V, (B, T)), xp) for _ in "xy") for _ in range(4)]

    def sync():
        if xp is not np:
            xp.cuda.Device().synchronize()

    times, cpu_times, losses = [], [], []
    for i in range(warmup + steps):
        idx, targets = batches[i % len(batches)]
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        model.zero_grad()
        loss = loss_fn.forward(model.forward(idx), targets)
        model.backward(loss_fn.backward())
        clip_grad_norm(model.parameters(), 1.0)
        opt.step()
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
            losses.append(loss)
    step = float(np.median(times))
    tok_s = B * T / step
    result = {
        "config": name, "impl": "tinylm", "device": device, "step_ms_median": step * 1e3,
        "step_ms_min": min(times) * 1e3, "tokens_per_s": tok_s,
        "cpu_ms_median": float(np.median(cpu_times)) * 1e3, "recompute": recompute,
        "gflops_per_s": flops_per_token(V, d, L, T) * tok_s / 1e9,
        "params": model.num_parameters(), "final_loss": losses[-1],
    }
    result["peak_mem_mb"] = _peak_memory_mb(xp)
    if xp is np:
        result["train_mem_mb"] = result["peak_mem_mb"] - rss_before
    return result


def current_rss_mb() -> float:
    """This process's resident memory now, in MiB (Linux; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return 0.0


def _peak_memory_mb(xp) -> float:
    """Peak resident memory of this process (CPU) or the CuPy pool's size (GPU)."""
    import numpy as np

    if xp is not np:
        return xp.get_default_memory_pool().total_bytes() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _subprocess(cmd: list[str], threads: int, tinylm: bool = True) -> dict:
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(threads)
    # tinylm's processes get the shorter OpenBLAS spin (tinylm/__init__.py); PyTorch's
    # run as PyTorch users run them: without it, unless the user set it
    if tinylm:
        env.setdefault("OPENBLAS_THREAD_TIMEOUT", BLAS_THREAD_TIMEOUT)
    elif USER_BLAS_THREAD_TIMEOUT is None:
        env.pop("OPENBLAS_THREAD_TIMEOUT", None)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark subprocess failed: {' '.join(cmd)}\n{proc.stderr.strip()}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", nargs="+", default=["tiny", "small", "medium"],
                        choices=sorted(CONFIGS), help="configurations to time (default: all)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per round (default 10)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="rounds per config, tinylm and torch alternating; the table shows "
                             "the median over rounds (this machine is noisy: use 3 or more)")
    parser.add_argument("--threads", type=int, default=2,
                        help="BLAS/OpenMP threads for every side (default 2)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"],
                        help="where tinylm runs (default cpu)")
    parser.add_argument("--compare-torch", action="store_true",
                        help="also time PyTorch eager with the same weights (needs torch)")
    parser.add_argument("--recompute", action="store_true",
                        help="tinylm recomputes activations in backward (model.recompute)")
    parser.add_argument("--json", metavar="FILE", help="also write all results to FILE as JSON")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: one config, in-process


def _median(values):
    values = sorted(values)
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else 0.5 * (values[mid - 1] + values[mid])


def run(args) -> int:
    if args.worker:  # we are the subprocess: time one config, print JSON
        print(json.dumps(bench_config(args.worker, args.steps, args.warmup, args.device,
                                      weights_out=os.environ.get("TINYLM_BENCH_WEIGHTS"),
                                      recompute=args.recompute)))
        return 0
    if args.steps < 1 or args.warmup < 0 or args.threads < 1 or args.repeat < 1:
        raise ValueError("--steps, --repeat and --threads must be >= 1 and --warmup >= 0")
    if args.json:
        from tinylm.cli import check_output_file

        check_output_file(args.json, "--json")  # before the benchmarks, not after them
    if args.compare_torch:
        if not TORCH_SCRIPT.exists():
            raise FileNotFoundError(f"--compare-torch needs {TORCH_SCRIPT} (a source checkout)")
        if importlib.util.find_spec("torch") is None:
            raise RuntimeError("--compare-torch needs PyTorch: pip install torch")
    print(f"tinylm bench: {args.steps} steps after {args.warmup} warm-up, {args.repeat} round(s), "
          f"{args.threads} thread(s), device {args.device}, OPENBLAS_THREAD_TIMEOUT="
          f"{os.environ.get('OPENBLAS_THREAD_TIMEOUT', BLAS_THREAD_TIMEOUT)}"
          + (", recompute" if args.recompute else ""))
    print(f"{'config':<8} {'impl':<8} {'step ms':>9} {'CPU ms':>8} {'tokens/s':>10} "
          f"{'GFLOP/s':>8} {'peak MB':>8} {'train MB':>9} {'vs torch':>9} {'mem ratio':>9}")
    common = ["--steps", str(args.steps), "--warmup", str(args.warmup)]
    extra = ["--recompute"] if args.recompute else []
    all_results = []
    for name in args.config:
        rounds = {"tinylm": [], "torch": []}
        for _ in range(args.repeat):
            with tempfile.TemporaryDirectory() as tmp:
                weights = os.path.join(tmp, "weights.npz")
                os.environ["TINYLM_BENCH_WEIGHTS"] = weights if args.compare_torch else ""
                rounds["tinylm"].append(_subprocess(
                    [sys.executable, "-m", "tinylm", "bench", "--worker", name, "--device",
                     args.device] + common + extra, args.threads))
                if args.compare_torch:  # same weights, in a process of its own
                    rounds["torch"].append(_subprocess(
                        [sys.executable, str(TORCH_SCRIPT), "--config", name, "--threads",
                         str(args.threads), "--weights", weights, "--json"] + common, args.threads,
                        tinylm=False))
        summary = {impl: _summarise(name, impl, rs) for impl, rs in rounds.items() if rs}
        if "torch" in summary:
            summary["tinylm"]["ratio_vs_torch"] = (summary["tinylm"]["tokens_per_s"]
                                                   / summary["torch"]["tokens_per_s"])
            if summary["tinylm"].get("train_mem_mb") and summary["torch"].get("train_mem_mb"):
                summary["tinylm"]["mem_ratio_vs_torch"] = (summary["tinylm"]["train_mem_mb"]
                                                           / summary["torch"]["train_mem_mb"])
        for r in summary.values():
            ratio = f"{r['ratio_vs_torch']:.2f}x" if "ratio_vs_torch" in r else ""
            mem_ratio = f"{r['mem_ratio_vs_torch']:.2f}x" if "mem_ratio_vs_torch" in r else ""
            peak = f"{r['peak_mem_mb']:.0f}" if r.get("peak_mem_mb") else "-"
            train = f"{r['train_mem_mb']:.0f}" if r.get("train_mem_mb") else "-"
            cpu = f"{r['cpu_ms_median']:.1f}" if r.get("cpu_ms_median") else "-"
            print(f"{name:<8} {r['impl']:<8} {r['step_ms_median']:>9.1f} {cpu:>8} "
                  f"{r['tokens_per_s']:>10,.0f} {r['gflops_per_s']:>8.1f} {peak:>8} {train:>9} "
                  f"{ratio:>9} {mem_ratio:>9}", flush=True)
        all_results.append({"config": name, "summary": summary, "rounds": rounds})
    if args.json:
        from tinylm.fileio import naming

        with naming(args.json):
            write_json(args.json, all_results)
    return 0


def _summarise(name: str, impl: str, rounds: list[dict]) -> dict:
    """Median over rounds of each round's median step time."""
    V, d, L, H, T, B = CONFIGS[name]
    step_ms = _median([r["step_ms_median"] for r in rounds])
    tok_s = B * T / (step_ms / 1e3)
    peaks = [r["peak_mem_mb"] for r in rounds if r.get("peak_mem_mb")]
    train = [r["train_mem_mb"] for r in rounds if r.get("train_mem_mb")]
    cpu = [r["cpu_ms_median"] for r in rounds if r.get("cpu_ms_median")]
    return {"config": name, "impl": impl, "rounds": len(rounds), "step_ms_median": step_ms,
            "tokens_per_s": tok_s, "gflops_per_s": flops_per_token(V, d, L, T) * tok_s / 1e9,
            "peak_mem_mb": max(peaks) if peaks else None,
            "train_mem_mb": max(train) if train else None,
            "cpu_ms_median": _median(cpu) if cpu else None}
