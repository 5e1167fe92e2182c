"""The layer base class: parameters, gradients, sub-layers, train/eval.

A tinylm layer is a plain object with

    params: dict[str, array]   its own parameters, e.g. {"weight": (C, D), "bias": (D,)}
    grads:  dict[str, array]   same keys and shapes, where backward *adds* gradients
    forward(*inputs) -> output        keeps what backward needs in a small cache
    backward(dout) -> dinput          uses the cache, frees it, returns the input gradient

Sub-layers are found by looking at the attributes (a layer, or a list of layers),
so `GPT.blocks[0].attn.qkv.params["weight"]` is named
"blocks.0.attn.qkv.weight", exactly as in a PyTorch `state_dict`.

Parameter and gradient arrays are never replaced, only updated in place
(`p -= ...`, `g[...] = 0`), so an optimizer can hold references to them.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from tinylm.backend import get_xp, host_rng, resolve_dtype


class Module:
    """Base class for layers. Subclasses call `super().__init__(device, dtype)` first."""

    def __init__(self, device: str = "cpu", dtype="float32"):
        self.xp = get_xp(device)
        self.dtype = resolve_dtype(dtype)
        self.params: dict = {}
        self.grads: dict = {}
        self.training = True

    # -- parameters -----------------------------------------------------

    def add_param(self, name: str, value: np.ndarray) -> None:
        """Register a parameter (a host array, moved to the device) and its zero gradient."""
        p = value.astype(self.dtype)
        p = p if self.xp is np else self.xp.asarray(p)
        self.params[name] = p
        self.grads[name] = self.xp.zeros_like(p)

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
        """Yield (qualified_name, param, grad) for this layer and all sub-layers."""
        for name, p in self.params.items():
            yield prefix + name, p, self.grads[name]
        for child_name, child in self.children():
            yield from child.parameters(prefix + child_name + ".")

    def num_parameters(self) -> int:
        return sum(int(p.size) for _, p, _ in self.parameters())

    def zero_grad(self) -> None:
        for _, _, g in self.parameters():
            g.fill(0)

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

    def _need_cache(self, cache):
        """The cache forward left behind, or a clear error when backward comes first."""
        if cache is None:
            raise RuntimeError(
                f"{type(self).__name__}.backward called without a matching forward "
                "(each forward's cache is used by exactly one backward)"
            )
        return cache


def make_rng(rng) -> np.random.Generator:
    """Accept a Generator, a seed, or None (seed 0) for a layer's initialisation."""
    return rng if isinstance(rng, np.random.Generator) else host_rng(0 if rng is None else rng)
