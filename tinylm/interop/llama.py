"""Hugging Face Llama (and Mistral) checkpoints <-> tinylm's GPT.

A Hugging Face Llama directory (what `LlamaForCausalLM.save_pretrained` writes) holds

    config.json          the architecture: hidden_size, num_hidden_layers, rope_theta, ...
    model.safetensors    the weights (or model.safetensors.index.json + shards)

tinylm's GPT with the Llama switches (RoPE, RMSNorm, SwiGLU, grouped-query attention,
no biases) is the same network, so importing is renaming plus two layout changes:

- PyTorch's `nn.Linear` stores its weight as (out, in) and tinylm's `Linear` as
  (in, out), so every matrix except the embedding is transposed.
- Llama has three projections q, k, v; tinylm has one `qkv` whose output columns are
  [q | k | v], so their transposes are concatenated side by side.

No q/k permutation is needed: tinylm's RoPE pairs channels i and i + hs/2 ("rotate
half"), as Hugging Face's Llama does (the original Meta weights pair (2i, 2i+1) and
transformers' conversion script permutes them once, on conversion).

    Llama (Hugging Face, "model." prefix)    tinylm                         shape (tinylm)
    embed_tokens.weight                      tok_emb.weight                 (V, C)
    layers.{i}.input_layernorm.weight        blocks.{i}.ln1.weight          (C,)
    layers.{i}.self_attn.q_proj.weight  -+
    layers.{i}.self_attn.k_proj.weight   +-> blocks.{i}.attn.qkv.weight     (C, (H + 2 Hkv) hs)
    layers.{i}.self_attn.v_proj.weight  -+   = [q^T | k^T | v^T]
    layers.{i}.self_attn.o_proj.weight       blocks.{i}.attn.proj.weight    (C, C)
    layers.{i}.post_attention_layernorm.weight  blocks.{i}.ln2.weight       (C,)
    layers.{i}.mlp.gate_proj.weight          blocks.{i}.mlp.gate.weight     (C, hidden)
    layers.{i}.mlp.up_proj.weight            blocks.{i}.mlp.up.weight       (C, hidden)
    layers.{i}.mlp.down_proj.weight          blocks.{i}.mlp.down.weight     (hidden, C)
    norm.weight                              ln_f.weight                    (C,)
    lm_head.weight (no prefix; tied: = embed_tokens)  head.weight (untied only)  (C, V)

Mistral (model_type "mistral") has the same tensors; its `sliding_window` becomes
GPTConfig.sliding_window (query i sees key j iff 0 <= i - j < W, as transformers'
sliding-window mask). Anything tinylm does not compute (another activation, RoPE
scaling, biases, a head_dim that is not hidden_size / heads) is refused with an error
naming the key. See docs/interop.md, section "Llama". Reading and writing the
directory, and the checks every converter makes, are in hf.py.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

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
from tinylm.nn.mlp import swiglu_hidden

PREFIX = "model."  # LlamaForCausalLM's name for the LlamaModel inside it (lm_head is outside)
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}
SILUS = ("silu", "swish")  # transformers' two names for x * sigmoid(x)

# transformers' defaults (LlamaConfig, MistralConfig) for the keys a config.json may
# leave out; the shape keys (REQUIRED) have no default here. num_key_value_heads None
# means one per attention head.
DEFAULTS = {
    "llama": dict(num_key_value_heads=None, max_position_embeddings=2048, rms_norm_eps=1e-6,
                  tie_word_embeddings=False, hidden_act="silu", rope_theta=10000.0),
    "mistral": dict(num_key_value_heads=8, max_position_embeddings=4096 * 32, rms_norm_eps=1e-6,
                    tie_word_embeddings=False, hidden_act="silu", rope_theta=10000.0,
                    sliding_window=4096),
}
REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads")

# Non-parameter buffers of old checkpoints (transformers < 4.31 saved RoPE's frequencies).
IGNORED = re.compile(r"layers\.\d+\.self_attn\.rotary_emb\.inv_freq")

# Inside block i: Llama name (after "layers.{i}.") -> tinylm name (after "blocks.{i}."),
# all but the q/k/v projections, which become one `qkv` (QKV_NAMES).
BLOCK_NAMES = {
    "input_layernorm.weight": "ln1.weight",
    "self_attn.o_proj.weight": "attn.proj.weight",
    "post_attention_layernorm.weight": "ln2.weight",
    "mlp.gate_proj.weight": "mlp.gate.weight",
    "mlp.up_proj.weight": "mlp.up.weight",
    "mlp.down_proj.weight": "mlp.down.weight",
}
QKV_NAMES = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight")
OUTER_NAMES = {"embed_tokens.weight": "tok_emb.weight", "norm.weight": "ln_f.weight"}


# ---------------------------------------------------------------------------
# Names and shapes
# ---------------------------------------------------------------------------


def name_map(n_layers: int) -> dict[str, str]:
    """{Llama name (no prefix): tinylm name} for every parameter except q/k/v and the head.

    >>> name_map(1)["layers.0.mlp.down_proj.weight"]
    'blocks.0.mlp.down.weight'
    """
    return layer_names(OUTER_NAMES, BLOCK_NAMES, n_layers, "layers")


def hf_shapes(cfg: GPTConfig) -> dict[str, tuple[int, ...]]:
    """{Llama name (no prefix): PyTorch shape} for a model of config `cfg`, lm_head included."""
    V, C, hs = cfg.vocab_size, cfg.d_model, cfg.head_size
    hidden = _mlp_hidden(cfg)
    kv = cfg.kv_heads * hs
    block = {
        "input_layernorm.weight": (C,),
        "self_attn.q_proj.weight": (C, C), "self_attn.k_proj.weight": (kv, C),
        "self_attn.v_proj.weight": (kv, C), "self_attn.o_proj.weight": (C, C),
        "post_attention_layernorm.weight": (C,),
        "mlp.gate_proj.weight": (hidden, C), "mlp.up_proj.weight": (hidden, C),
        "mlp.down_proj.weight": (C, hidden),
    }
    outer = {"embed_tokens.weight": (V, C), "norm.weight": (C,), HEAD: (V, C)}
    return layer_shapes(outer, block, cfg.n_layers, "layers")


def _mlp_hidden(cfg: GPTConfig) -> int:
    return cfg.mlp_hidden if cfg.mlp_hidden is not None else swiglu_hidden(cfg.d_model)


# ---------------------------------------------------------------------------
# config.json
# ---------------------------------------------------------------------------


def config_from_hf_llama(hf: dict, source: str = CONFIG_FILE, dropout: float = 0.0) -> GPTConfig:
    """GPTConfig for a Hugging Face LlamaConfig (or MistralConfig) dict; anything
    tinylm's GPT does not compute is an error naming the key and its value. Missing
    optional keys take transformers' defaults for the model_type (DEFAULTS). The
    attention dropout is a training setting and is not imported: the model gets
    `dropout`."""
    fail = failing_in(source)

    if not isinstance(hf, dict):
        fail(f"expected a JSON object, got {type(hf).__name__}")
    model_type = hf.get("model_type", "llama")
    if not isinstance(model_type, str) or model_type not in ARCHITECTURES:
        fail(f"model_type is {shorten(model_type)}; only Llama ('llama') and Mistral ('mistral') "
             "checkpoints are supported here (GPT-2: tinylm.interop.from_hf_gpt2)")
    missing = [key for key in REQUIRED if key not in hf]
    if missing:
        fail(f"missing {missing}; a {model_type} config.json needs {list(REQUIRED)}")
    for key in REQUIRED:  # (GPTConfig would read mlp_hidden=None as "the default width")
        if isinstance(hf[key], bool) or not isinstance(hf[key], int):
            fail(f"{key} is {shorten(hf[key])}; expected an int")
    hf = {**DEFAULTS[model_type], **hf}

    activation = hf["hidden_act"]
    if activation not in SILUS:
        fail(f"hidden_act is {shorten(activation)}; tinylm's SwiGLU gates with SiLU, which "
             f"transformers calls one of {list(SILUS)}")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key, False) is not False:
            fail(f"{key} is {shorten(hf[key])}; tinylm's Llama has no biases ({key} = false)")
    n_embd, n_head = hf["hidden_size"], hf["num_attention_heads"]
    head_dim = hf.get("head_dim")
    if head_dim is not None and (isinstance(head_dim, bool) or not isinstance(head_dim, int)):
        fail(f"head_dim is {shorten(head_dim)}; expected an int or null")
    if head_dim is not None and n_head > 0 and head_dim * n_head != n_embd:
        fail(f"head_dim is {head_dim}; tinylm's heads are hidden_size / num_attention_heads "
             f"= {n_embd} / {n_head} wide (head_dim null or equal to that is supported)")
    theta = _rope_theta(hf, fail)
    eps = hf["rms_norm_eps"]
    if not is_finite_number(eps) or not eps > 0:
        fail(f"rms_norm_eps is {shorten(eps)}; expected a finite number > 0")
    tied = hf["tie_word_embeddings"]
    if not isinstance(tied, bool):
        fail(f"tie_word_embeddings must be true or false, got {shorten(tied)}")
    n_kv = hf["num_key_value_heads"]
    window = hf.get("sliding_window") if model_type == "mistral" else None  # Llama has none
    try:
        cfg = GPTConfig(vocab_size=hf["vocab_size"], context_length=hf["max_position_embeddings"],
                        d_model=n_embd, n_layers=hf["num_hidden_layers"], n_heads=n_head,
                        n_kv_heads=n_head if n_kv is None else n_kv, dropout=dropout, bias=False,
                        tie_weights=tied, pos="rope", rope_theta=theta, norm="rmsnorm",
                        norm_eps=eps, mlp="swiglu", mlp_hidden=hf["intermediate_size"],
                        sliding_window=window)
    except (TypeError, ValueError, OverflowError) as exc:
        fail(f"not a valid model shape: {shorten(exc)}")
    check_limits(cfg, source)  # before the per-layer tables of names and shapes
    return cfg


def _rope_theta(hf: dict, fail) -> float:
    """RoPE's base, from transformers 5's `rope_parameters` {"rope_type", "rope_theta"}
    or the older top-level `rope_theta` with `rope_scaling` (null, or a dict with
    "type"/"rope_type"). Only plain RoPE ("default") is supported: the scaled variants
    (linear, dynamic, yarn, llama3, ...) change the angles or the scores."""
    key = "rope_scaling" if hf.get("rope_scaling") is not None else "rope_parameters"
    params = hf.get(key) or {}  # rope_scaling wins, as in transformers
    if not isinstance(params, dict):
        fail(f"{key} is {shorten(params)}; expected a JSON object or null")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        fail(f"{key} has rope_type {shorten(rope_type)}; tinylm computes plain RoPE only "
             "(rope_type 'default', no RoPE scaling)")
    theta = params.get("rope_theta", hf["rope_theta"])
    if not is_finite_number(theta) or not theta > 0:
        fail(f"rope_theta is {shorten(theta)}; expected a finite number > 0")
    return float(theta)


def config_to_hf_llama(cfg: GPTConfig) -> dict:
    """The config.json that makes `transformers` build the same network as `cfg`: a
    LlamaForCausalLM, or a MistralForCausalLM when the model has a sliding window."""
    wanted = dict(pos="rope", norm="rmsnorm", norm_placement="pre", mlp="swiglu", bias=False,
                  n_experts=0)
    for key, want in wanted.items():
        if getattr(cfg, key) != want:
            raise HFCheckpointError(
                f"GPTConfig.{key} is {getattr(cfg, key)!r}; a Llama needs {key}={want!r} "
                f"(a Llama is {', '.join(f'{k}={v!r}' for k, v in wanted.items())})")
    model_type = "llama" if cfg.sliding_window is None else "mistral"
    hf = {
        "architectures": [ARCHITECTURES[model_type]],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.context_length,
        "hidden_size": cfg.d_model,
        "intermediate_size": _mlp_hidden(cfg),
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_size,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_eps,
        # transformers >= 5 reads rope_parameters, older versions the top-level rope_theta
        "rope_parameters": {"rope_type": "default", "rope_theta": float(cfg.rope_theta)},
        "rope_theta": float(cfg.rope_theta),
        "tie_word_embeddings": cfg.tie_weights,
        "attention_dropout": 0.0,  # tinylm's dropout also acts on the residual branches
        "initializer_range": 0.02,
        "use_cache": True,
    }
    if model_type == "llama":
        hf.update(attention_bias=False, mlp_bias=False)
    else:
        hf["sliding_window"] = cfg.sliding_window
    return hf


# ---------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------


def state_from_hf_llama(tensors: dict, cfg: GPTConfig, source: str = WEIGHTS_FILE) -> dict:
    """Map Llama tensors onto tinylm's state_dict names and layouts, checking that every
    parameter is there exactly once with the right shape and a floating dtype, that
    nothing unknown is left over, and that a tied lm_head equals embed_tokens."""
    fail = failing_in(source)

    plain = strip_prefix(tensors, PREFIX, fail)
    kind = "a Llama" if cfg.sliding_window is None else "a Mistral"
    check_tensors(plain, hf_shapes(cfg), cfg, ignored=IGNORED,
                  what=f"{kind} with num_hidden_layers={cfg.n_layers}",
                  shape_note=f"vocab_size={cfg.vocab_size}, hidden_size={cfg.d_model}, "
                             f"num_key_value_heads={cfg.kv_heads}, "
                             f"intermediate_size={_mlp_hidden(cfg)}", fail=fail)

    state = {ours: _swap_layout(hf, plain[hf]) for hf, ours in name_map(cfg.n_layers).items()}
    for i in range(cfg.n_layers):
        q, k, v = (plain[f"layers.{i}.{name}"].T for name in QKV_NAMES)  # (C, H hs), (C, Hkv hs) x2
        state[f"blocks.{i}.attn.qkv.weight"] = np.concatenate([q, k, v], axis=1)  # [q | k | v]
    return state | head_from_hf(plain, cfg, "embed_tokens.weight", fail)


def _swap_layout(hf_name: str, array: np.ndarray) -> np.ndarray:
    """nn.Linear's (out, in) <-> tinylm Linear's (in, out): every matrix but the embedding
    (V, C in both) is transposed; vectors stay. A transpose is its own inverse, so this
    serves both directions."""
    return array if array.ndim == 1 or hf_name == "embed_tokens.weight" else array.T


def state_to_hf_llama(state: dict, cfg: GPTConfig) -> dict[str, np.ndarray]:
    """tinylm state_dict -> {transformers name: float32 array}, the inverse of
    `state_from_hf_llama` (lm_head only when untied, as save_pretrained writes)."""
    tensors = {hf: _swap_layout(hf, state[ours]) for hf, ours in name_map(cfg.n_layers).items()}
    H, Hkv, hs = cfg.n_heads, cfg.kv_heads, cfg.head_size
    for i in range(cfg.n_layers):
        qkv = state[f"blocks.{i}.attn.qkv.weight"]  # (C, (H + 2 Hkv) hs) = [q | k | v]
        parts = np.split(qkv, [H * hs, (H + Hkv) * hs], axis=1)
        for name, part in zip(QKV_NAMES, parts, strict=True):
            tensors[f"layers.{i}.{name}"] = part.T  # (out, in)
    tensors = {PREFIX + name: array for name, array in tensors.items()}
    if not cfg.tie_weights:  # tied: transformers re-ties lm_head to embed_tokens
        tensors[HEAD] = state["head.weight"].T  # (C, V) -> (V, C)
    return {name: np.ascontiguousarray(a, dtype=np.float32) for name, a in tensors.items()}


# ---------------------------------------------------------------------------
# The public functions
# ---------------------------------------------------------------------------


def from_hf_llama(directory, device: str = "cpu", dtype="float32", dropout: float = 0.0) -> GPT:
    """Load a Hugging Face Llama or Mistral directory (config.json + model.safetensors,
    or its shards) as a tinylm GPT in eval mode, with the same logits as `transformers`.
    Nothing is downloaded. Weights stored as F16/BF16/F64 are converted to `dtype`."""
    directory = Path(directory)
    hf = read_config(directory, "Llama")
    cfg = config_from_hf_llama(hf, str(directory / CONFIG_FILE), dropout)
    model_type = hf.get("model_type", "llama")  # a valid one: config_from_hf_llama checked
    tensors, source = read_weights(directory, ARCHITECTURES[model_type])
    check_weights_fit(cfg, tensors, str(directory / CONFIG_FILE), source)
    return build_model(cfg, state_from_hf_llama(tensors, cfg, source), device, dtype)


def to_hf_llama(model: GPT, directory) -> None:
    """Write `model` (a tinylm GPT with the Llama switches) as a Hugging Face directory
    (config.json + model.safetensors, float32) that `LlamaForCausalLM.from_pretrained`
    (`MistralForCausalLM` with a sliding window) loads with the same logits. Each file
    is written atomically. Models that are not Llamas (see `config_to_hf_llama`) are
    refused."""
    cfg = model.config
    hf_config = config_to_hf_llama(cfg)  # refuses a non-Llama before any write
    write_directory(directory, state_to_hf_llama(model.state_dict(), cfg), hf_config)

