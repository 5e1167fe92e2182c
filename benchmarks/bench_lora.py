"""LoRA against full fine-tuning: trainable parameters, optimizer memory and step time.

    OMP_NUM_THREADS=1 python benchmarks/bench_lora.py [--rounds 7] [--steps 5] [--rank 8]

The model is the default preset's (`PRESETS["shakespeare-char-cpu"]`: d_model 128, 4
layers, 4 heads, context 64, no biases, tied head) with the Tiny Shakespeare character
vocabulary (65), float32 on the CPU, batch 12. A step is what the trainer does: zero_grad,
forward, cross-entropy, backward, clip_grad_norm(1.0), AdamW. Rounds go through the three
set-ups in turn, so slow phases of a shared machine hit them alike; the table shows each
one's median step over all rounds.

Memory: AdamW keeps two moments per trainable value (m and v, float32), the gradients
of the trainable values are one more copy; the frozen layers' gradient arrays are still
allocated (see tinylm/lora.py) and are counted under "frozen grads".
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before NumPy loads its BLAS
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import io  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from tinylm import GPT, lora  # noqa: E402
from tinylm.nn import SoftmaxCrossEntropy  # noqa: E402
from tinylm.optim import AdamW, clip_grad_norm  # noqa: E402
from tinylm.training.presets import PRESETS  # noqa: E402  (= tinylm.train.PRESETS)

VOCAB = 65  # Tiny Shakespeare's characters


class Stepper:
    """One model, optimizer and fixed batch; `step()` returns seconds for one training step."""

    def __init__(self, lora_targets, rank: int):
        preset = PRESETS["shakespeare-char-cpu"]
        self.model = GPT(preset.gpt_config(VOCAB), seed=0)
        if lora_targets is not None:
            lora.add_lora(self.model, rank=rank, targets=lora_targets)
        self.loss_fn = SoftmaxCrossEntropy()
        self.opt = AdamW(self.model.parameters(), lr=preset.lr,
                         betas=(preset.beta1, preset.beta2), weight_decay=preset.weight_decay)
        rng = np.random.default_rng(0)
        shape = (preset.batch_size, preset.context_length)
        self.idx = rng.integers(0, VOCAB, shape)
        self.targets = rng.integers(0, VOCAB, shape)

    def step(self) -> float:
        t0 = time.perf_counter()
        self.model.zero_grad()
        self.loss_fn.forward(self.model.forward(self.idx), self.targets)
        self.model.backward(self.loss_fn.backward())
        clip_grad_norm(self.model.parameters(), 1.0)
        self.opt.step()
        return time.perf_counter() - t0

    def sizes(self) -> dict:
        trainable = {name for name, _, _ in self.model.parameters()}
        moments = sum(a.nbytes for a in (*self.opt.m.values(), *self.opt.v.values()))
        grads = sum(g.nbytes for _, _, g in self.model.parameters())
        frozen_grads = sum(g.nbytes for m in self.model.modules() for g in m.grads.values()
                           ) - grads
        buf = io.BytesIO()  # what a checkpoint of the trained values holds (model.npz / adapter)
        np.savez(buf, **self.model.state_dict())  # the adapters alone after add_lora
        return {"trainable": self.model.num_parameters(),
                "tensors": len(trainable), "moments": moments, "grads": grads,
                "frozen_grads": frozen_grads, "saved": len(buf.getvalue())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per set-up per round")
    parser.add_argument("--rank", type=int, default=8)
    args = parser.parse_args()
    setups = {
        "full fine-tune": None,
        f"LoRA r={args.rank} (attn.qkv, attn.proj)": lora.DEFAULT_TARGETS,
        f"LoRA r={args.rank} (all-linear)": "all-linear",
    }
    steppers = {name: Stepper(targets, args.rank) for name, targets in setups.items()}
    for s in steppers.values():  # warm up: first-touch allocations, BLAS start-up
        s.step()
    times = {name: [] for name in steppers}
    for _ in range(args.rounds):
        for name, s in steppers.items():
            times[name].extend(s.step() for _ in range(args.steps))
    total = GPT(PRESETS["shakespeare-char-cpu"].gpt_config(VOCAB), seed=0).num_parameters()
    print(f"model: {total:,} parameters (d_model 128, 4 layers, context 64, V {VOCAB}), "
          f"batch 12, float32, OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}; "
          f"median of {args.rounds} x {args.steps} interleaved steps")
    header = (f"{'set-up':<36} {'trainable':>10} {'AdamW m+v':>10} {'grads':>9} "
              f"{'frozen grads':>12} {'saved':>9} {'step ms':>8}")
    print(header)
    print("-" * len(header))
    base_ms = None
    for name, s in steppers.items():
        z = s.sizes()
        ms = statistics.median(times[name]) * 1e3
        base_ms = base_ms or ms
        print(f"{name:<36} {z['trainable']:>10,} {z['moments'] / 1024:>8.0f}KB "
              f"{z['grads'] / 1024:>7.0f}KB {z['frozen_grads'] / 1024:>10.0f}KB "
              f"{z['saved'] / 1024:>7.0f}KB {ms:>6.1f} ({ms / base_ms:.2f}x)")


if __name__ == "__main__":
    main()
