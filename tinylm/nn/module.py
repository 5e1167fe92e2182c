"""The layer base class: parameters, gradients, sub-layers, train/eval.

A tinylm layer is a plain object with

    params: dict[str, array]   its own parameters, e.g. {"weight": (C, D), "bias": (D,)}
    grads:  dict[str, array]   same keys and shapes, where backward *adds* gradients
    forward(*inputs) -> output        keeps what backward needs in `self._cache`
    backward(dout) -> dinput          uses the cache, frees it, returns the input gradient
    to(device, dtype) -> self         moves every parameter (the one way to change either)

Sub-layers are found by looking at the attributes (a layer, or a list of layers),
so `GPT.blocks[0].attn.qkv.params["weight"]` is named
"blocks.0.attn.qkv.weight", exactly as in a PyTorch `state_dict`.

Parameter and gradient arrays are never replaced, only updated in place
(`p -= ...`, `g[...] = 0`), so an optimizer can hold references to them. The one
exception is `to`, which makes new arrays on the new device or in the new dtype:
call it before creating the optimizer, as with PyTorch's `.to`.

Parameters are made in one place, `add_param`, on the host in float32; layers
never take a device or dtype. The math takes `xp` and the dtype from its
inputs, so a layer computes wherever its parameters and inputs live.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from tinylm.backend import get_xp, host_rng, resolve_dtype, to_device, to_numpy, xp_of


class Module:
    """Base class for layers. Subclasses call `super().__init__()` first."""

    # True for layers whose forward also computes an auxiliary loss (MoE's load
    # balancing): they set `aux_loss` (a float) in forward, and their backward adds
    # `aux_grad` (the loss's upstream gradient, 1.0 unless a model says otherwise)
    # times its gradient. `aux_layers()` finds them.
    has_aux_loss = False

    def __init__(self):
        self.xp = np  # where the parameters live (`to` changes it)
        self.dtype = np.dtype("float32")
        self.params: dict = {}
        self.grads: dict = {}
        self.buffers: dict = {}  # arrays that move with the layer but are not trained
        self.training = True
        # a frozen layer's own parameters are not yielded by `parameters()`, so an
        # optimizer never sees them (LoRA freezes the base model this way); they
        # stay in `params`, where the math reads them and `to` moves them
        self.frozen = False
        self._cache = None  # what forward keeps for backward (each layer documents it)

    # -- parameters -----------------------------------------------------

    def add_param(self, name: str, value: np.ndarray) -> None:
        """Register a parameter (a host array) and its zero gradient."""
        p = to_device(np.asarray(value).astype(self.dtype), self.xp)
        self.params[name] = p
        self.grads[name] = self.xp.zeros_like(p)

    def to(self, device: str | None = None, dtype=None) -> Module:
        """Move every parameter, gradient and buffer of this layer tree to `device`
        ("cpu", "cuda", "auto") and/or cast it to `dtype`; returns self.

        The arrays are replaced (other devices need other arrays), so call it
        before an optimizer takes references to them."""
        xp = self.xp if device is None else get_xp(device)
        dtype = self.dtype if dtype is None else resolve_dtype(dtype)
        for m in self.modules():
            for store in (m.params, m.grads, m.buffers):
                for name, a in store.items():
                    if xp_of(a) is not xp or a.dtype != dtype:
                        store[name] = to_device(to_numpy(a).astype(dtype), xp)
            m.xp, m.dtype = xp, dtype
        return self

    def children(self) -> Iterator[tuple[str, Module]]:
        """Direct sub-layers, in the order they were assigned: (name, layer)."""
        for name, value in vars(self).items():
            if isinstance(value, Module):
                yield name, value
            elif isinstance(value, list) and value and all(isinstance(v, Module) for v in value):
                for i, v in enumerate(value):
                    yield f"{name}.{i}", v

    def modules(self) -> Iterator[Module]:
        """Every layer in the tree, depth first, this one first."""
        yield self
        for _, child in self.children():
            yield from child.modules()

    def parameters(self, prefix: str = "") -> Iterator[tuple[str, object, object]]:
        """Yield (qualified_name, param, grad) for this layer and all sub-layers (a
        frozen layer's own parameters excepted)."""
        for name, p in ({} if self.frozen else self.params).items():
            yield prefix + name, p, self.grads[name]
        for child_name, child in self.children():
            yield from child.parameters(prefix + child_name + ".")

    def num_parameters(self) -> int:
        return sum(int(p.size) for _, p, _ in self.parameters())

    def zero_grad(self) -> None:
        for _, _, g in self.parameters():
            g.fill(0)

    def aux_layers(self) -> list[Module]:
        """The layers in this tree that add an auxiliary loss (see `has_aux_loss`)."""
        return [m for m in self.modules() if m.has_aux_loss]

    def clear_backward_caches(self) -> None:
        """Drop what the last forward kept for backward, in every layer of the tree.

        Inference calls this so that a forward does not pin a full set of
        activations until the next training step; a `backward` after it raises
        the usual "without a matching forward" error instead of using the
        activations of some other input."""
        for m in self.modules():
            m._cache = None

    # -- modes ------------------------------------------------------------

    def train(self, mode: bool = True) -> Module:
        """Training mode (dropout active). Returns self, like PyTorch."""
        self.training = mode
        for _, child in self.children():
            child.train(mode)
        return self

    def eval(self) -> Module:
        """Evaluation mode (dropout off)."""
        return self.train(False)

    # -- printing ---------------------------------------------------------

    def extra_repr(self) -> str:
        """The layer's own settings, shown inside `Name(...)` (subclasses override)."""
        return ""

    def __repr__(self) -> str:
        """PyTorch-style tree: `Linear(in=8, out=32, bias=True)`, sub-layers indented."""
        children = list(self.children())
        if not children:
            return f"{type(self).__name__}({self.extra_repr()})"
        lines = [f"{type(self).__name__}({self.extra_repr()}"]
        for name, child in children:
            body = repr(child).replace("\n", "\n  ")
            lines.append(f"  ({name}): {body}")
        return "\n".join(lines) + "\n)"

    # -- the interface every layer implements -----------------------------

    def forward(self, *inputs):
        raise NotImplementedError

    def backward(self, dout):
        raise NotImplementedError

    def _take_cache(self):
        """The cache forward left behind, now freed (each forward's cache serves
        exactly one backward), or a clear error when backward comes first."""
        cache, self._cache = self._cache, None
        if cache is None:
            raise RuntimeError(
                f"{type(self).__name__}.backward called without a matching forward "
                "(each forward's cache is used by exactly one backward)"
            )
        return cache


def init_rng(rng) -> np.random.Generator:
    """The generator for a layer's initial weights: a Generator as given, or a new
    one from a seed; None means seed 0, so that a layer built twice is the same."""
    return rng if isinstance(rng, np.random.Generator) else host_rng(0 if rng is None else rng)
