"""LoRA: low-rank adapters on a frozen model (Hu et al. 2021), with hand-written backward.

    from tinylm import lora
    lora.add_lora(model, rank=8, alpha=16.0)        # in place; model.parameters() = adapters
    ... train as usual: AdamW(model.parameters()), clip_grad_norm(model.parameters(), 1.0)
    lora.save_adapter("runs/x/adapter", model)      # a few hundred KB, refuses another base
    lora.load_adapter("runs/x/adapter", base_model) # adds the adapters and loads them
    lora.merge_lora(model)                          # folds them into the weights: a plain GPT

Each targeted `Linear` (y = x @ W + b, W (in, out)) becomes a `LoRALinear`

    y = x @ W + b + (alpha / rank) * (x @ A) @ B      A (in, rank), B (rank, out)

with W and b frozen. B starts at zero, so the model starts unchanged; A starts as
PyTorch's and peft's default, Kaiming-uniform with a = sqrt(5), which for A's fan-in
`in` is uniform(-1/sqrt(in), 1/sqrt(in)). The alpha / rank factor keeps the update's
size comparable across ranks, so a learning rate tuned at one rank transfers.

Freezing. A LoRALinear keeps W and b in `buffers` (moved by `to`, never trained), so
its backward computes no dW at all. Every other layer that holds parameters (the
embeddings, the norms, the Linears that are not targets) is frozen by `freeze`:
its `parameters()` then yields only its sub-layers' parameters, so AdamW, clipping,
`zero_grad` and `GPT.state_dict` see the adapters alone. Those layers still compute
(and keep) their gradients in backward: the gradient must flow through them to the
adapters below, and the layer interface has no switch to skip the parameter part.

State. After `add_lora`, `model.state_dict()` holds the adapters only (it follows
`parameters()`); `full_state_dict(model)` gives base + adapters under the original
names (`blocks.0.attn.qkv.weight`, `blocks.0.attn.qkv.lora_A`, ...); `lora_state_dict`
and `load_lora` handle the adapters alone.

Those three, and the adapter checkpoints (`save_adapter` / `load_adapter`: a directory
holding adapter.json and adapter.npz), are in tinylm/lora_io.py, with the files'
layout; every name there is re-exported here.
"""

from __future__ import annotations

import contextlib
import fnmatch
import math
from collections.abc import Iterable, Iterator

import numpy as np

from tinylm.backend import device_of
from tinylm.nn.linear import Linear
from tinylm.nn.module import Module, init_rng

# Attention's fused query/key/value projection and its output projection in every
# block: the LoRA paper's choice (it adapts the attention weights only), and peft's
# default for GPT-2 (c_attn). "all-linear" adapts every Linear of the blocks as well.
DEFAULT_TARGETS = ("attn.qkv", "attn.proj")
ALL_LINEAR = "all-linear"


class LoRALinear(Module):
    """y = x @ W + b + scale * (x @ A) @ B, scale = alpha / rank; W, b frozen.

    Made from a Linear, whose arrays it takes over (as buffers, on the same device
    and in the same dtype); `merged()` gives the Linear back with A @ B folded in.
    Parameters: lora_A (in, rank), lora_B (rank, out). Buffers: weight (in, out),
    bias (out,) when the Linear has one.
    Cache: the input rows x2 (N, in) and the scaled low-rank activations u (N, rank).
    """

    def __init__(self, base: Linear, rank: int = 8, alpha: float = 16.0, *, rng=None):
        super().__init__()
        if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1:
            raise ValueError(f"LoRA rank must be an int >= 1, got {rank!r}")
        if not alpha > 0:
            raise ValueError(f"LoRA alpha must be > 0, got {alpha!r}")
        rng = init_rng(rng)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank, self.alpha = int(rank), float(alpha)
        self.scale = self.alpha / self.rank
        self.enabled = True  # False: the base layer alone (see `adapters_disabled`)
        # the adapters live where the base does (add_param uses xp and dtype)
        self.xp, self.dtype, self.training = base.xp, base.dtype, base.training
        self.buffers["weight"] = base.params["weight"]  # (in, out), frozen: never trained
        if "bias" in base.params:
            self.buffers["bias"] = base.params["bias"]  # (out,)
        bound = 1.0 / math.sqrt(self.in_features)  # Kaiming-uniform(a=sqrt(5)), as peft
        self.add_param("lora_A", rng.uniform(-bound, bound, (self.in_features, self.rank)))
        self.add_param("lora_B", np.zeros((self.rank, self.out_features)))  # starts as W

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, "
                f"bias={'bias' in self.buffers}, rank={self.rank}, alpha={self.alpha:g}")

    def forward(self, x):
        # x (..., in) -> y (..., out)
        if x.shape[-1] != self.in_features:
            raise ValueError(f"LoRALinear expects inputs with last dimension "
                             f"{self.in_features}, got shape {x.shape}")
        x2 = x.reshape(-1, self.in_features)  # (N, in)
        y = x2 @ self.buffers["weight"]  # (N, out)
        if "bias" in self.buffers:
            y += self.buffers["bias"]
        u = None  # disabled: the adapter's term is absent, and so are its gradients
        if self.enabled:
            # scale the rank-wide activations rather than the (N, out) update: fewer multiplies
            u = (x2 @ self.params["lora_A"]) * self.scale  # (N, rank)
            y += u @ self.params["lora_B"]  # (N, out)
        self._cache = (x2, u)
        return y.reshape(*x.shape[:-1], self.out_features)  # (..., out)

    def backward(self, dout):
        x2, u = self._take_cache()
        d2 = dout.reshape(-1, self.out_features)  # (N, out)
        dx = d2 @ self.buffers["weight"].T  # (N, in)
        if u is None:  # forward ran with the adapter disabled
            return dx.reshape(*dout.shape[:-1], self.in_features)  # (..., in)
        # y = x W + b + u B with u = scale * x A. W and b are frozen: no dW, no db.
        self.grads["lora_B"] += u.T @ d2  # (rank, out)
        du = (d2 @ self.params["lora_B"].T) * self.scale  # (N, rank), gradient of x A
        self.grads["lora_A"] += x2.T @ du  # (in, rank)
        dx += du @ self.params["lora_A"].T  # x feeds both paths: the sum of both gradients
        return dx.reshape(*dout.shape[:-1], self.in_features)  # (..., in)

    def delta_weight(self):
        """scale * A @ B (in, out): what the adapter adds to W."""
        return (self.params["lora_A"] * self.scale) @ self.params["lora_B"]  # (in, out)

    def merged(self) -> Linear:
        """A plain Linear computing the same function: W + scale * A @ B, and b."""
        linear = Linear(self.in_features, self.out_features, bias="bias" in self.buffers)
        linear.to(device_of(self.buffers["weight"]), self.dtype)
        linear.params["weight"][...] = self.buffers["weight"] + self.delta_weight()
        if "bias" in self.buffers:
            linear.params["bias"][...] = self.buffers["bias"]
        linear.training = self.training
        return linear


# ---------------------------------------------------------------------------
# Freezing
# ---------------------------------------------------------------------------


def freeze(module: Module) -> None:
    """Stop yielding `module`'s own parameters from `parameters()` (its sub-layers are
    unaffected): see `Module.frozen`."""
    module.frozen = True


def unfreeze(module: Module) -> None:
    module.frozen = False


def is_frozen(module: Module) -> bool:
    return module.frozen


# ---------------------------------------------------------------------------
# Adding and merging (the state dicts and adapter files: lora_io.py)
# ---------------------------------------------------------------------------


def named_modules(model: Module, prefix: str = "") -> Iterator[tuple[str, Module]]:
    """(qualified name, layer) for every layer of the tree, depth first ("" for the root)."""
    yield prefix.rstrip("."), model
    for name, child in model.children():
        yield from named_modules(child, prefix + name + ".")


def _slots(model: Module, prefix: str = "") -> Iterator[tuple[str, Module, str, int | None]]:
    """(qualified name, parent, attribute, list index or None) of every sub-layer, found
    as `Module.children` finds them, so that a layer can be replaced where its parent
    holds it."""
    for attr, value in list(vars(model).items()):
        if isinstance(value, Module):
            yield prefix + attr, model, attr, None
            yield from _slots(value, prefix + attr + ".")
        elif isinstance(value, list) and value and all(isinstance(v, Module) for v in value):
            for i, v in enumerate(value):
                yield f"{prefix}{attr}.{i}", model, attr, i
                yield from _slots(v, f"{prefix}{attr}.{i}.")


def _replace(parent: Module, attr: str, index: int | None, layer: Module) -> None:
    if index is None:
        setattr(parent, attr, layer)
    else:
        getattr(parent, attr)[index] = layer


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(_matches_one(name, p) for p in patterns)


def _matches_one(name: str, pattern: str) -> bool:
    """A qualified name matches a pattern that equals it, ends it after a dot
    ("attn.qkv" matches "blocks.0.attn.qkv"), or matches it as a glob ("blocks.*.mlp.fc").
    "all-linear" matches every Linear in the blocks except MoE routers."""
    if pattern == ALL_LINEAR:
        return name.startswith("blocks.") and not name.endswith(".router")
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, "*." + pattern)


def _as_patterns(targets) -> tuple[str, ...]:
    if isinstance(targets, str):
        return (targets,)
    patterns = tuple(targets)
    if not patterns or not all(isinstance(p, str) and p for p in patterns):
        raise ValueError(f"LoRA targets must be layer names or patterns, got {targets!r}")
    return patterns


def add_lora(model: Module, rank: int = 8, alpha: float = 16.0,
             targets: str | Iterable[str] = DEFAULT_TARGETS, seed: int = 0) -> Module:
    """Wrap every targeted Linear of `model` in a LoRALinear and freeze everything else,
    in place; returns the model. `model.parameters()` then yields only the adapters,
    `<layer>.lora_A` and `<layer>.lora_B`.

    `targets`: qualified layer names or patterns (see `_matches_one`): a name's
    suffix after a dot ("attn.qkv"), a glob ("blocks.[01].mlp.*"), or "all-linear".
    Each pattern must match at least one Linear (a typo is an error, not a no-op).
    A is drawn from one host generator seeded with `seed`, layer after layer in
    tree order, so a seed gives the same adapters on every device.
    """
    patterns = _as_patterns(targets)
    rng = init_rng(seed)
    slots = list(_slots(model))
    linears = [name for name, parent, attr, i in slots
               if type(_get(parent, attr, i)) is Linear]
    for p in patterns:
        already = [name for name, parent, attr, i in slots
                   if isinstance(_get(parent, attr, i), LoRALinear) and _matches_one(name, p)]
        if already:
            raise ValueError(f"LoRA target {p!r} matches {already[0]!r}, which already has an "
                             "adapter (merge_lora first to stack another)")
        if not any(_matches_one(name, p) for name in linears):
            shown = ", ".join(linears[:8]) + (", ..." if len(linears) > 8 else "")
            raise ValueError(f"LoRA target {p!r} matches no Linear layer; the model's Linear "
                             f"layers are: {shown or 'none'}")
    for name, parent, attr, i in slots:
        layer = _get(parent, attr, i)
        if type(layer) is Linear and _matches(name, patterns):
            _replace(parent, attr, i, LoRALinear(layer, rank, alpha, rng=rng))
    for m in model.modules():
        if not isinstance(m, LoRALinear) and m.params:
            freeze(m)
    return model


def _get(parent: Module, attr: str, index: int | None) -> Module:
    value = getattr(parent, attr)
    return value if index is None else value[index]


@contextlib.contextmanager
def adapters_disabled(model: Module):
    """`with adapters_disabled(model): ...` runs the base model alone (e.g. the frozen
    reference of DPO, without a second copy of the weights); the adapters come back
    on exit, also after an error."""
    layers = list(lora_layers(model).values())
    saved = [m.enabled for m in layers]
    for m in layers:
        m.enabled = False
    try:
        yield model
    finally:
        for m, enabled in zip(layers, saved, strict=True):
            m.enabled = enabled


def lora_layers(model: Module) -> dict[str, LoRALinear]:
    """{qualified name: LoRALinear} of the model's adapted layers, in tree order."""
    return {name: m for name, m in named_modules(model) if isinstance(m, LoRALinear)}


def merge_lora(model: Module) -> Module:
    """Fold every adapter into its weight (W + alpha/rank * A @ B), put plain Linears
    back and unfreeze the model, in place; returns it. The logits are unchanged (to
    rounding), and parameters() / state_dict() are the base model's names again."""
    for _name, parent, attr, i in list(_slots(model)):
        layer = _get(parent, attr, i)
        if isinstance(layer, LoRALinear):
            _replace(parent, attr, i, layer.merged())
    for m in model.modules():
        unfreeze(m)
    return model


# The state dicts and adapter files (tinylm/lora_io.py), re-exported: `from tinylm.lora
# import save_adapter` works. Imported last, because lora_io.py uses the layers above.
from tinylm.lora_io import (  # noqa: E402, F401
    ADAPTER_JSON,
    ADAPTER_NPZ,
    FORMAT,
    VERSION,
    base_weights_sha256,
    full_state_dict,
    load_adapter,
    load_lora,
    lora_state_dict,
    read_adapter,
    save_adapter,
)
