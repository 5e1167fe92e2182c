"""A plain PyTorch (eager) GPT-2 with tinylm's architecture: the independent reference.

Two jobs, one model:

1. **Timing peer** for `tinylm bench --compare-torch`: a full training step
   (zero_grad, forward, label-smoothed cross-entropy, backward, gradient clipping,
   AdamW) written the way a PyTorch user would write it, nanoGPT style.

       python benchmarks/torch_gpt.py --config small --threads 2
       python benchmarks/torch_gpt.py --config small --json            # one JSON line
       python benchmarks/torch_gpt.py --config tiny --weights model.npz  # tinylm's weights
       python benchmarks/torch_gpt.py --config medium --device cuda      # the GPU peer

2. **Numerical reference**: `scripts/make_reference.py` builds this model in float64
   with the explicit masked-softmax attention (`attention="explicit"`) and records its
   logits, loss, gradients and optimiser steps in `tests/fixtures/gpt_reference.npz`.

Weights move between the two engines in **tinylm's naming and layout**, that of
`GPT.state_dict()`: the module names below are tinylm's (`blocks.0.attn.qkv`, ...), but a
tinylm `Linear` stores `weight` as (in_features, out_features) with `y = x @ W + b`,
the transpose of `torch.nn.Linear.weight`. `load_tinylm_state`, `tinylm_params` and
`tinylm_grads` do that transposition, and nothing else.

PyTorch is needed only to run this file; it is not a dependency of tinylm or of its
test suite. Architecture (B batch, T time, C = d_model, V vocab, H heads, hs = C // H):

    x = tok_emb(idx) + pos_emb(arange(T))                    # (B, T, C)
    for block in blocks:                                     # pre-norm residual blocks
        x = x + attn(ln1(x))                                 # causal self-attention
        x = x + mlp(ln2(x))                                  # fc -> GELU(tanh) -> proj
    logits = ln_f(x) @ tok_emb.weight.T   (tied)             # (B, T, V)
           | head(ln_f(x))                (untied, no bias)
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from tinylm.bench import current_rss_mb  # the same memory reading as tinylm's side

# name: (vocab_size, d_model, n_layers, n_heads, context_length, batch_size)
CONFIGS = {
    "tiny": (256, 64, 2, 4, 64, 16),
    "small": (512, 128, 4, 4, 128, 16),
    "medium": (4096, 384, 6, 6, 256, 8),
}

ATTENTION_IMPLS = ("sdpa", "explicit")


# ----------------------------------------------------------------------------- model


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, context_length: int, bias: bool, attention: str):
        super().__init__()
        assert d_model % n_heads == 0
        if attention not in ATTENTION_IMPLS:
            raise ValueError(f"attention must be one of {ATTENTION_IMPLS}, got {attention!r}")
        self.n_heads = n_heads
        self.attention = attention
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=bias)  # output is [q | k | v]
        self.proj = nn.Linear(d_model, d_model, bias=bias)
        mask = torch.tril(torch.ones(context_length, context_length, dtype=torch.bool))
        mask = mask.view(1, 1, context_length, context_length)
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        H = self.n_heads
        hs = C // H
        q, k, v = self.qkv(x).split(C, dim=2)  # each (B, T, C)
        # Head h owns columns h*hs:(h+1)*hs of q (and of k, v): a plain reshape.
        q = q.view(B, T, H, hs).transpose(1, 2)  # (B, H, T, hs)
        k = k.view(B, T, H, hs).transpose(1, 2)  # (B, H, T, hs)
        v = v.view(B, T, H, hs).transpose(1, 2)  # (B, H, T, hs)
        if self.attention == "sdpa":
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, hs)
        else:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hs))  # (B, H, T, T)
            att = att.masked_fill(~self.mask[:, :, :T, :T], float("-inf"))
            att = F.softmax(att, dim=-1)
            y = att @ v  # (B, H, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # heads side by side again
        return self.proj(y)


class MLP(nn.Module):
    def __init__(self, d_model: int, bias: bool):
        super().__init__()
        self.fc = nn.Linear(d_model, 4 * d_model, bias=bias)
        self.proj = nn.Linear(4 * d_model, d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, d_model, n_heads, context_length, bias, attention):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model, eps=1e-5, bias=bias)
        self.attn = CausalSelfAttention(d_model, n_heads, context_length, bias, attention)
        self.ln2 = nn.LayerNorm(d_model, eps=1e-5, bias=bias)
        self.mlp = MLP(d_model, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        x = x + self.mlp(self.ln2(x))
        return x


class TorchGPT(nn.Module):
    """GPT-2 with tinylm's architecture and parameter names; dropout is 0."""

    def __init__(
        self,
        vocab_size: int,
        context_length: int,
        d_model: int,
        n_layers: int,
        n_heads: int,
        bias: bool = True,
        tie_weights: bool = True,
        *,
        attention: str = "sdpa",
    ):
        super().__init__()
        self.vocab_size = vocab_size
        self.context_length = context_length
        self.tie_weights = tie_weights
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.pos_emb = nn.Embedding(context_length, d_model)
        self.blocks = nn.ModuleList(
            Block(d_model, n_heads, context_length, bias, attention) for _ in range(n_layers)
        )
        self.ln_f = nn.LayerNorm(d_model, eps=1e-5, bias=bias)
        self.head = None if tie_weights else nn.Linear(d_model, vocab_size, bias=False)
        self._init_gpt2(n_layers)

    def _init_gpt2(self, n_layers: int) -> None:
        # GPT-2: normal(0, 0.02), residual projections scaled by 1/sqrt(2 * n_layers),
        # zero biases, unit LayerNorm (nn.LayerNorm's default).
        for name, p in self.named_parameters():
            if p.ndim >= 2:
                std = 0.02 / math.sqrt(2 * n_layers) if name.endswith("proj.weight") else 0.02
                nn.init.normal_(p, mean=0.0, std=std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        B, T = idx.shape
        if T > self.context_length:
            raise ValueError(f"sequence length {T} exceeds context_length {self.context_length}")
        pos = torch.arange(T, device=idx.device)
        x = self.tok_emb(idx) + self.pos_emb(pos)  # (B, T, C)
        for block in self.blocks:
            x = block(x)
        x = self.ln_f(x)
        if self.head is None:
            return x @ self.tok_emb.weight.T  # (B, T, V), tied to the token embedding
        return self.head(x)  # (B, T, V)


# --------------------------------------------------- weight exchange in tinylm's layout


def _linear_weight_names(model: nn.Module) -> set[str]:
    """Names of the parameters stored transposed in tinylm (nn.Linear weights)."""
    return {f"{name}.weight" for name, mod in model.named_modules() if isinstance(mod, nn.Linear)}


def _to_tinylm(name: str, t: torch.Tensor, transposed: set[str]) -> np.ndarray:
    a = t.detach().cpu()
    if name in transposed:
        a = a.T
    return np.ascontiguousarray(a.numpy())


def tinylm_params(model: TorchGPT) -> dict[str, np.ndarray]:
    """The parameters as tinylm's `state_dict()` would hold them (names, shapes, layout)."""
    transposed = _linear_weight_names(model)
    return {name: _to_tinylm(name, p, transposed) for name, p in model.named_parameters()}


def tinylm_grads(model: TorchGPT) -> dict[str, np.ndarray]:
    """The gradients, in tinylm's names and layout (zeros where `.grad` is None)."""
    transposed = _linear_weight_names(model)
    return {
        name: _to_tinylm(name, p.grad if p.grad is not None else torch.zeros_like(p), transposed)
        for name, p in model.named_parameters()
    }


@torch.no_grad()
def load_tinylm_state(model: TorchGPT, state: dict[str, np.ndarray]) -> None:
    """Copy tinylm-format weights into `model` (names and shapes must match exactly)."""
    transposed = _linear_weight_names(model)
    own = dict(model.named_parameters())
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(
            f"tinylm state does not match the model: missing {missing}, unexpected {unexpected}"
        )
    for name, p in own.items():
        a = torch.from_numpy(np.asarray(state[name]))
        if name in transposed:
            a = a.T
        if tuple(a.shape) != tuple(p.shape):
            raise ValueError(
                f"{name}: tinylm shape {tuple(np.shape(state[name]))} does not fit "
                f"(expected {tuple(p.T.shape) if name in transposed else tuple(p.shape)})"
            )
        p.copy_(a.to(dtype=p.dtype, device=p.device))


def adamw_param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices and embeddings (ndim >= 2) only, as tinylm's AdamW does."""
    params = list(model.parameters())
    return [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]


# ---------------------------------------------------------------------------- timing


def _arch_from_weights(state: dict[str, np.ndarray]) -> dict:
    """Vocabulary, width, depth, context, bias and tying read off tinylm-format weights."""
    V, C = state["tok_emb.weight"].shape
    layers = {int(k.split(".")[1]) for k in state if k.startswith("blocks.")}
    return {
        "vocab_size": V,
        "d_model": C,
        "n_layers": len(layers),
        "context_length": state["pos_emb.weight"].shape[0],
        "bias": "ln_f.bias" in state,
        "tie_weights": "head.weight" not in state,
    }


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Time PyTorch eager training steps of tinylm's GPT.")
    p.add_argument("--config", choices=sorted(CONFIGS), default="small")
    p.add_argument("--steps", type=int, default=10, help="timed steps (default 10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="where PyTorch runs (default cpu; cuda: the peer of tinylm on CuPy)")
    p.add_argument("--batch-size", type=int, default=None, help="override the config's batch size")
    p.add_argument("--weights", default=None, help="tinylm-format .npz weights to start from")
    p.add_argument("--attention", choices=ATTENTION_IMPLS, default="sdpa")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON line instead of text")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.threads < 1:
        p.error("--steps and --threads must be >= 1, --warmup >= 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: this PyTorch sees no CUDA GPU")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    V, C, L, H, T, B = CONFIGS[args.config]
    if args.batch_size is not None:
        B = args.batch_size
    bias, tie = True, True
    state = None
    if args.weights is not None:
        with np.load(args.weights, allow_pickle=False) as f:
            state = {k: f[k] for k in f.files}
        arch = _arch_from_weights(state)
        want = {"vocab_size": V, "d_model": C, "n_layers": L, "context_length": T}
        bad = {k: (arch[k], v) for k, v in want.items() if arch[k] != v}
        if bad:
            what = ", ".join(f"{k} is {a} in the file, {b} in the config"
                             for k, (a, b) in bad.items())
            print(f"torch_gpt: --weights do not fit --config {args.config}: {what}",
                  file=sys.stderr)
            return 2
        bias, tie = arch["bias"], arch["tie_weights"]

    rss_before = current_rss_mb()
    model = TorchGPT(V, T, C, L, H, bias=bias, tie_weights=tie, attention=args.attention)
    model.to(args.device)
    if state is not None:
        load_tinylm_state(model, state)
    model.train()
    opt = torch.optim.AdamW(adamw_param_groups(model, 0.1), lr=3e-4, betas=(0.9, 0.95), eps=1e-8)
    gen = torch.Generator().manual_seed(args.seed)

    def step() -> float:
        # Drawn on the host (the same batches on every device), then moved: 2*B*T ids.
        idx = torch.randint(0, V, (B, T), generator=gen).to(args.device)
        targets = torch.randint(0, V, (B, T), generator=gen).to(args.device)
        opt.zero_grad(set_to_none=True)
        logits = model(idx)
        loss = F.cross_entropy(logits.view(-1, V), targets.view(-1), label_smoothing=0.1)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss.item()  # .item() also waits for the step to finish (on a GPU too)

    first_loss = None
    for _ in range(args.warmup):
        loss = step()
        first_loss = loss if first_loss is None else first_loss
    times, cpu_times = [], []
    for _ in range(args.steps):
        t0, c0 = time.perf_counter(), time.process_time()
        loss = step()
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
        first_loss = loss if first_loss is None else first_loss

    step_ms = 1000.0 * statistics.median(times)
    tokens_per_s = B * T / (step_ms / 1000.0)
    n_params = sum(p.numel() for p in model.parameters())
    # 6 x matmul parameters (forward + backward) + attention scores and sums, as
    # tinylm.bench.flops_per_token (Kaplan et al. 2020; PaLM, appendix B)
    flops_per_token = 6 * (12 * L * C * C + C * V) + 12 * L * T * C
    result = {
        "config": args.config,
        "step_ms_median": round(step_ms, 3),
        "tokens_per_s": round(tokens_per_s, 1),
        "threads": args.threads,
        "device": args.device,
        "torch_version": torch.__version__,
        "batch_size": B,
        "context_length": T,
        "steps": args.steps,
        "warmup": args.warmup,
        "attention": args.attention,
        "params": n_params,
        "gflops_per_s": round(flops_per_token * tokens_per_s / 1e9, 2),
        "first_loss": first_loss,
        "step_ms_min": round(1000.0 * min(times), 3),
        "cpu_ms_median": round(1000.0 * statistics.median(cpu_times), 3),
    }
    if args.device == "cpu":  # peak RSS (as tinylm bench), and the part the training took
        import resource

        result["peak_mem_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        result["train_mem_mb"] = result["peak_mem_mb"] - rss_before
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"torch {torch.__version__} eager on {args.device}, {args.threads} thread(s), "
            f"config {args.config} "
            f"(V={V}, d={C}, L={L}, H={H}, T={T}, B={B}, {n_params:,} params, "
            f"attention={args.attention})"
        )
        print(f"  step: median {step_ms:.1f} ms, min {1000 * min(times):.1f} ms "
              f"over {args.steps} steps "
              f"({args.warmup} warmup)")
        print(f"  tokens/s: {tokens_per_s:,.0f}   ({result['gflops_per_s']} GFLOP/s by 6N+12LTd)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
