"""Hugging Face GPT-2 checkpoints <-> tinylm's GPT.

A Hugging Face GPT-2 directory (what `GPT2LMHeadModel.save_pretrained` writes, or
the files of openai-community/gpt2 and its larger siblings) holds

    config.json          the architecture: vocab_size, n_positions, n_embd, n_layer, ...
    model.safetensors    the weights (or model.safetensors.index.json + shards)
    vocab.json, merges.txt   the tokenizer (optional here)

tinylm's GPT is the same network as GPT-2, so importing is renaming: no weight is
transposed or split. GPT-2's `Conv1D` layers store their weight as (in, out) and
compute y = x @ W + b, exactly as tinylm's `Linear`; `c_attn`'s output is [q | k | v]
with each part split into heads contiguously, exactly as tinylm's `qkv`.

    GPT-2 (Hugging Face)                 tinylm                        shape
    wte.weight                           tok_emb.weight                (V, C)
    wpe.weight                           pos_emb.weight                (n_positions, C)
    h.{i}.ln_1.weight | .bias            blocks.{i}.ln1.weight | .bias (C,)
    h.{i}.attn.c_attn.weight | .bias     blocks.{i}.attn.qkv.*         (C, 3C) | (3C,)
    h.{i}.attn.c_proj.weight | .bias     blocks.{i}.attn.proj.*        (C, C) | (C,)
    h.{i}.ln_2.weight | .bias            blocks.{i}.ln2.*              (C,)
    h.{i}.mlp.c_fc.weight | .bias        blocks.{i}.mlp.fc.*           (C, 4C) | (4C,)
    h.{i}.mlp.c_proj.weight | .bias      blocks.{i}.mlp.proj.*         (4C, C) | (C,)
    ln_f.weight | .bias                  ln_f.weight | .bias           (C,)
    lm_head.weight (tied: = wte)         head.weight (untied only)     (V, C) vs (C, V)

Names may carry a "transformer." prefix (GPT2LMHeadModel's own state dict) or not
(the original OpenAI conversions). Old checkpoints also hold the attention mask
buffers h.{i}.attn.bias (1, 1, n_positions, n_positions) and h.{i}.attn.masked_bias:
constants, not parameters, so they are ignored. See docs/interop.md.

Weights are only ever read from safetensors files: a pickled `pytorch_model.bin` can
run arbitrary code when it is loaded, so it is refused with a note on converting it.
Reading and writing the directory, and the checks every converter makes, are in hf.py;
this file holds what is GPT-2's own: its config keys and the table above.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

from tinylm.fileio import shorten
from tinylm.interop.hf import (
    CONFIG_FILE,
    HEAD,
    WEIGHTS_FILE,
    HFCheckpointError,
    build_model,
    check_limits,
    check_tensors,
    check_weights_fit,
    failing_in,
    head_from_hf,
    layer_names,
    layer_shapes,
    read_config,
    read_weights,
    strip_prefix,
    write_directory,
)
from tinylm.limits import is_finite_number
from tinylm.model import GPT, GPTConfig

MODEL_CLASS = "GPT2LMHeadModel"  # transformers' class, named in the pickle-conversion hint
PREFIX = "transformer."  # GPT2LMHeadModel's name for the GPT2Model inside it

# GPT-2's activation names for the tanh approximation of GELU, which tinylm's GELU is.
# ("gelu" is the exact erf form, "relu" etc. are other networks: refused.)
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh")
LAYER_NORM_EPS = 1e-5  # tinylm's LayerNorm

# Non-parameter buffers of old checkpoints: the causal mask and the masked fill value.
IGNORED = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")

# Inside block i: GPT-2 name (after "h.{i}.") -> tinylm name (after "blocks.{i}.").
BLOCK_NAMES = {
    "ln_1.weight": "ln1.weight",
    "ln_1.bias": "ln1.bias",
    "attn.c_attn.weight": "attn.qkv.weight",
    "attn.c_attn.bias": "attn.qkv.bias",
    "attn.c_proj.weight": "attn.proj.weight",
    "attn.c_proj.bias": "attn.proj.bias",
    "ln_2.weight": "ln2.weight",
    "ln_2.bias": "ln2.bias",
    "mlp.c_fc.weight": "mlp.fc.weight",
    "mlp.c_fc.bias": "mlp.fc.bias",
    "mlp.c_proj.weight": "mlp.proj.weight",
    "mlp.c_proj.bias": "mlp.proj.bias",
}
OUTER_NAMES = {
    "wte.weight": "tok_emb.weight",
    "wpe.weight": "pos_emb.weight",
    "ln_f.weight": "ln_f.weight",
    "ln_f.bias": "ln_f.bias",
}


# ---------------------------------------------------------------------------
# Names and shapes
# ---------------------------------------------------------------------------


def name_map(n_layers: int) -> dict[str, str]:
    """{GPT-2 name (no prefix): tinylm name} for every parameter except the head.

    >>> name_map(1)["h.0.attn.c_attn.weight"]
    'blocks.0.attn.qkv.weight'
    """
    return layer_names(OUTER_NAMES, BLOCK_NAMES, n_layers, "h")


def hf_shapes(cfg: GPTConfig) -> dict[str, tuple[int, ...]]:
    """{GPT-2 name (no prefix): shape} for a model of config `cfg`, lm_head included."""
    V, P, C = cfg.vocab_size, cfg.context_length, cfg.d_model
    block = {
        "ln_1.weight": (C,), "ln_1.bias": (C,),
        "attn.c_attn.weight": (C, 3 * C), "attn.c_attn.bias": (3 * C,),
        "attn.c_proj.weight": (C, C), "attn.c_proj.bias": (C,),
        "ln_2.weight": (C,), "ln_2.bias": (C,),
        "mlp.c_fc.weight": (C, 4 * C), "mlp.c_fc.bias": (4 * C,),
        "mlp.c_proj.weight": (4 * C, C), "mlp.c_proj.bias": (C,),
    }
    outer = {"wte.weight": (V, C), "wpe.weight": (P, C), "ln_f.weight": (C,), "ln_f.bias": (C,),
             HEAD: (V, C)}
    return layer_shapes(outer, block, cfg.n_layers, "h")


# ---------------------------------------------------------------------------
# config.json
# ---------------------------------------------------------------------------


def config_from_hf(hf: dict, source: str = CONFIG_FILE, dropout: float = 0.0) -> GPTConfig:
    """GPTConfig for a Hugging Face GPT2Config dict; anything tinylm's GPT does not
    compute (another activation, epsilon, attention scaling, MLP width) is an error.
    Missing optional keys take GPT2Config's defaults. GPT-2's dropout rates are
    training settings and are not imported: the model gets `dropout`."""
    fail = failing_in(source)

    if not isinstance(hf, dict):
        fail(f"expected a JSON object, got {type(hf).__name__}")
    if hf.get("model_type", "gpt2") != "gpt2":
        fail(f"model_type is {shorten(hf['model_type'])}; only GPT-2 ('gpt2') checkpoints "
             "are supported")
    if "n_positions" not in hf and "n_ctx" in hf:  # very old configs
        hf = {**hf, "n_positions": hf["n_ctx"]}
    required = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head")
    missing = [key for key in required if key not in hf]
    if missing:
        fail(f"missing {missing}; a GPT-2 config.json needs {list(required)}")

    for key in required:  # before any arithmetic: "4 * n_embd" of a string is a string
        if isinstance(hf[key], bool) or not isinstance(hf[key], int):
            fail(f"{key} is {shorten(hf[key])}; expected an int")

    n_embd = hf["n_embd"]
    n_inner = hf.get("n_inner")
    if n_inner is not None and n_inner != 4 * n_embd:
        fail(f"n_inner is {n_inner}; tinylm's MLP has 4 * n_embd = {4 * n_embd} hidden units "
             "(n_inner null or equal to that is supported)")
    activation = hf.get("activation_function", "gelu_new")
    if activation not in TANH_GELUS:
        fail(f"activation_function is {shorten(activation)}; tinylm's GELU is the tanh "
             f"approximation, which GPT-2 calls one of {list(TANH_GELUS)}")
    eps = hf.get("layer_norm_epsilon", LAYER_NORM_EPS)
    if not is_finite_number(eps) or not math.isclose(eps, LAYER_NORM_EPS, rel_tol=1e-9):
        fail(f"layer_norm_epsilon is {shorten(eps)}; tinylm's LayerNorm uses {LAYER_NORM_EPS}")
    for key, want in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                      ("add_cross_attention", False)):
        if hf.get(key, want) != want:
            fail(f"{key} is {shorten(hf[key])}; tinylm's attention needs "
                 f"{key} = {json.dumps(want)}")
    # reorder_and_upcast_attn only changes the order and precision of the same sums
    # (for fp16 training), not the function, so it is accepted.
    tied = hf.get("tie_word_embeddings", True)
    if not isinstance(tied, bool):
        fail(f"tie_word_embeddings must be true or false, got {shorten(tied)}")
    try:
        cfg = GPTConfig(vocab_size=hf["vocab_size"], context_length=hf["n_positions"],
                        d_model=n_embd, n_layers=hf["n_layer"], n_heads=hf["n_head"],
                        dropout=dropout, bias=True, tie_weights=tied)
    except (TypeError, ValueError, OverflowError) as exc:
        fail(f"not a valid model shape: {shorten(exc)}")
    check_limits(cfg, source)  # before the per-layer tables of names and shapes
    return cfg


def config_to_hf(cfg: GPTConfig, eos_token_id: int | None = None) -> dict:
    """The config.json that makes `transformers` build the same network as `cfg`."""
    if not cfg.bias:
        raise HFCheckpointError("GPT-2 has biases in every Linear and LayerNorm; a model "
                                "with bias=False has no GPT-2 equivalent")
    # every variant switch must be at its GPT-2 default (n_kv_heads = n_heads is plain MHA)
    plain = dataclasses.replace(cfg, n_kv_heads=None) if cfg.kv_heads == cfg.n_heads else cfg
    gpt2 = GPTConfig(cfg.vocab_size, cfg.context_length, cfg.d_model, cfg.n_layers,
                     cfg.n_heads, cfg.dropout, cfg.bias, cfg.tie_weights)
    changed = [f"{f}={getattr(cfg, f)!r}" for f in gpt2.to_dict()
               if getattr(plain, f) != getattr(gpt2, f)]
    if changed:
        raise HFCheckpointError(f"GPT-2 has none of the variant settings {', '.join(changed)}; "
                                "export a Llama-style model with tinylm.interop.to_hf_llama")
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.context_length,
        "n_embd": cfg.d_model,
        "n_layer": cfg.n_layers,
        "n_head": cfg.n_heads,
        "n_inner": None,  # = 4 * n_embd
        "activation_function": "gelu_new",  # the tanh approximation
        "layer_norm_epsilon": LAYER_NORM_EPS,
        "resid_pdrop": cfg.dropout,
        "embd_pdrop": cfg.dropout,
        "attn_pdrop": cfg.dropout,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": cfg.tie_weights,
        "bos_token_id": eos_token_id,
        "eos_token_id": eos_token_id,
        "use_cache": True,
    }


# ---------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------


def state_from_hf(tensors: dict, cfg: GPTConfig, source: str = WEIGHTS_FILE) -> dict:
    """Map GPT-2 tensors onto tinylm's state_dict names, checking that every parameter
    is there exactly once with the right shape and a floating dtype, that nothing
    unknown is left over, and that a tied lm_head equals wte."""
    fail = failing_in(source)

    plain = strip_prefix(tensors, PREFIX, fail)
    check_tensors(plain, hf_shapes(cfg), cfg, ignored=IGNORED,
                  what=f"a GPT-2 with n_layer={cfg.n_layers}",
                  shape_note=f"vocab_size={cfg.vocab_size}, n_positions={cfg.context_length}, "
                             f"n_embd={cfg.d_model}", fail=fail)
    # no weight is transposed: GPT-2's Conv1D stores (in, out), as tinylm's Linear
    state = {ours: plain[hf] for hf, ours in name_map(cfg.n_layers).items()}
    return state | head_from_hf(plain, cfg, "wte.weight", fail)


# ---------------------------------------------------------------------------
# The public functions
# ---------------------------------------------------------------------------


def from_hf_gpt2(directory, device: str = "cpu", dtype="float32", dropout: float = 0.0) -> GPT:
    """Load a Hugging Face GPT-2 directory (config.json + model.safetensors) as a tinylm
    GPT in eval mode, with the same logits as `transformers`. Nothing is downloaded.
    Weights stored as F16/BF16/F64 are converted to `dtype`."""
    directory = Path(directory)
    cfg = config_from_hf(read_config(directory, "GPT-2"), str(directory / CONFIG_FILE), dropout)
    tensors, source = read_weights(directory, MODEL_CLASS)
    check_weights_fit(cfg, tensors, str(directory / CONFIG_FILE), source)
    return build_model(cfg, state_from_hf(tensors, cfg, source), device, dtype)


def load_hf_gpt2(directory, device: str = "cpu", dtype="float32"):
    """(GPT, BPETokenizer or None): the model, and the tokenizer read from GPT-2's
    vocab.json + merges.txt when the directory has them (what `tinylm generate
    --hf-gpt2 DIR` runs)."""
    directory = Path(directory)
    model = from_hf_gpt2(directory, device=device, dtype=dtype)
    vocab, merges = directory / "vocab.json", directory / "merges.txt"
    if not vocab.is_file() and not merges.is_file():
        return model, None
    if not (vocab.is_file() and merges.is_file()):
        present, absent = (vocab, merges) if vocab.is_file() else (merges, vocab)
        raise FileNotFoundError(f"{directory}: has {present.name} but not {absent.name}; "
                                "a GPT-2 tokenizer needs both")
    from tinylm.tokenizer import BPETokenizer  # only when there is a tokenizer to read

    tokenizer = BPETokenizer.from_gpt2(vocab, merges)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise HFCheckpointError(f"{directory}: the tokenizer has {tokenizer.vocab_size} tokens "
                                f"but the model only {model.config.vocab_size} (vocab_size)")
    return model, tokenizer


def to_hf_gpt2(model: GPT, directory, eos_token_id: int | None = None) -> None:
    """Write `model` as a Hugging Face GPT-2 directory (config.json + model.safetensors,
    float32) that `GPT2LMHeadModel.from_pretrained(directory)` loads with the same
    logits. `eos_token_id` goes into the config as bos/eos token id (GPT-2's is 50256).
    Each file is written atomically."""
    cfg = model.config
    hf_config = config_to_hf(cfg, eos_token_id)  # refuses a non-GPT-2 before any write
    state = model.state_dict()
    tensors = {PREFIX + hf: state[ours] for hf, ours in name_map(cfg.n_layers).items()}
    if not cfg.tie_weights:  # tied: transformers re-ties lm_head to wte, so it is not stored
        tensors[HEAD] = state["head.weight"].T  # (C, V) -> (V, C)
    write_directory(directory, tensors, hf_config)
