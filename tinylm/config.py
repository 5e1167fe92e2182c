"""GPTConfig: the shape of a GPT, its variant switches, and their validation.

Every field is declared here once, with its default (GPT-2's architecture) and its
help text (field metadata, `f.metadata["help"]`). `tinylm train` takes its model
fields from this class (tinylm/training/config.py) and shows the same help in
`tinylm train --help`; VARIANT_FIELDS lists the switches marked `variant=True`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from tinylm.fileio import shorten

POS_KINDS = ("learned", "sinusoidal", "rope", "none")
NORM_KINDS = ("layernorm", "rmsnorm")
NORM_PLACEMENTS = ("pre", "post")
MLP_KINDS = ("gelu", "relu", "swiglu")
ATTENTION_KINDS = ("standard", "flash")

# Upper bounds of the integer fields: far beyond any model tinylm can train and any
# published checkpoint (Llama 3 405B: 126 layers, d_model 16384, 53248 MLP units,
# 128,256 ids, 131,072 positions), yet low enough that a typo (`--set n_layers=100000`)
# or a hostile config.json fails here, naming the field, rather than as a MemoryError
# deep inside an allocation.
MAX_INT_FIELDS = {
    "vocab_size": 2**24, "context_length": 2**20, "d_model": 2**16, "n_layers": 4096,
    "n_heads": 2**16, "mlp_hidden": 2**20, "n_kv_heads": 2**16, "sliding_window": 2**20,
    "n_experts": 4096, "experts_per_token": 4096,
}


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
    attention: str = _variant("standard", "standard, or flash: FlashAttention-2, the same "
                                          "numbers in tiles with O(T) memory (needs dropout 0)")
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
        _check_real("dropout", self.dropout, "in [0, 1)", lambda p: 0.0 <= p < 1.0)
        for name in ("bias", "tie_weights"):
            if not isinstance(getattr(self, name), bool):
                value = getattr(self, name)
                raise TypeError(f"GPTConfig.{name} must be True or False, got {value!r}")
        for name, kinds in (("pos", POS_KINDS), ("norm", NORM_KINDS),
                            ("norm_placement", NORM_PLACEMENTS), ("mlp", MLP_KINDS),
                            ("attention", ATTENTION_KINDS)):
            if getattr(self, name) not in kinds:
                raise ValueError(f"GPTConfig.{name} must be one of {kinds}, "
                                 f"got {getattr(self, name)!r}")
        _check_real("rope_theta", self.rope_theta, "a number > 0 (finite)", lambda t: t > 0)
        # an epsilon of 1 or more would swamp the variance it is added to
        _check_real("norm_eps", self.norm_eps, "a number > 0 and < 1", lambda e: 0 < e < 1)
        if self.pos == "rope" and self.head_size % 2 != 0:
            raise ValueError(f"GPTConfig.pos='rope' needs an even head size, but d_model "
                             f"({self.d_model}) / n_heads ({self.n_heads}) = {self.head_size}")
        if self.pos == "sinusoidal" and self.d_model % 2 != 0:
            raise ValueError(f"GPTConfig.pos='sinusoidal' needs an even d_model, "
                             f"got {self.d_model}")
        for name in ("mlp_hidden", "n_kv_heads", "sliding_window"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), minimum=1, or_none=True)
        if self.attention == "flash" and self.dropout > 0:
            raise ValueError(f"GPTConfig.attention='flash' does not support attention dropout: "
                             f"GPTConfig.dropout must be 0, got {self.dropout}")
        if self.n_heads % self.kv_heads != 0:
            raise ValueError(f"GPTConfig.n_heads ({self.n_heads}) must be a multiple of "
                             f"GPTConfig.n_kv_heads ({self.n_kv_heads})")
        _check_int("n_experts", self.n_experts, minimum=0)
        _check_int("experts_per_token", self.experts_per_token, minimum=1)
        if self.n_experts > 0 and self.experts_per_token > self.n_experts:
            raise ValueError(f"GPTConfig.experts_per_token ({self.experts_per_token}) must be "
                             f"<= GPTConfig.n_experts ({self.n_experts})")
        _check_real("moe_aux_loss_coef", self.moe_aux_loss_coef, "a number >= 0 (finite)",
                    lambda c: c >= 0)

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
            sliding_window=self.sliding_window, attention=self.attention,
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
    """An int field in [minimum, MAX_INT_FIELDS[name]]; the error names the range."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        kind = "an int or None" if or_none else "an int"
        raise TypeError(f"GPTConfig.{name} must be {kind}, got {value!r}")
    maximum = MAX_INT_FIELDS[name]
    if not minimum <= value <= maximum:
        side = f">= {minimum}" if value < minimum else f"<= {maximum}"
        raise ValueError(f"GPTConfig.{name} must be {side}, got {value} "
                         f"(valid: {minimum} to {maximum})")


def _check_real(name: str, value, rule: str, ok) -> None:
    """A float field: a finite number (NaN and infinity pass most comparisons' negation
    unnoticed, then poison every activation) for which ok(value) holds."""
    real = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    if not real or not _finite_float(value) or not ok(value):
        raise ValueError(f"GPTConfig.{name} must be {rule}, got {shorten(value, 40)}")


def _finite_float(value) -> bool:
    """value as a float is finite (a 400-digit int overflows the conversion: not a float)."""
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False
