"""AdamW, gradient clipping and the learning-rate schedule.

Every function takes what `model.parameters()` yields: (name, param, grad)
triples, whose arrays are updated in place.
"""

from __future__ import annotations

import math

import numpy as np

from tinylm.backend import to_device, to_numpy, xp_of
from tinylm.nn.functional import CHUNK, keep_freed_memory, run_chunks, use_fast


class AdamW:
    """Adam with decoupled weight decay (Loshchilov & Hutter 2019), step for step
    the same arithmetic as `torch.optim.AdamW`:

        p <- p * (1 - lr * wd)                      (decay, applied first)
        m <- b1 m + (1 - b1) g,   v <- b2 v + (1 - b2) g^2
        p <- p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)

    Deliberate choice: weight decay applies only to parameters with ndim >= 2
    (the Linear weights and the embedding tables), not to biases or LayerNorm
    weights, as in nanoGPT and GPT-2 practice. Decaying a norm's gain towards
    zero fights the normalisation, and biases are too few to overfit with.
    To reproduce this in PyTorch use two parameter groups, as `adamw_param_groups`
    in benchmarks/torch_gpt.py does for the reference fixture (scripts/make_reference.py).
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01):
        self.params = list(params)  # [(name, p, g)]
        if not self.params:
            raise ValueError("AdamW got no parameters")
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ValueError(
                f"lr, eps and weight_decay must be >= 0, got {lr}, {eps}, {weight_decay}")
        if not all(0.0 <= b < 1.0 for b in betas) or len(betas) != 2:
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas}")
        self.lr, self.betas, self.eps, self.weight_decay = lr, tuple(betas), eps, weight_decay
        self.t = 0  # number of steps taken
        xp = xp_of(self.params[0][1])
        self.m = {name: xp.zeros_like(p) for name, p, _ in self.params}  # first moments
        self.v = {name: xp.zeros_like(p) for name, p, _ in self.params}  # second moments
        if xp is np:
            keep_freed_memory()  # training: the same activations every step (functional.py)

    def decays(self, p) -> bool:
        return p.ndim >= 2

    def step(self) -> None:
        self.t += 1
        b1, b2 = self.betas
        bias1 = 1.0 - b1**self.t  # bias corrections: m and v start at 0
        bias2 = 1.0 - b2**self.t
        step_size = self.lr / bias1
        if all(use_fast(p, g) and p.flags.c_contiguous and g.flags.c_contiguous
               for _, p, g in self.params):  # flat views of contiguous arrays, below
            return self._step_fast(b1, b2, step_size, 1.0 / math.sqrt(bias2))
        for name, p, g in self.params:
            xp = xp_of(p)
            m, v = self.m[name], self.v[name]
            if self.weight_decay and self.decays(p):
                p *= 1.0 - self.lr * self.weight_decay
            m *= b1
            m += (1.0 - b1) * g
            v *= b2
            v += (1.0 - b2) * (g * g)
            denom = xp.sqrt(v)
            denom *= 1.0 / math.sqrt(bias2)
            denom += self.eps
            update = xp.divide(m, denom, out=denom)  # m / denom, in denom's buffer
            update *= step_size
            p -= update

    def _step_fast(self, b1, b2, step_size, inv_sqrt_bias2) -> None:
        """`step`'s arithmetic, operation for operation (so the same numbers), on
        pieces of at most CHUNK elements: all 12 passes run while a piece of p, g, m
        and v sits in the cache, so each array is read from memory about once, not a
        dozen times; the pieces of every parameter go to the thread pool together."""
        pieces = []  # (p, g, m, v, decay) flat views of at most CHUNK elements
        for name, p, g in self.params:
            decay = 1.0 - self.lr * self.weight_decay if self.weight_decay and self.decays(p) \
                else None
            flat = [a.reshape(-1) for a in (p, g, self.m[name], self.v[name])]  # views
            for lo in range(0, p.size, CHUNK):
                pieces.append(tuple(a[lo:lo + CHUNK] for a in flat) + (decay,))

        def update(p, g, m, v, decay):
            tmp = np.empty_like(g)  # piece-sized scratch
            if decay is not None:
                p *= decay
            m *= b1
            np.multiply(g, 1.0 - b1, out=tmp)
            m += tmp
            v *= b2
            np.multiply(g, g, out=tmp)
            tmp *= 1.0 - b2
            v += tmp
            np.sqrt(v, out=tmp)
            tmp *= inv_sqrt_bias2
            tmp += self.eps
            np.divide(m, tmp, out=tmp)  # m / denom
            tmp *= step_size
            p -= tmp

        run_chunks(update, pieces)

    def zero_grad(self) -> None:
        for _, _, g in self.params:
            g.fill(0)

    def state_dict(self) -> dict:
        """Hyper-parameters, the step count and both moments (NumPy arrays)."""
        return {
            "t": self.t, "lr": self.lr, "betas": list(self.betas), "eps": self.eps,
            "weight_decay": self.weight_decay,
            "m": {k: to_numpy(a).copy() for k, a in self.m.items()},
            "v": {k: to_numpy(a).copy() for k, a in self.v.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        names = {name for name, _, _ in self.params}
        for key in ("m", "v"):
            got = set(state[key])
            if got != names:
                raise ValueError(
                    f"optimizer state does not match the parameters: missing "
                    f"{sorted(names - got)}, unexpected {sorted(got - names)}"
                )
        for key in ("m", "v"):
            own = getattr(self, key)
            for name, arr in state[key].items():
                if tuple(arr.shape) != tuple(own[name].shape):
                    raise ValueError(f"optimizer state {key}[{name}] has shape {arr.shape}, "
                                     f"expected {own[name].shape}")
                own[name][...] = to_device(arr.astype(own[name].dtype), xp_of(own[name]))
        self.t = int(state["t"])
        self.lr = float(state["lr"])
        self.betas = tuple(float(b) for b in state["betas"])
        self.eps = float(state["eps"])
        self.weight_decay = float(state["weight_decay"])


def clip_grad_norm(params, max_norm: float) -> float:
    """Scale all gradients so their global L2 norm is at most `max_norm`.

    Returns the norm *before* clipping. As PyTorch's `clip_grad_norm_`: the
    scale is max_norm / (norm + 1e-6), applied only when it is below 1.
    """
    grads = [g for _, _, g in params]
    total = 0.0
    for g in grads:
        flat = g.reshape(-1)
        total = total + xp_of(g).dot(flat, flat)  # sum of squares, one BLAS call each
    norm = math.sqrt(float(total))  # one device -> host transfer per step, not one per tensor
    scale = max_norm / (norm + 1e-6)
    if scale < 1.0:
        for g in grads:
            g *= scale
    return norm


def cosine_schedule(step: int, *, max_lr: float, min_lr: float, warmup_steps: int,
                    decay_steps: int) -> float:
    """Learning rate at `step` (0-based): linear warmup to max_lr over warmup_steps,
    cosine decay to min_lr at decay_steps, then flat at min_lr.

        step < warmup:            max_lr * (step + 1) / warmup_steps
        warmup <= step <= decay:  min_lr + 0.5 (1 + cos(pi r)) (max_lr - min_lr),
                                  r = (step - warmup) / (decay - warmup)
        step > decay:             min_lr
    """
    if warmup_steps < 0 or decay_steps < warmup_steps:
        raise ValueError(
            f"need 0 <= warmup_steps <= decay_steps, got warmup_steps={warmup_steps}, "
            f"decay_steps={decay_steps}"
        )
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step >= decay_steps:
        return min_lr
    ratio = (step - warmup_steps) / (decay_steps - warmup_steps)  # 0 -> 1
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (max_lr - min_lr)
