"""Training-step time of each GPTConfig variant at one shape, and the KV-cache memory.

    OPENBLAS_NUM_THREADS=1 python benchmarks/bench_variants.py [--steps 6] [--rounds 3]
    OPENBLAS_NUM_THREADS=1 python benchmarks/bench_variants.py --decode [--tokens 256]

Every variant is the 'small' shape of `tinylm bench` (V=512, d=128, L=4, H=4,
T=128, B=16) with one switch changed (or the Llama / Mixtral combinations).
Rounds go through all variants in turn and the table shows each one's median
step over all rounds, so slow phases of a shared machine hit every variant
alike. Times are forward + loss + backward + clipping + AdamW, float32 on the CPU.

--decode instead times greedy generation with the KV cache for the attention
variants (MHA, GQA, MQA, sliding window) at the shape of bench_generate.py's
'small' model (V=4096, d=256, L=4, H=8, context 512): new tokens per second and
the cache's bytes, which is what those variants change.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from tinylm import GPT, GPTConfig
from tinylm.nn import KVCache, SoftmaxCrossEntropy
from tinylm.optim import AdamW, clip_grad_norm

SHAPE = dict(vocab_size=512, context_length=128, d_model=128, n_layers=4, n_heads=4)
BATCH = 16
LLAMA = dict(pos="rope", norm="rmsnorm", mlp="swiglu", n_kv_heads=2, bias=False,
             tie_weights=False)
VARIANTS = {
    "gpt2 (baseline)": {},
    "pos=rope": dict(pos="rope"),
    "pos=none": dict(pos="none"),
    "norm=rmsnorm": dict(norm="rmsnorm"),
    "norm_placement=post": dict(norm_placement="post"),
    "mlp=relu": dict(mlp="relu"),
    "mlp=swiglu": dict(mlp="swiglu"),
    "n_kv_heads=2 (GQA)": dict(n_kv_heads=2),
    "n_kv_heads=1 (MQA)": dict(n_kv_heads=1),
    "sliding_window=32": dict(sliding_window=32),
    "n_experts=4, top-2": dict(n_experts=4, experts_per_token=2),
    "llama": LLAMA,
    "mixtral-like": dict(LLAMA, sliding_window=32, n_experts=4, experts_per_token=2,
                         mlp_hidden=176),
}


class Stepper:
    """One model, optimizer and fixed batch; `step()` returns seconds for one training step."""

    def __init__(self, switches: dict):
        cfg = GPTConfig(**SHAPE, **switches)
        self.cfg = cfg
        self.model = GPT(cfg, seed=0)
        self.loss_fn = SoftmaxCrossEntropy()
        self.opt = AdamW(self.model.parameters(), lr=1e-4)
        rng = np.random.default_rng(0)
        self.idx = rng.integers(0, cfg.vocab_size, (BATCH, cfg.context_length))
        self.targets = rng.integers(0, cfg.vocab_size, (BATCH, cfg.context_length))

    def step(self) -> float:
        t0 = time.perf_counter()
        self.model.zero_grad()
        self.loss_fn.forward(self.model.forward(self.idx), self.targets)
        self.model.backward(self.loss_fn.backward())
        clip_grad_norm(self.model.parameters(), 1.0)
        self.opt.step()
        return time.perf_counter() - t0


DECODE_SHAPE = dict(vocab_size=4096, context_length=512, d_model=256, n_layers=4, n_heads=8)
DECODE_VARIANTS = {
    "MHA (8 kv heads)": {},
    "GQA (2 kv heads)": dict(n_kv_heads=2),
    "MQA (1 kv head)": dict(n_kv_heads=1),
    "MHA, sliding_window=64": dict(sliding_window=64),
}


def decode(n_tokens: int, rounds: int) -> None:
    from tinylm.sampling import generate

    prompt = np.random.default_rng(0).integers(0, DECODE_SHAPE["vocab_size"], (1, 16))
    models = {name: GPT(GPTConfig(**DECODE_SHAPE, **kw), seed=0).eval()
              for name, kw in DECODE_VARIANTS.items()}
    times = {name: [] for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            t0 = time.perf_counter()
            generate(model, prompt, n_tokens, temperature=0, use_cache=True)
            times[name].append(time.perf_counter() - t0)
    print(f"shape {DECODE_SHAPE}; prompt 16, {n_tokens} new tokens, greedy, KV cache; "
          f"median of {rounds}")
    print(f"{'variant':<24} {'tokens/s':>9} {'KV cache (B=1)':>15}")
    for name, model in models.items():
        kv = KVCache.for_model(model, batch_size=1).nbytes()
        print(f"{name:<24} {n_tokens / float(np.median(times[name])):>9,.0f} "
              f"{kv / 2**20:>11.2f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6, help="timed steps per variant per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--decode", action="store_true",
                        help="time cached generation of the attention variants instead")
    parser.add_argument("--tokens", type=int, default=256, help="new tokens with --decode")
    args = parser.parse_args()
    if args.decode:
        decode(args.tokens, args.rounds)
        return

    steppers = {name: Stepper(switches) for name, switches in VARIANTS.items()}
    times = {name: [] for name in VARIANTS}
    for s in steppers.values():
        s.step()  # warm-up
    for _ in range(args.rounds):
        for name, s in steppers.items():
            times[name] += [s.step() for _ in range(args.steps)]

    base = float(np.median(times["gpt2 (baseline)"]))
    tokens = BATCH * SHAPE["context_length"]
    print(f"shape {SHAPE}, B={BATCH}; {args.rounds} rounds x {args.steps} steps; medians")
    print(f"{'variant':<22} {'params':>10} {'step ms':>8} {'tokens/s':>9} {'vs gpt2':>8}"
          f" {'KV cache (B=1, full context)':>30}")
    for name, s in steppers.items():
        step = float(np.median(times[name]))
        kv = KVCache.for_model(s.model, batch_size=1).nbytes()
        print(f"{name:<22} {s.model.num_parameters():>10,} {step * 1e3:>8.1f} "
              f"{tokens / step:>9,.0f} {step / base:>7.2f}x {kv / 1024:>27.0f} KiB")


if __name__ == "__main__":
    main()
