"""What a training step needs in memory, from the configuration alone.

`--set batch_size=100000000` would otherwise end in a MemoryError (or the kernel's
OOM killer) after the data is prepared and the model built. `check_step_memory`
refuses it first, with one line naming the fields, when the step cannot fit in the
memory of the machine (CPU: physical RAM, or a lower `ulimit -v`; CUDA: the GPU's).

The estimate is a lower bound: only the arrays a step must hold at once, counted
in the parameter dtype (B batch, T context, C d_model, L layers, H heads, V vocab):

    parameters, their gradients, AdamW's m and v          4 P
    per layer, kept for backward: about 6 (B, T, C)        B T L (6 C + 2 hidden)
      activations, 2 of the MLP's width, and the
      attention weights (B, H, T, T), not with flash       + B H L T min(T, window)
      (with recompute=true: L block inputs B T C, and
      one layer's activations at a time)
    logits and their softmax (B, T, V)                     + 2 B T V

Measured steps need 1.2 to 2.5 times this (temporaries, dropout masks, experts),
so a refusal is never wrong by more than that; a step that passes may still not
fit when memory is nearly full.
"""

from __future__ import annotations

import math
import os

import numpy as np


def mlp_width(config) -> int:
    """The MLP's hidden width (GPTConfig.mlp_hidden's rule)."""
    if config.mlp_hidden is not None:
        return config.mlp_hidden
    if config.mlp == "swiglu":
        return 8 * math.ceil(8 * config.d_model / 3 / 8)
    return 4 * config.d_model


def parameter_count(config, vocab_size: int) -> int:
    """About the number of parameters (weights only; biases and norms are noise here)."""
    C, L, H = config.d_model, config.n_layers, config.n_heads
    kv = (config.n_kv_heads or H) * (C // H)  # width of the keys (and of the values)
    attention = 2 * C * C + 2 * C * kv  # q and out, k and v
    mlp = (3 if config.mlp == "swiglu" else 2) * C * mlp_width(config)
    experts = max(1, config.n_experts)
    embeddings = vocab_size * C * (1 if config.tie_weights else 2)
    positions = config.context_length * C if config.pos == "learned" else 0
    return embeddings + positions + L * (attention + experts * mlp)


def step_memory_bytes(config, vocab_size: int) -> int:
    """A lower bound on the bytes one training step holds at once (module doc)."""
    B, T, C, L = config.batch_size, config.context_length, config.d_model, config.n_layers
    H, V = config.n_heads, vocab_size
    window = min(T, config.sliding_window or T)
    routed = config.experts_per_token if config.n_experts > 0 else 1
    layer = B * T * (6 * C + 2 * routed * mlp_width(config))  # one layer's activations
    if config.attention != "flash":  # flash keeps O(T) per head, not the weights
        layer += B * H * T * window
    if getattr(config, "recompute", False):  # the block inputs, and one block at a time
        activations = L * B * T * C + layer
    else:
        activations = L * layer
    floats = 4 * parameter_count(config, V) + activations + 2 * B * T * V
    batch = 2 * B * (T + 1) * 8  # the int64 windows x and y
    return floats * np.dtype(config.dtype).itemsize + batch


def memory_available(device: str) -> tuple[int, str] | None:
    """(bytes, what they are) a step may use on `device`, or None when unknown."""
    if device == "cuda":
        try:
            from tinylm.backend import get_xp

            free, total = get_xp("cuda").cuda.Device().mem_info
            return int(total), "the GPU's memory"
        except Exception:  # no such query (a test double, an old CuPy): use the host's
            pass
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # not POSIX
        return None
    limit, what = ram, "this machine's memory"
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_AS)[0]
        if soft != resource.RLIM_INFINITY and soft < ram:
            limit, what = soft, "this process's address-space limit (ulimit -v)"
    except (ImportError, AttributeError, ValueError, OSError):
        pass
    return limit, what


def check_step_memory(config, vocab_size: int, device: str) -> None:
    """Refuse a configuration whose training step cannot fit (ValueError, one line)."""
    available = memory_available(device)
    if available is None:
        return
    limit, what = available
    need = step_memory_bytes(config, vocab_size)
    if need > limit:
        c = config
        raise ValueError(
            f"a training step needs at least {_gib(need)} of memory, more than {what} "
            f"({_gib(limit)}): batch_size {c.batch_size} x context_length "
            f"{c.context_length} tokens through n_layers {c.n_layers} of d_model "
            f"{c.d_model} (n_heads {c.n_heads}, vocabulary {vocab_size}, {c.dtype}); lower "
            "batch_size (grad_accum_steps keeps the tokens per step), context_length or the "
            "model's size")


def _gib(n: int) -> str:
    return f"{n / 2**30:,.1f} GiB"
