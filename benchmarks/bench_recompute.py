"""Activation recomputation: peak memory and step time, with and without.

    OPENBLAS_NUM_THREADS=1 python benchmarks/bench_recompute.py --config medium --rounds 3

One training step of a `tinylm bench` config (forward, label-smoothed loss, backward,
clipping, AdamW, float32) with `model.recompute` off and on. Each measurement runs in
a fresh process, and the two settings alternate round by round (the machine may be
shared). Reported per setting, medians over rounds:

- traced peak: the highest total of NumPy allocations during one step, from
  `tracemalloc` (NumPy reports every array to it), counted from the start of the step:
  the activations, the gradients of the step and the temporaries. The parameters,
  gradient buffers and AdamW moments exist before the step and are not in it.
- RSS peak: the process's peak resident memory minus its resident memory just before
  the model was built: everything the model, the optimizer and the steps took.
- step time: the median over --steps steps (without tracemalloc, which slows it).

--dropout sets the model's dropout: recomputation must replay the same masks.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker(config: str, recompute: bool, steps: int, dropout: float) -> dict:
    import resource
    import time
    import tracemalloc

    import numpy as np

    from tinylm.bench import CONFIGS
    from tinylm.model import GPT, GPTConfig
    from tinylm.nn import SoftmaxCrossEntropy
    from tinylm.optim import AdamW, clip_grad_norm

    V, d, L, H, T, B = CONFIGS[config]
    rss0 = _rss_mb()
    model = GPT(GPTConfig(vocab_size=V, context_length=T, d_model=d, n_layers=L, n_heads=H,
                          dropout=dropout))
    model.recompute = recompute
    loss_fn = SoftmaxCrossEntropy(label_smoothing=0.1)
    opt = AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    rng = np.random.default_rng(0)
    idx, targets = rng.integers(0, V, (B, T)), rng.integers(0, V, (B, T))

    def step():
        model.zero_grad()
        loss = loss_fn.forward(model.forward(idx), targets)
        model.backward(loss_fn.backward())
        clip_grad_norm(model.parameters(), 1.0)
        opt.step()
        return loss

    times = []
    for i in range(steps + 1):  # the first is a warm-up
        t0 = time.perf_counter()
        loss = step()
        if i:
            times.append(time.perf_counter() - t0)
    rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss0
    tracemalloc.start()
    step()
    traced_peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    return {"recompute": recompute, "step_ms": statistics.median(times) * 1e3,
            "traced_peak_mb": traced_peak, "rss_peak_mb": rss_peak, "loss": float(loss)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--config", default="medium", choices=["tiny", "small", "medium"])
    p.add_argument("--steps", type=int, default=3, help="timed steps per process (3)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds (3)")
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--worker", choices=["on", "off"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.config, args.worker == "on", args.steps, args.dropout)))
        return 0
    runs = {"off": [], "on": []}
    for _ in range(args.rounds):
        for setting in runs:
            out = subprocess.run([sys.executable, __file__, "--worker", setting, "--config",
                                  args.config, "--steps", str(args.steps), "--dropout",
                                  str(args.dropout)], capture_output=True, text=True, check=True)
            runs[setting].append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"{args.config}, dropout {args.dropout}, {args.rounds} rounds, "
          f"{os.environ.get('OPENBLAS_NUM_THREADS', '?')} BLAS thread(s)\n")
    print("| recompute | traced peak (step) | RSS peak | step time | loss |")
    print("|---|---:|---:|---:|---:|")
    for setting, rs in runs.items():
        med = {k: statistics.median(r[k] for r in rs)
               for k in ("traced_peak_mb", "rss_peak_mb", "step_ms")}
        print(f"| {setting} | {med['traced_peak_mb']:.0f} MiB | {med['rss_peak_mb']:.0f} MiB "
              f"| {med['step_ms']:.0f} ms | {rs[-1]['loss']:.6f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
