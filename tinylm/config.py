"""GPTConfig: the shape of a GPT, its variant switches, and their validation.

Every field is declared here once, with its default (GPT-2's architecture) and its
help text (field metadata, `f.metadata["help"]`). `tinylm train` takes its model
fields from this class (tinylm/training/config.py) and shows the same help in
`tinylm train --help`; VARIANT_FIELDS lists the switches marked `variant=True`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

POS_KINDS = ("learned", "sinusoidal", "rope", "none")
NORM_KINDS = ("layernorm", "rmsnorm")
NORM_PLACEMENTS = ("pre", "post")
MLP_KINDS = ("gelu", "relu", "swiglu")


def _field(default, doc: str, variant: bool = False):
    """A field with its help text (`tinylm train --help` shows it). `variant` marks the
    architecture switches (positions, norm, MLP, attention, MoE)."""
    return dataclasses.field(default=default, metadata={"help": doc, "variant": variant})


def _required(doc: str):
    return _field(dataclasses.MISSING, doc)


def _variant(default, doc: str):
    return _field(default, doc, variant=True)


@dataclass(frozen=True)
class GPTConfig:
    """The shape of a GPT. Defaults keep GPT-2's architecture. The help texts are those
    `tinylm train --help` shows, so they write None as JSON does: null."""

    vocab_size: int = _required("V: number of token ids")
    context_length: int = _required("T: tokens the model sees at once (positions 0..T-1)")
    d_model: int = _required("C: width of the residual stream")
    n_layers: int = _required("transformer blocks")
    n_heads: int = _required("attention heads per block (must divide d_model; head size "
                             "d_model / n_heads)")
    dropout: float = _field(0.0, "dropout probability while training (embeddings, attention "
                                 "weights, residual branches)")
    bias: bool = _field(True, "biases in Linear and LayerNorm layers (GPT-2: true; nanoGPT's "
                              "recipes: false)")
    tie_weights: bool = _field(True, "the output head shares the token-embedding matrix")
    # -- variants (tinylm/nn/positions.py, norm.py, mlp.py, attention.py, moe.py) --
    pos: str = _variant("learned", "positions: learned (a table), sinusoidal, rope or none")
    rope_theta: float = _variant(10000.0, "RoPE base (with pos=rope): the slowest pair turns "
                                          "once per ~2 pi theta positions")
    norm: str = _variant("layernorm", "layernorm or rmsnorm (Llama; no bias)")
    norm_eps: float = _variant(1e-5, "epsilon of every norm layer (Llama checkpoints: 1e-5 "
                                     "or 1e-6)")
    norm_placement: str = _variant("pre", "pre (GPT-2) or post (the original Transformer)")
    mlp: str = _variant("gelu", "gelu, relu or swiglu (Llama)")
    mlp_hidden: int | None = _variant(None, "MLP width; null: 4 d_model (8/3 d_model, rounded "
                                            "up to a multiple of 8, for swiglu)")
    n_kv_heads: int | None = _variant(None, "key/value heads (grouped-query attention; 1: "
                                            "multi-query); null: n_heads")
    sliding_window: int | None = _variant(None, "attend to the last this many positions only "
                                                "(Mistral); null: the whole context")
    n_experts: int = _variant(0, "> 0: mixture-of-experts MLPs with this many experts")
    experts_per_token: int = _variant(2, "k: experts each token is routed to (with "
                                         "n_experts > 0)")
    moe_aux_loss_coef: float = _variant(0.01, "weight of the MoE load-balancing loss "
                                              "(Switch Transformer)")

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


# The architecture switches, in declaration order (the presets and tests iterate them).
VARIANT_FIELDS = tuple(f.name for f in dataclasses.fields(GPTConfig) if f.metadata["variant"])


def _check_int(name: str, value, minimum: int, or_none: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        kind = "an int or None" if or_none else "an int"
        raise TypeError(f"GPTConfig.{name} must be {kind}, got {value!r}")
    if value < minimum:
        raise ValueError(f"GPTConfig.{name} must be >= {minimum}, got {value}")
