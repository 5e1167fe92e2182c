"""How much a file may make tinylm allocate, and the sizes a model config implies.

A checkpoint's config.json is a few hundred bytes, yet it decides how much memory
the model takes: `"n_layers": 100000000` asks for gigabytes before a single weight
is read. So every loader (checkpoints, Hugging Face directories, tokenizer files)
checks, BEFORE it allocates anything:

1. each size field against an absolute cap (the MAX_* below: far beyond any model
   tinylm can train and any published checkpoint, e.g. Llama 3 405B has 126 layers,
   d_model 16384, 128,256 ids and 131,072 positions);
2. what the config implies, computed here from the numbers alone (no model is built):
   the number of tensors and of parameters (`count`), their names and shapes
   (`parameter_shapes`), and the tables the model computes itself;
3. those implied sizes against what the file really holds (`check_fits`): a weight
   is stored in at least 2 bytes (float16), so a 3 MB model.npz cannot back a
   model of more than 1.5 million parameters, whatever its config.json says; and
   each tensor is one array of the file, so the table of expected names is built
   only for a config whose tensors the file has.

Each check raises `error` (a FileFormatError or a subclass: the loader chooses)
with a message that starts with the file's path. docs/safety.md tells the story.
"""

from __future__ import annotations

import math

from tinylm.config import MAX_INT_FIELDS, GPTConfig
from tinylm.fileio import FileFormatError
from tinylm.nn.mlp import swiglu_hidden

# -- absolute caps on a model config (each is a power of two, chosen with room to spare)
MAX_LAYERS = MAX_INT_FIELDS["n_layers"]
MAX_VOCAB = MAX_INT_FIELDS["vocab_size"]  # token ids (also the cap on a tokenizer's ids)
MAX_CONTEXT = MAX_INT_FIELDS["context_length"]  # positions (also caps sliding_window)
MAX_D_MODEL = MAX_INT_FIELDS["d_model"]
MAX_MLP_HIDDEN = MAX_INT_FIELDS["mlp_hidden"]
MAX_EXPERTS = MAX_INT_FIELDS["n_experts"]
MAX_TENSORS = 2**17  # parameter tensors in one model (4096 layers of ~16 tensors fit)
MAX_PARAMETERS = 2**36  # ~69 billion: 275 GB in float32, far past what NumPy trains
# Tables the model computes rather than reads (the sinusoidal position table, float64):
# not backed by any file, so capped on their own. 2**26 numbers are 512 MiB.
MAX_COMPUTED_ELEMENTS = 2**26

# -- tokenizer files
MAX_MERGES = MAX_VOCAB
# All tokens' bytes together. GPT-4's 100k tokens hold under 1 MB; a 971-byte file whose
# merges each double the previous token would otherwise ask for 2**40 bytes. A file
# written by tinylm spells out every token's text, so its tokens never hold more bytes
# than the file has: one may hold 16x its size (and 64 KiB whatever its size).
MAX_VOCAB_BYTES = 2**26
VOCAB_BYTES_PER_FILE_BYTE = 16
MIN_VOCAB_BYTES = 2**16

# -- arrays in files
MIN_WEIGHT_BYTES = 2  # float16: the smallest float a weight may be stored as
MAX_NDIM = 32  # NumPy 1.x's own limit; no weight has more than 2 dimensions
# A deflate-compressed .npz (np.savez_compressed) may unpack to at most this many times
# its size on disk. Trained weights hardly compress (random mantissas); a higher ratio
# means mostly zeros: a zip bomb, not a model. (np.savez, which tinylm uses, stores.)
MAX_EXPANSION = 32


def check_config(cfg: GPTConfig, where, error=FileFormatError) -> tuple[int, int]:
    """Check `cfg` (read from the file `where`) against the caps above, cheaply: no
    per-layer table is built. Returns (number of tensors, number of parameters)."""
    # GPTConfig checks these caps too; a config object built around its checks
    # (dataclasses.replace on a subclass, object.__setattr__) meets them here
    for name, cap in MAX_INT_FIELDS.items():
        value = getattr(cfg, name)
        if value is not None and value > cap:
            raise error(f"{where}: {name} = {value} is above the limit of {cap:,} "
                        "(tinylm.limits; refused before any memory is allocated)")
    for name in ("dropout", "rope_theta", "norm_eps", "moe_aux_loss_coef"):
        if not is_finite_number(getattr(cfg, name)):
            raise error(f"{where}: {name} = {getattr(cfg, name)!r} is not a finite number")
    tensors, params = count(cfg)
    if tensors > MAX_TENSORS:
        raise error(f"{where}: the model would have {tensors:,} parameter tensors, above the "
                    f"limit of {MAX_TENSORS:,} (n_layers x tensors per block, experts included)")
    if params > MAX_PARAMETERS:
        raise error(f"{where}: the model would have {params:,} parameters, above the limit "
                    f"of {MAX_PARAMETERS:,}")
    computed = computed_elements(cfg)
    if computed > MAX_COMPUTED_ELEMENTS:
        raise error(f"{where}: the sinusoidal position table would hold {computed:,} numbers "
                    f"(context_length x d_model), above the limit of {MAX_COMPUTED_ELEMENTS:,}")
    return tensors, params


def check_fits(where, file, *, params: int, tensors: int, max_bytes: int, max_tensors: int,
               error=FileFormatError) -> None:
    """The config in `where` implies `params` parameters in `tensors` tensors; `file`
    can hold at most `max_bytes` bytes of arrays in `max_tensors` arrays. Refuse when
    they cannot be there: before the table of expected names and shapes is built.
    A coarse guard (a few tensors short pass): the exact comparison, which names each
    missing tensor, follows once the table is known to be small."""
    if tensors > 2 * max_tensors + 16:
        raise error(f"{where}: describes a model of {tensors:,} parameter tensors, but {file} "
                    f"holds only {max_tensors:,} arrays: the config does not belong to this "
                    "file")
    if params * MIN_WEIGHT_BYTES > max_bytes:
        raise error(f"{where}: describes a model of {params:,} parameters (at least "
                    f"{params * MIN_WEIGHT_BYTES:,} bytes), but {file} can hold only "
                    f"{max_bytes:,} bytes of weights: the config does not belong to this file")


def vocab_bytes_allowed(file_size: int) -> int:
    """The bytes the tokens of a tokenizer file of `file_size` bytes may hold together.

    >>> vocab_bytes_allowed(971), vocab_bytes_allowed(10**6), vocab_bytes_allowed(10**9)
    (65536, 16000000, 67108864)
    """
    return min(MAX_VOCAB_BYTES, max(MIN_VOCAB_BYTES, VOCAB_BYTES_PER_FILE_BYTE * file_size))


def is_finite_number(x) -> bool:
    """An int or float (not a bool) with a finite float value: not NaN, not infinity,
    not an int beyond float range (which `math.isfinite` cannot even convert)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return False
    try:
        return math.isfinite(x)
    except OverflowError:
        return False


# ---------------------------------------------------------------------------
# What a config implies, computed without building the model
# ---------------------------------------------------------------------------


def count(cfg: GPTConfig) -> tuple[int, int]:
    """(parameter tensors, parameters) of GPT(cfg), from one block's shapes times
    n_layers (and one expert's times n_experts): nothing proportional to n_layers or
    n_experts is built.

    >>> count(GPTConfig(vocab_size=10, context_length=4, d_model=8, n_layers=2, n_heads=2))
    (28, 1872)
    """
    outer = _outer_shapes(cfg)
    block = _block_shapes(cfg, experts=False)
    tensors, params = len(block), numel(block)
    if cfg.n_experts > 0:  # the router, then n_experts MLPs alike
        expert = _mlp("mlp.experts.0", cfg)
        tensors += 1 + cfg.n_experts * len(expert)
        params += cfg.d_model * cfg.n_experts + cfg.n_experts * numel(expert)
    return len(outer) + cfg.n_layers * tensors, numel(outer) + cfg.n_layers * params


def computed_elements(cfg: GPTConfig) -> int:
    """Numbers the model computes at build time rather than reads: the sinusoidal table.
    (RoPE's tables are built lazily, for the positions actually used.)"""
    return cfg.context_length * cfg.d_model if cfg.pos == "sinusoidal" else 0


def parameter_shapes(cfg: GPTConfig) -> dict[str, tuple[int, ...]]:
    """{name: shape} of every parameter of GPT(cfg), as `GPT.state_dict()` names them.
    Call `check_config` first: this builds one entry per tensor.

    >>> shapes = parameter_shapes(GPTConfig(vocab_size=10, context_length=4, d_model=8,
    ...                                     n_layers=1, n_heads=2))
    >>> shapes["tok_emb.weight"], shapes["blocks.0.attn.qkv.weight"]
    ((10, 8), (8, 24))
    """
    outer = _outer_shapes(cfg)
    shapes = {name: outer.pop(name) for name in ("tok_emb.weight", "pos_emb.weight")
              if name in outer}
    block = _block_shapes(cfg)
    for i in range(cfg.n_layers):
        shapes.update({f"blocks.{i}.{name}": shape for name, shape in block.items()})
    return shapes | outer  # ln_f and the untied head come after the blocks


def _outer_shapes(cfg: GPTConfig) -> dict:
    """The parameters outside the blocks: embeddings, the final norm, the untied head."""
    C, V = cfg.d_model, cfg.vocab_size
    shapes = {"tok_emb.weight": (V, C)}
    if cfg.pos == "learned":
        shapes["pos_emb.weight"] = (cfg.context_length, C)
    shapes.update(_norm("ln_f", cfg))
    if not cfg.tie_weights:
        shapes["head.weight"] = (C, V)  # tinylm's Linear stores (in, out)
    return shapes


def _block_shapes(cfg: GPTConfig, experts: bool = True) -> dict:
    """One block's parameters, named as inside "blocks.{i}." (tinylm/nn/block.py); with
    experts=False, a MoE block's without its router and experts."""
    C, hs = cfg.d_model, cfg.head_size
    shapes = _norm("ln1", cfg)
    shapes |= _linear("attn.qkv", C, (cfg.n_heads + 2 * cfg.kv_heads) * hs, cfg.bias)
    shapes |= _linear("attn.proj", C, C, cfg.bias)
    shapes |= _norm("ln2", cfg)
    if cfg.n_experts == 0:
        return shapes | _mlp("mlp", cfg)
    if not experts:
        return shapes
    shapes["mlp.router.weight"] = (C, cfg.n_experts)  # no bias (tinylm/nn/moe.py)
    for e in range(cfg.n_experts):
        shapes |= _mlp(f"mlp.experts.{e}", cfg)
    return shapes


def _mlp(prefix: str, cfg: GPTConfig) -> dict:
    C, bias = cfg.d_model, cfg.bias
    if cfg.mlp == "swiglu":
        h = swiglu_hidden(C) if cfg.mlp_hidden is None else cfg.mlp_hidden
        return (_linear(f"{prefix}.gate", C, h, bias) | _linear(f"{prefix}.up", C, h, bias)
                | _linear(f"{prefix}.down", h, C, bias))
    h = 4 * C if cfg.mlp_hidden is None else cfg.mlp_hidden
    return _linear(f"{prefix}.fc", C, h, bias) | _linear(f"{prefix}.proj", h, C, bias)


def _linear(prefix: str, n_in: int, n_out: int, bias: bool) -> dict:
    shapes = {f"{prefix}.weight": (n_in, n_out)}
    if bias:
        shapes[f"{prefix}.bias"] = (n_out,)
    return shapes


def _norm(prefix: str, cfg: GPTConfig) -> dict:
    shapes = {f"{prefix}.weight": (cfg.d_model,)}
    if cfg.norm == "layernorm" and cfg.bias:  # RMSNorm never has a bias
        shapes[f"{prefix}.bias"] = (cfg.d_model,)
    return shapes


def numel(shapes: dict) -> int:
    """The number of values in arrays of these shapes ({name: shape})."""
    return sum(math.prod(shape) for shape in shapes.values())
