"""The position-wise feed-forward layers: GPT-2's MLP (GELU or ReLU) and SwiGLU."""

from __future__ import annotations

from tinylm.nn.activation import GELU, Dropout, ReLU, SiLU
from tinylm.nn.linear import Linear
from tinylm.nn.module import Module, init_rng

ACTIVATIONS = {"gelu": GELU, "relu": ReLU}


class MLP(Module):
    """fc (C -> hidden) -> GELU (or ReLU) -> proj (hidden -> C) -> dropout.
    GPT-2 uses hidden = 4C."""

    def __init__(self, d_model: int, hidden: int | None = None, *, activation: str = "gelu",
                 bias: bool = True, dropout: float = 0.0, rng=None):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        rng = init_rng(rng)
        hidden = 4 * d_model if hidden is None else hidden
        self.fc = Linear(d_model, hidden, bias=bias, rng=rng)
        self.act = ACTIVATIONS[activation]()
        self.proj = Linear(hidden, d_model, bias=bias, rng=rng)
        self.drop = Dropout(dropout, seed=rng.integers(2**32))

    def forward(self, x):
        # x (..., C) -> (..., hidden) -> (..., C)
        return self.drop.forward(self.proj.forward(self.act.forward(self.fc.forward(x))))

    def backward(self, dout):
        # exactly the forward, read from right to left
        return self.fc.backward(self.act.backward(self.proj.backward(self.drop.backward(dout))))


class SwiGLU(Module):
    """down(silu(gate(x)) * up(x)) -> dropout (Shazeer 2020, "GLU Variants Improve
    Transformer"; the Llama MLP).

    Two projections up instead of one: `gate` goes through SiLU and then scales
    `up` element by element, a learned, smooth on/off switch per hidden unit.
    No biases in Llama (bias=False). With hidden = 8C/3 it has the parameter
    count of a 4C GELU MLP (3 matrices of C x 8C/3 instead of 2 of C x 4C).
    Cache: silu(gate(x)) and up(x), the two factors of the product.
    """

    def __init__(self, d_model: int, hidden: int, *, bias: bool = False, dropout: float = 0.0,
                 rng=None):
        super().__init__()
        rng = init_rng(rng)
        self.gate = Linear(d_model, hidden, bias=bias, rng=rng)
        self.up = Linear(d_model, hidden, bias=bias, rng=rng)
        self.act = SiLU()
        self.down = Linear(hidden, d_model, bias=bias, rng=rng)
        self.drop = Dropout(dropout, seed=rng.integers(2**32))

    def forward(self, x):
        # x (..., C)
        a = self.act.forward(self.gate.forward(x))  # (..., hidden) silu(x W_gate)
        u = self.up.forward(x)  # (..., hidden) x W_up
        self._cache = (a, u)
        return self.drop.forward(self.down.forward(a * u))  # (..., C)

    def backward(self, dout):
        a, u = self._take_cache()
        dh = self.down.backward(self.drop.backward(dout))  # (..., hidden), gradient of a * u
        # h = a * u  =>  da = dh * u,  du = dh * a
        da, du = dh * u, dh * a
        # x feeds both gate and up: its gradient is the sum of the two paths
        return self.gate.backward(self.act.backward(da)) + self.up.backward(du)


def make_mlp(kind: str, d_model: int, hidden: int | None = None, **kw) -> Module:
    """The feed-forward layer a config names: "gelu", "relu" or "swiglu"."""
    if kind == "swiglu":
        return SwiGLU(d_model, hidden if hidden is not None else swiglu_hidden(d_model), **kw)
    if kind in ACTIVATIONS:
        return MLP(d_model, hidden, activation=kind, **kw)
    raise ValueError(f"mlp must be 'gelu', 'relu' or 'swiglu', got {kind!r}")


def swiglu_hidden(d_model: int) -> int:
    """8C/3 rounded up to a multiple of 8: about the parameter count of a 4C MLP
    (Llama's rule, with its multiple of 256 shrunk for small models)."""
    hidden = 8 * d_model // 3
    return -(-hidden // 8) * 8  # ceil to a multiple of 8
