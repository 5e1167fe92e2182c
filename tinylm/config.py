"""GPTConfig: the shape of a GPT, its variant switches, and their validation.

Every field is declared here once, with its default (GPT-2's architecture) and a
comment that is also its help text; `tinylm train` takes its model fields from
this class.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

POS_KINDS = ("learned", "sinusoidal", "rope", "none")
NORM_KINDS = ("layernorm", "rmsnorm")
NORM_PLACEMENTS = ("pre", "post")
MLP_KINDS = ("gelu", "relu", "swiglu")


@dataclass(frozen=True)
class GPTConfig:
    """The shape of a GPT. Defaults keep GPT-2's architecture."""

    vocab_size: int  # V: number of token ids
    context_length: int  # longest sequence the model sees (positions 0..context_length-1)
    d_model: int  # C: width of the residual stream
    n_layers: int  # number of transformer blocks
    n_heads: int  # attention heads per block; head size = d_model // n_heads
    dropout: float = 0.0  # on embeddings, attention weights and residual branches (train only)
    bias: bool = True  # biases in Linear and LayerNorm layers (GPT-2: True)
    tie_weights: bool = True  # output head shares the token-embedding matrix (GPT-2: True)
    # -- variants (tinylm/nn/positions.py, norm.py, mlp.py, attention.py, moe.py) --
    pos: str = "learned"  # positions: "learned" table, "sinusoidal", "rope" or "none"
    rope_theta: float = 10000.0  # RoPE base: the slowest pair turns once per ~2 pi theta positions
    norm: str = "layernorm"  # "layernorm" or "rmsnorm" (Llama; no bias)
    norm_eps: float = 1e-5  # epsilon of every norm (Llama checkpoints: 1e-5 or 1e-6)
    norm_placement: str = "pre"  # "pre" (GPT-2) or "post" (the original Transformer)
    mlp: str = "gelu"  # "gelu", "relu" or "swiglu" (Llama)
    mlp_hidden: int | None = None  # MLP width; None: 4C, or 8C/3 (to a multiple of 8) for swiglu
    n_kv_heads: int | None = None  # key/value heads (grouped-query attention); None: n_heads
    sliding_window: int | None = None  # attend to the last W positions only (Mistral); None: all
    n_experts: int = 0  # > 0: each MLP is a mixture of this many experts
    experts_per_token: int = 2  # k: experts each token is routed to (with n_experts > 0)
    moe_aux_loss_coef: float = 0.01  # weight of the load-balancing loss (Switch Transformer)

    def __post_init__(self):
        for name in ("vocab_size", "context_length", "d_model", "n_layers", "n_heads"):
            _check_int(name, getattr(self, name), minimum=1)
        if self.d_model % self.n_heads != 0:
            raise ValueError(
                f"GPTConfig.d_model ({self.d_model}) must be divisible by "
                f"GPTConfig.n_heads ({self.n_heads})"
            )
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout!r}")
        for name in ("bias", "tie_weights"):
            if not isinstance(getattr(self, name), bool):
                value = getattr(self, name)
                raise TypeError(f"GPTConfig.{name} must be True or False, got {value!r}")
        for name, kinds in (("pos", POS_KINDS), ("norm", NORM_KINDS),
                            ("norm_placement", NORM_PLACEMENTS), ("mlp", MLP_KINDS)):
            if getattr(self, name) not in kinds:
                raise ValueError(f"GPTConfig.{name} must be one of {kinds}, "
                                 f"got {getattr(self, name)!r}")
        for name in ("rope_theta", "norm_eps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"GPTConfig.{name} must be a number > 0, got {value!r}")
        if self.pos == "rope" and self.head_size % 2 != 0:
            raise ValueError(f"GPTConfig.pos='rope' needs an even head size, but d_model "
                             f"({self.d_model}) / n_heads ({self.n_heads}) = {self.head_size}")
        if self.pos == "sinusoidal" and self.d_model % 2 != 0:
            raise ValueError(f"GPTConfig.pos='sinusoidal' needs an even d_model, "
                             f"got {self.d_model}")
        for name in ("mlp_hidden", "n_kv_heads", "sliding_window"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), minimum=1, or_none=True)
        if self.n_heads % self.kv_heads != 0:
            raise ValueError(f"GPTConfig.n_heads ({self.n_heads}) must be a multiple of "
                             f"GPTConfig.n_kv_heads ({self.n_kv_heads})")
        _check_int("n_experts", self.n_experts, minimum=0)
        _check_int("experts_per_token", self.experts_per_token, minimum=1)
        if self.n_experts > 0 and self.experts_per_token > self.n_experts:
            raise ValueError(f"GPTConfig.experts_per_token ({self.experts_per_token}) must be "
                             f"<= GPTConfig.n_experts ({self.n_experts})")
        coef = self.moe_aux_loss_coef
        if isinstance(coef, bool) or not isinstance(coef, (int, float)) or not coef >= 0:
            raise ValueError(f"GPTConfig.moe_aux_loss_coef must be a number >= 0, got {coef!r}")

    @property
    def head_size(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        """Key/value heads: n_kv_heads, or n_heads (plain multi-head attention) when None."""
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    def block_kwargs(self) -> dict:
        """The keyword arguments of `Block` that this config sets."""
        return dict(
            bias=self.bias, dropout=self.dropout, norm=self.norm, norm_eps=self.norm_eps,
            norm_placement=self.norm_placement, mlp=self.mlp, mlp_hidden=self.mlp_hidden,
            n_experts=self.n_experts, experts_per_token=self.experts_per_token,
            moe_aux_loss_coef=self.moe_aux_loss_coef, n_kv_heads=self.n_kv_heads,
            sliding_window=self.sliding_window,
            rope_theta=self.rope_theta if self.pos == "rope" else None,
            max_positions=self.context_length)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> GPTConfig:
        """Build from a dict (e.g. config.json); unknown keys are an error naming them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown GPTConfig fields {unknown}; known fields: {sorted(known)}")
        return cls(**d)


def _check_int(name: str, value, minimum: int, or_none: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        kind = "an int or None" if or_none else "an int"
        raise TypeError(f"GPTConfig.{name} must be {kind}, got {value!r}")
    if value < minimum:
        raise ValueError(f"GPTConfig.{name} must be >= {minimum}, got {value}")
