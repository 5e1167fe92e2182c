"""Write tests/fixtures/hf_llama/ (and hf_mistral/): tiny random Llama and Mistral models
saved by Hugging Face `transformers`, with their logits, loss and every gradient, for
tests/test_interop_llama.py. Run by hand (the tests need neither PyTorch nor transformers):

    pip install torch==2.13.0 transformers safetensors   # CPU build is enough
    python scripts/make_hf_llama_fixture.py

What it writes (hf_llama about 240 kB, hf_mistral about 60 kB):

    hf_llama/config.json, model.safetensors
        LlamaForCausalLM.save_pretrained of a tiny Llama: vocab 61, hidden 32, 4 heads
        with 2 key/value heads (grouped-query attention, head size 8), SwiGLU width 40,
        2 layers, 32 positions, rms_norm_eps 1e-6, an untied head and rope_theta 100
        (the slowest of the 4 channel pairs turns ~0.4 rad over the 12 test positions,
        the fastest ~12 rad: every pair's rotation shows in the logits). The weights
        are redrawn from a seeded generator with large spreads, the RMSNorm weights
        away from 1, so that a swapped or misplaced tensor changes the logits.
    hf_llama/expected.npz
        idx, targets (2, 12) int64
        logits       (2, 12, V) transformers' float32 logits
        logits64     (2, 12, V) float64 logits (see "float64" below)
        loss64       ()         mean cross-entropy of logits64 against targets
        grad.NAME    the float64 gradient of loss64 w.r.t. every parameter, by PyTorch
                     autograd, under tinylm's parameter NAME and in tinylm's layout
                     (transposed (in, out) weights, q/k/v concatenated into qkv)
    hf_mistral/config.json, model.safetensors, expected.npz
        a 1-layer MistralForCausalLM of the same width with sliding_window 5, shorter
        than the 12 test positions; idx (2, 12), logits (float32) and logits64.

save_pretrained's generation_config.json is deleted (tinylm does not read it).

float64: transformers' Llama keeps three steps in float32 even in a float64 model:
LlamaRotaryEmbedding.forward computes the angles and cos/sin in float32,
LlamaRMSNorm.forward upcasts to float32 (a no-op for float32, a *downcast* for float64)
and eager attention takes the softmax in float32. A float64 reference would then agree
with tinylm's float64 only to ~1e-7. `float64_transformers()` replaces those three
functions, for the float64 runs only, with the same formulas computed in the model's
dtype; nothing else of transformers is touched. The float32 logits come from the
unpatched model, and the script prints how far the patched float64 logits are from
them (about float32 rounding, i.e. the patch changes precision, not the function).

Then, the reverse direction (printed, not written): a random tinylm Llama is exported
with `tinylm.interop.to_hf_llama`, loaded with `LlamaForCausalLM.from_pretrained` (and a
Mistral with MistralForCausalLM), and the logits are compared with tinylm's.
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM
from transformers.models.llama import modeling_llama
from transformers.models.mistral import modeling_mistral

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tinylm import GPT, GPTConfig  # noqa: E402
from tinylm.interop import from_hf_llama, load_file, to_hf_llama  # noqa: E402

OUT = ROOT / "tests" / "fixtures" / "hf_llama"
OUT_MISTRAL = ROOT / "tests" / "fixtures" / "hf_mistral"
SHAPE = dict(vocab_size=61, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=40, num_hidden_layers=2, max_position_embeddings=32,
             rms_norm_eps=1e-6, tie_word_embeddings=False,
             rope_parameters={"rope_type": "default", "rope_theta": 100.0})
SLIDING_WINDOW = 5
B, T = 2, 12
SEED = 4321


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int) -> None:
    """Redraw every parameter with spreads that make each one matter (transformers'
    init, std 0.02 and unit norms, gives nearly uniform logits and would hide a
    norm weight that is not applied)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters()):
        noise = torch.randn(p.shape, generator=g, dtype=torch.float64)
        if "norm" in name:
            value = 1.0 + 0.3 * noise
        elif "embed_tokens" in name:
            value = noise
        else:
            value = 0.25 * noise
        p.copy_(value.to(p.dtype))


# ---------------------------------------------------------------------------
# float64 all the way (see the docstring)
# ---------------------------------------------------------------------------


def _rms_norm_forward(self, hidden_states):
    variance = hidden_states.pow(2).mean(-1, keepdim=True)  # in the input's dtype
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


def _rotary_forward(self, x, position_ids):
    cfg = self.config
    dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    theta = cfg.rope_parameters["rope_theta"]
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    freqs = position_ids[..., None].to(torch.float64) * inv_freq  # (B, T, hs/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, hs)
    return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


def _eager_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    key = modeling_llama.repeat_kv(key, module.num_key_value_groups)
    value = modeling_llama.repeat_kv(value, module.num_key_value_groups)
    att = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        att = att + attention_mask
    att = torch.softmax(att, dim=-1)  # in the input's dtype
    return torch.matmul(att, value).transpose(1, 2).contiguous(), att


@contextlib.contextmanager
def float64_transformers():
    """Llama's and Mistral's RMSNorm, rotary tables and eager attention in the model's dtype."""
    patches = [(modeling_llama.LlamaRMSNorm, "forward", _rms_norm_forward),
               (modeling_llama.LlamaRotaryEmbedding, "forward", _rotary_forward),
               (modeling_llama, "eager_attention_forward", _eager_attention),
               (modeling_mistral.MistralRMSNorm, "forward", _rms_norm_forward),
               (modeling_mistral.MistralRotaryEmbedding, "forward", _rotary_forward),
               (modeling_mistral, "eager_attention_forward", _eager_attention)]
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
    try:
        for owner, name, new in patches:
            setattr(owner, name, new)
        yield
    finally:
        for owner, name, old in saved:
            setattr(owner, name, old)


# ---------------------------------------------------------------------------
# Hugging Face names -> tinylm names
# ---------------------------------------------------------------------------


def tinylm_grads(model: LlamaForCausalLM) -> dict[str, np.ndarray]:
    """{tinylm name: gradient in tinylm's layout} from the .grad of every HF parameter."""
    g = {name: p.grad.numpy() for name, p in model.named_parameters()}
    out = {"tok_emb.weight": g["model.embed_tokens.weight"], "ln_f.weight": g["model.norm.weight"],
           "head.weight": g["lm_head.weight"].T}
    for i in range(model.config.num_hidden_layers):
        hf = f"model.layers.{i}."
        ours = f"blocks.{i}."
        out[ours + "ln1.weight"] = g[hf + "input_layernorm.weight"]
        out[ours + "attn.qkv.weight"] = np.concatenate(
            [g[hf + f"self_attn.{x}_proj.weight"].T for x in "qkv"], axis=1)
        out[ours + "attn.proj.weight"] = g[hf + "self_attn.o_proj.weight"].T
        out[ours + "ln2.weight"] = g[hf + "post_attention_layernorm.weight"]
        for x in ("gate", "up", "down"):
            out[ours + f"mlp.{x}.weight"] = g[hf + f"mlp.{x}_proj.weight"].T
    return {name: np.ascontiguousarray(a) for name, a in out.items()}


# ---------------------------------------------------------------------------
# The fixtures
# ---------------------------------------------------------------------------


def build(cls, config, out: Path):
    config._attn_implementation = "eager"  # the plain softmax(q k^T / sqrt(hs)) v path
    torch.manual_seed(SEED)
    model = cls(config).eval()
    randomize(model, SEED)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)  # transformers >= 5 writes safetensors only
    (out / "generation_config.json").unlink(missing_ok=True)
    return model


def make_llama() -> None:
    model = build(LlamaForCausalLM, LlamaConfig(**SHAPE), OUT)
    V = SHAPE["vocab_size"]
    rng = np.random.default_rng(SEED)
    idx = rng.integers(0, V, (B, T))  # (2, 12)
    targets = rng.integers(0, V, (B, T))  # (2, 12)
    expected = dict(idx=idx, targets=targets)
    with torch.no_grad():
        expected["logits"] = model(torch.from_numpy(idx)).logits.numpy()  # (B, T, V) float32

    model = model.to(torch.float64)
    with float64_transformers():
        logits = model(torch.from_numpy(idx)).logits  # (B, T, V)
        loss = F.cross_entropy(logits.reshape(-1, V), torch.from_numpy(targets).reshape(-1))
        loss.backward()
    expected["logits64"] = logits.detach().numpy()
    expected["loss64"] = np.array(loss.item())
    expected.update({f"grad.{k}": v for k, v in tinylm_grads(model).items()})
    np.savez(OUT / "expected.npz", **expected)
    report(OUT, expected)


def make_mistral() -> None:
    shape = {**SHAPE, "num_hidden_layers": 1}
    model = build(MistralForCausalLM, MistralConfig(**shape, sliding_window=SLIDING_WINDOW),
                  OUT_MISTRAL)
    rng = np.random.default_rng(SEED + 1)
    idx = rng.integers(0, SHAPE["vocab_size"], (B, T))  # (2, 12): longer than the window
    expected = dict(idx=idx)
    with torch.no_grad():
        expected["logits"] = model(torch.from_numpy(idx)).logits.numpy()
        with float64_transformers():
            expected["logits64"] = model.to(torch.float64)(torch.from_numpy(idx)).logits.numpy()
    np.savez(OUT_MISTRAL / "expected.npz", **expected)
    report(OUT_MISTRAL, expected)


def report(out: Path, expected: dict) -> None:
    meta = {"torch": torch.__version__, "transformers": __import__("transformers").__version__}
    size = sum(p.stat().st_size for p in out.iterdir()) / 1e3
    print(f"wrote {out.relative_to(ROOT)} ({size:.0f} kB), {meta}")
    gap = np.abs(expected["logits64"] - expected["logits"]).max()
    print(f"  transformers float64 (patched) vs float32 logits: max abs diff {gap:.2e}")

    for dtype, ref in (("float32", expected["logits"]), ("float64", expected["logits64"])):
        model = from_hf_llama(out, dtype=dtype)
        err = np.abs(model.forward(expected["idx"]) - ref).max()
        print(f"  forward: tinylm.from_hf_llama vs transformers, {dtype}: max abs diff {err:.2e} "
              f"(logits up to {np.abs(ref).max():.1f})")
    if "loss64" not in expected:
        return
    from tinylm.nn import SoftmaxCrossEntropy

    model = from_hf_llama(out, dtype="float64")
    loss_fn = SoftmaxCrossEntropy()
    loss = loss_fn.forward(model.forward(expected["idx"]), expected["targets"])
    model.backward(loss_fn.backward())
    grads = {name: g for name, _, g in model.parameters()}
    worst = max((np.abs(grads[k[5:]] - v).max(), k[5:]) for k, v in expected.items()
                if k.startswith("grad."))
    print(f"  float64 loss: |tinylm - torch| = {abs(loss - expected['loss64']):.2e}; gradients: "
          f"max abs diff {worst[0]:.2e} ({worst[1]})")

    from safetensors.numpy import load_file as st_load

    theirs, ours = st_load(out / "model.safetensors"), load_file(out / "model.safetensors")
    same = theirs.keys() == ours.keys() and all(np.array_equal(theirs[k], ours[k]) for k in ours)
    print(f"  tinylm's safetensors reader == safetensors.numpy.load_file: {same}")


def reverse(cls, **variant) -> None:
    """tinylm -> to_hf_llama -> {Llama,Mistral}ForCausalLM.from_pretrained: same logits?"""
    cfg = GPTConfig(vocab_size=53, context_length=16, d_model=24, n_layers=2, n_heads=6,
                    n_kv_heads=3, pos="rope", rope_theta=500.0, norm="rmsnorm", norm_eps=1e-5,
                    mlp="swiglu", mlp_hidden=36, bias=False, **variant)
    model = GPT(cfg, seed=7)
    rng = np.random.default_rng(7)
    model.load_state_dict({k: v + 0.3 * rng.standard_normal(v.shape).astype(v.dtype)
                           for k, v in model.state_dict().items()})  # move every weight
    model.eval()
    idx = rng.integers(0, cfg.vocab_size, (2, 16))
    with tempfile.TemporaryDirectory() as tmp:
        to_hf_llama(model, tmp)
        hf = cls.from_pretrained(tmp, attn_implementation="eager").eval()
        for dtype, tdtype in (("float32", torch.float32), ("float64", torch.float64)):
            ours = GPT(cfg, dtype=dtype)
            ours.load_state_dict(model.state_dict())
            ours.eval()
            mine = ours.forward(idx)
            with torch.no_grad(), (float64_transformers() if dtype == "float64"
                                   else contextlib.nullcontext()):
                theirs = hf.to(tdtype)(torch.from_numpy(idx)).logits.numpy()
            diff = np.abs(mine - theirs).max()
            print(f"reverse ({cls.__name__}, {variant or 'plain'}, {dtype}): tinylm export -> "
                  f"transformers logits: max abs diff {diff:.2e}, relative "
                  f"{diff / np.abs(theirs).max():.2e}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    make_llama()
    make_mistral()
    reverse(LlamaForCausalLM, tie_weights=False)
    reverse(LlamaForCausalLM, tie_weights=True)
    reverse(MistralForCausalLM, tie_weights=False, sliding_window=6)
