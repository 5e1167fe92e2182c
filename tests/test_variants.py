"""The modern decoder variants (GPTConfig switches): what each one computes, beyond
its gradient check (tests/test_gradcheck.py runs the suite's variant cases).

The KV-cache checks are in float64, where cached and uncached paths differ only
by summation order, so a wrong position, a stale or missing key, or an
off-by-one in the banded mask shows up far above the tolerance.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from tinylm import GPT, GPTConfig
from tinylm.backend import get_xp, to_device, to_numpy
from tinylm.gradcheck import check_layer, check_model, randomize_params
from tinylm.nn import CausalSelfAttention, KVCache, MoE, RotaryEmbedding, SoftmaxCrossEntropy
from tinylm.nn.attention import attention_mask
from tinylm.sampling import generate
from tinylm.train import MODEL_VARIANT_FIELDS, PRESETS

RTOL = 1e-10
BASE = dict(vocab_size=29, context_length=12, d_model=16, n_layers=2, n_heads=4)

VARIANTS = {
    "gpt2": {},
    "rope": dict(pos="rope", rope_theta=100.0),
    "sinusoidal": dict(pos="sinusoidal"),
    "nope": dict(pos="none"),
    "rmsnorm-post": dict(norm="rmsnorm", norm_placement="post"),
    "relu": dict(mlp="relu"),
    "gqa": dict(n_kv_heads=2),
    "mqa": dict(n_kv_heads=1),
    "window": dict(sliding_window=3),
    "moe": dict(n_experts=4, experts_per_token=2),
    "llama": dict(pos="rope", norm="rmsnorm", mlp="swiglu", n_kv_heads=2, bias=False,
                  tie_weights=False),
    "mixtral": dict(pos="rope", norm="rmsnorm", mlp="swiglu", n_kv_heads=1, bias=False,
                    tie_weights=False, sliding_window=4, n_experts=3, experts_per_token=2),
}


def make_model(variant, device="cpu", dtype="float64", **overrides):
    cfg = GPTConfig(**{**BASE, **VARIANTS[variant], **overrides})
    model = GPT(cfg, seed=0, device=device, dtype=dtype)
    # GPT-2's init gives nearly flat attention and logits; move the weights well
    # away from it so that any difference between two paths would show
    randomize_params(model, np.random.default_rng(1), scale=0.5)
    return model.eval()


def close(a, b, rtol=RTOL):
    a, b = to_numpy(a), to_numpy(b)
    np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * np.abs(b).max())


# ---------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, match", [
    (dict(pos="alibi"), r"GPTConfig.pos must be one of .*'rope'.*got 'alibi'"),
    (dict(norm="batchnorm"), r"GPTConfig.norm must be one of .*'rmsnorm'"),
    (dict(norm_placement="middle"), r"GPTConfig.norm_placement must be one of"),
    (dict(mlp="geglu"), r"GPTConfig.mlp must be one of .*'swiglu'"),
    (dict(n_kv_heads=3), r"n_heads \(4\) must be a multiple of GPTConfig.n_kv_heads \(3\)"),
    (dict(n_kv_heads=0), r"GPTConfig.n_kv_heads must be >= 1, got 0"),
    (dict(sliding_window=0), r"GPTConfig.sliding_window must be >= 1, got 0"),
    (dict(n_experts=2, experts_per_token=3),
     r"experts_per_token \(3\) must be <= .*n_experts \(2\)"),
    (dict(moe_aux_loss_coef=-1.0), r"moe_aux_loss_coef must be a number >= 0"),
    (dict(rope_theta=0.0), r"GPTConfig.rope_theta must be a number > 0"),
    (dict(pos="rope", d_model=12, n_heads=4), r"even head size.*= 3"),
    (dict(pos="sinusoidal", d_model=15, n_heads=3), r"even d_model, got 15"),
])
def test_config_errors_name_the_field_and_the_valid_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GPTConfig(**{**BASE, **kwargs})


def test_config_type_errors():
    with pytest.raises(TypeError, match="GPTConfig.n_kv_heads must be an int or None"):
        GPTConfig(**BASE, n_kv_heads=2.0)
    with pytest.raises(TypeError, match="GPTConfig.n_experts must be an int"):
        GPTConfig(**BASE, n_experts=True)


def test_defaults_are_gpt2_and_old_config_dicts_still_load():
    cfg = GPTConfig(**BASE)
    assert (cfg.pos, cfg.norm, cfg.norm_placement, cfg.mlp) == ("learned", "layernorm", "pre",
                                                                 "gelu")
    assert cfg.kv_heads == cfg.n_heads and cfg.sliding_window is None and cfg.n_experts == 0
    # a config.json written before the variants existed has none of their keys
    assert GPTConfig.from_dict({**BASE, "dropout": 0.0, "bias": True, "tie_weights": True}) == cfg
    llama = GPTConfig(**BASE, **VARIANTS["llama"])
    assert GPTConfig.from_dict(llama.to_dict()) == llama


def test_checkpoint_round_trip_keeps_the_variant(tmp_path):
    from tinylm import checkpoint

    model = make_model("mixtral", dtype="float32")
    checkpoint.save(tmp_path / "ckpt", model)
    loaded = checkpoint.load(tmp_path / "ckpt").model.eval()
    assert loaded.config == model.config
    ids = np.random.default_rng(0).integers(0, 29, size=(2, 12))
    np.testing.assert_array_equal(to_numpy(loaded.forward(ids)), to_numpy(model.forward(ids)))


def test_llama_state_dict_names_and_shapes():
    model = make_model("llama")
    C, H, Hkv, hs = 16, 4, 2, 4
    hidden = 48  # swiglu_hidden(16): 8 * 16 / 3 = 42.7, rounded up to a multiple of 8
    shapes = {name: p.shape for name, p, _ in model.parameters()}
    expected = {"tok_emb.weight": (29, C), "ln_f.weight": (C,), "head.weight": (C, 29)}
    for i in range(2):
        expected.update({
            f"blocks.{i}.ln1.weight": (C,),
            f"blocks.{i}.attn.qkv.weight": (C, (H + 2 * Hkv) * hs),  # [q | k | v]
            f"blocks.{i}.attn.proj.weight": (C, C),
            f"blocks.{i}.ln2.weight": (C,),
            f"blocks.{i}.mlp.gate.weight": (C, hidden),
            f"blocks.{i}.mlp.up.weight": (C, hidden),
            f"blocks.{i}.mlp.down.weight": (hidden, C),
        })
    assert shapes == expected  # no pos_emb, no biases, RMSNorm has only a weight


def test_moe_state_dict_names():
    names = [name for name, _, _ in make_model("moe").parameters()]
    assert "blocks.0.mlp.router.weight" in names and "blocks.0.mlp.router.bias" not in names
    assert {n.split(".")[4] for n in names if ".experts." in n} == {"0", "1", "2", "3"}
    assert "blocks.1.mlp.experts.3.proj.weight" in names


def test_residual_projections_get_the_scaled_init():
    model = GPT(GPTConfig(**{**BASE, **VARIANTS["mixtral"], "n_layers": 8, "d_model": 64}), seed=0)
    std = {name: float(np.std(to_numpy(p))) for name, p, _ in model.parameters()}
    scaled = 0.02 / np.sqrt(2 * 8)
    assert std["blocks.0.mlp.experts.0.down.weight"] == pytest.approx(scaled, rel=0.1)
    assert std["blocks.0.attn.proj.weight"] == pytest.approx(scaled, rel=0.1)
    assert std["blocks.0.mlp.router.weight"] == pytest.approx(0.02, rel=0.1)
    assert std["blocks.0.mlp.experts.0.gate.weight"] == pytest.approx(0.02, rel=0.1)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_combination_passes_the_model_gradcheck(preset):
    """The presets' switches on a model small enough for a float64 check of every weight."""
    switches = {name: getattr(PRESETS[preset], name) for name in MODEL_VARIANT_FIELDS}
    if switches["mlp_hidden"] is not None:
        switches["mlp_hidden"] = 6
    if switches["sliding_window"] is not None:
        switches["sliding_window"] = 3
    cfg = PRESETS[preset].gpt_config(vocab_size=11)
    cfg = dataclasses.replace(cfg, context_length=6, d_model=8, n_layers=2, n_heads=4,
                              **{**switches, "n_kv_heads": switches["n_kv_heads"] and 2})
    model = GPT(cfg, seed=0, dtype="float64")
    rng = np.random.default_rng(2)
    randomize_params(model, rng, scale=0.2)
    idx, targets = rng.integers(0, 11, (2, 6)), rng.integers(0, 11, (2, 6))
    results = check_model(model, idx, targets, SoftmaxCrossEntropy(label_smoothing=0.1))
    failed = [(r.name, r.max_rel_error) for r in results if not r.passed]
    assert not failed, f"{preset}: {failed}"


# ---------------------------------------------------------------------------
# RoPE
# ---------------------------------------------------------------------------


def test_rope_scores_depend_only_on_the_offset_and_norms_are_kept():
    rope = RotaryEmbedding(8, 64, theta=100.0).to(dtype="float64")
    rng = np.random.default_rng(0)
    q, k = rng.standard_normal(8), rng.standard_normal(8)

    def at(x, t):
        table = np.zeros((t + 1, 8))
        table[t] = x
        return rope.rotate(table)[t]  # x rotated as if at position t

    for t, s in ((5, 2), (9, 9), (3, 7)):
        score = at(q, t) @ at(k, s)
        assert score == pytest.approx(at(q, t + 20) @ at(k, s + 20), rel=1e-12)
    assert np.linalg.norm(at(q, 13)) == pytest.approx(np.linalg.norm(q), rel=1e-12)
    assert abs(at(q, 5) @ at(k, 2) - at(q, 5) @ at(k, 3)) > 1e-3  # the offset does matter
    x = rng.standard_normal((2, 3, 10, 8))
    np.testing.assert_allclose(rope.rotate(rope.rotate(x, 4), 4, inverse=True), x, atol=1e-12)
    np.testing.assert_array_equal(rope.rotate(x[:, :, :1], 0), x[:, :, :1])  # position 0: identity


def test_rope_tables_grow_on_demand_and_stop_at_max_positions():
    from tinylm.nn.positions import apply_rope, rope_angles

    rope = RotaryEmbedding(8, 100_000).to(dtype="float64")
    assert rope.cos.shape == (2048, 8)  # not 100,000 rows per layer up front
    x = np.random.default_rng(0).standard_normal((1, 2, 3, 8))
    angles = rope_angles(5003, 8)[5000:]  # (3, hs) at positions 5000..5002
    np.testing.assert_allclose(rope.rotate(x, 5000), apply_rope(x, np.cos(angles),
                                                                np.sin(angles)), atol=1e-12)
    assert len(rope.cos) >= 5003
    with pytest.raises(ValueError, match="cover 100000 positions"):
        rope.rotate(x, 99_998)


def test_rope_pairs_channel_i_with_i_plus_half():
    """The "rotate half" layout of Hugging Face Llama: channels j and j + hs/2 turn
    together by angle t * theta^(-2j/hs)."""
    rope = RotaryEmbedding(4, 8, theta=10000.0).to(dtype="float64")
    x = np.zeros((1, 1, 4, 4))
    x[0, 0, 3, 0] = 1.0  # a unit vector in channel 0 at position 3
    y = rope.rotate(x)[0, 0, 3]
    np.testing.assert_allclose(y, [np.cos(3.0), 0.0, np.sin(3.0), 0.0], atol=1e-15)


# ---------------------------------------------------------------------------
# Grouped-query attention and sliding windows
# ---------------------------------------------------------------------------


def test_gqa_is_multi_head_attention_with_shared_keys_and_values(device):
    """Query head h uses kv head h // G: copy each kv head's weights to its G query
    heads and plain multi-head attention must give the same output."""
    xp = get_xp(device)
    C, H, Hkv, hs = 12, 6, 2, 2
    G = H // Hkv
    gqa = CausalSelfAttention(C, H, n_kv_heads=Hkv, rope_theta=50.0, max_positions=8)
    gqa.to(device, "float64")
    randomize_params(gqa, np.random.default_rng(0))
    mha = CausalSelfAttention(C, H, rope_theta=50.0, max_positions=8).to(device, "float64")
    W = to_numpy(gqa.qkv.params["weight"])  # (C, (H + 2 Hkv) hs)
    b = to_numpy(gqa.qkv.params["bias"])
    q_cols = np.arange(H * hs)
    kv_head = np.arange(H) // G  # the kv head of each query head
    k_cols = (H * hs + kv_head[:, None] * hs + np.arange(hs)).ravel()
    v_cols = k_cols + Hkv * hs
    cols = np.concatenate([q_cols, k_cols, v_cols])  # (3 C,)
    mha.qkv.params["weight"][...] = to_device(W[:, cols], xp)
    mha.qkv.params["bias"][...] = to_device(b[cols], xp)
    for name in ("weight", "bias"):
        mha.proj.params[name][...] = gqa.proj.params[name]
    x = to_device(np.random.default_rng(1).standard_normal((2, 7, C)), xp)
    close(gqa.forward(x), mha.forward(x))
    close(gqa.attention_weights, mha.attention_weights)


def test_sliding_window_sees_only_the_last_w_positions(device):
    xp = get_xp(device)
    W, T = 3, 8
    attn = CausalSelfAttention(8, 2, sliding_window=W).to(device, "float64")
    randomize_params(attn, np.random.default_rng(0))
    x = to_device(np.random.default_rng(1).standard_normal((2, T, 8)), xp)
    y = to_numpy(attn.forward(x))
    att = to_numpy(attn.attention_weights)  # (B, H, T, T)
    i, j = np.indices((T, T))
    assert np.all(att[..., (j > i) | (i - j >= W)] == 0.0)
    assert np.all(att[..., (j <= i) & (i - j < W)] > 0.0)
    # forward: changing position 2 changes outputs 2..4 only (positions 2 + W-1 and before)
    x2 = x.copy()
    x2[:, 2] += 1.0
    y2 = to_numpy(attn.forward(x2))
    np.testing.assert_array_equal(y2[:, :2], y[:, :2])
    np.testing.assert_array_equal(y2[:, 2 + W:], y[:, 2 + W:])
    assert np.abs(y2[:, 2:2 + W] - y[:, 2:2 + W]).min(axis=-1).max() > 1e-6
    # backward: a gradient on output 6 reaches inputs 4..6 only
    attn.forward(x)
    dout = np.zeros((2, T, 8))
    dout[:, 6] = 1.0
    dx = to_numpy(attn.backward(to_device(dout, xp)))
    assert np.all(dx[:, :6 - W + 1] == 0.0) and np.all(dx[:, 7:] == 0.0)
    assert np.abs(dx[:, 4:7]).sum(axis=-1).min() > 0


def test_attention_mask_band():
    M = attention_mask(np.arange(5), np.arange(5), 2, np, np.float64)
    visible = (M == 0).astype(int)
    np.testing.assert_array_equal(visible, [[1, 0, 0, 0, 0],
                                            [1, 1, 0, 0, 0],
                                            [0, 1, 1, 0, 0],
                                            [0, 0, 1, 1, 0],
                                            [0, 0, 0, 1, 1]])
    assert np.all(M[visible == 0] == -np.inf)
    # in true positions, for a cached chunk: queries 6, 7 over keys 4..7
    M = attention_mask(np.arange(6, 8), np.arange(4, 8), 3, np, np.float64)
    np.testing.assert_array_equal((M == 0).astype(int), [[1, 1, 1, 0], [0, 1, 1, 1]])


# ---------------------------------------------------------------------------
# The KV cache for every variant
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_cached_and_uncached_logits_agree(variant, device):
    """Prefill a chunk, then a second chunk at pos > 0, then single tokens up to the
    context length: every step's logits equal the full forward's rows."""
    model = make_model(variant, device)
    L = model.config.context_length
    ids = np.random.default_rng(3).integers(0, 29, size=(2, L))
    full = to_numpy(model.forward(ids))  # (B, L, V)
    cache = KVCache.for_model(model, batch_size=2)
    close(model.forward_cached(ids[:, :4], cache, all_logits=True), full[:, :4])
    close(model.forward_cached(ids[:, 4:7], cache, all_logits=True), full[:, 4:7])
    for t in range(7, L):
        close(model.forward_cached(ids[:, t:t + 1], cache), full[:, t])
    assert cache.pos == L


@pytest.mark.parametrize("variant", ["mixtral", "window", "llama"])
def test_generation_with_and_without_cache_beyond_the_window_and_context(variant, device):
    model = make_model(variant, device)
    prompt = np.random.default_rng(4).integers(0, 29, size=(2, 3))
    n = 2 * model.config.context_length  # past the window and past the context
    with_cache = generate(model, prompt, n, temperature=0.0, use_cache=True)
    without = generate(model, prompt, n, temperature=0.0, use_cache=False)
    np.testing.assert_array_equal(with_cache, without)


@pytest.mark.parametrize("variant, kv_heads, slots", [
    ("gpt2", 4, 12), ("gqa", 2, 12), ("mqa", 1, 12), ("window", 4, 3), ("mixtral", 1, 4)])
def test_cache_memory_follows_the_formula(variant, kv_heads, slots):
    model = make_model(variant, dtype="float32")
    cache = KVCache.for_model(model, batch_size=5)
    hs, layers = model.config.head_size, model.config.n_layers
    assert cache.k[0].shape == (5, kv_heads, slots, hs) and cache.slots == slots
    # 2 (k and v) x layers x kv_heads x head_dim x tokens x bytes, for each of B sequences
    assert cache.nbytes() == 2 * layers * kv_heads * hs * slots * 4 * 5


def test_window_cache_holds_the_last_positions_in_order():
    model = make_model("window")  # W = 3
    cache = KVCache.for_model(model, batch_size=1)
    ids = np.random.default_rng(5).integers(0, 29, size=(1, 8))
    model.forward_cached(ids[:, :5], cache)  # a prefill longer than the window
    model.forward_cached(ids[:, 5:6], cache)
    assert cache.pos == 6 and cache.held == 3
    # the buffers hold positions 3, 4, 5: compare with a fresh prefill of those keys
    ref = KVCache(2, 1, 4, 12, 4, xp=np, dtype=np.float64)  # no window: every position
    model.forward_cached(ids[:, :6], ref)
    close(cache.k[1], ref.k[1][:, :, 3:6])
    close(cache.v[0], ref.v[0][:, :, 3:6])


# ---------------------------------------------------------------------------
# Mixture of experts
# ---------------------------------------------------------------------------


def test_moe_output_and_aux_loss_from_their_definitions(device):
    """Recompute the MoE by hand: softmax router, top-k, renormalised weights, the
    chosen experts' outputs; and the Switch load-balancing loss."""
    xp = get_xp(device)
    E, k, coef = 5, 2, 0.3
    moe = MoE(6, E, k, kind="swiglu", hidden=10, aux_loss_coef=coef).to(device, "float64")
    randomize_params(moe, np.random.default_rng(0), scale=0.5)
    x_host = np.random.default_rng(1).standard_normal((3, 4, 6))
    y = to_numpy(moe.forward(to_device(x_host, xp))).reshape(-1, 6)
    x = x_host.reshape(-1, 6)  # (N, C)
    r = x @ to_numpy(moe.router.params["weight"])  # (N, E)
    p = np.exp(r - r.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    expected = np.zeros_like(x)
    counts = np.zeros(E)
    for n in range(len(x)):
        chosen = np.argsort(-p[n])[:k]
        np.testing.assert_array_equal(to_numpy(moe.choices[n]), chosen)  # best first
        counts[chosen] += 1
        for e in chosen:
            out = to_numpy(moe.experts[e].forward(to_device(x[n:n + 1], xp)))[0]
            expected[n] += p[n, e] / p[n, chosen].sum() * out
    np.testing.assert_allclose(y, expected, rtol=1e-12, atol=1e-14)
    aux = coef * E * np.sum(counts / len(x) * p.mean(axis=0))
    assert moe.aux_loss == pytest.approx(aux, rel=1e-12)


def test_moe_uniform_router_aux_loss_is_coef_times_k():
    """A zero router gives p = 1/E everywhere: aux = coef * E * sum_e f_e / E = coef * k."""
    moe = MoE(4, 4, 3, aux_loss_coef=0.5).to(dtype="float64")
    moe.router.params["weight"][...] = 0.0
    moe.forward(np.random.default_rng(0).standard_normal((2, 5, 4)))
    assert moe.aux_loss == pytest.approx(0.5 * 3)


def test_moe_unused_experts_get_no_gradient_and_top1_router_learns_from_aux_only():
    moe = MoE(4, 3, 1, aux_loss_coef=0.0).to(dtype="float64")
    moe.router.params["weight"][...] = 0.0
    moe.router.params["weight"][:, 2] = -10.0
    moe.router.params["weight"][0, 0] = 5.0  # positive inputs: expert 0 always wins
    x = np.abs(np.random.default_rng(0).standard_normal((2, 3, 4)))
    results = check_layer(moe, x)
    assert all(r.passed for r in results)
    for e in (1, 2):  # never chosen: never run, no gradient
        assert not np.any(moe.experts[e].fc.grads["weight"])
    assert np.any(moe.experts[0].fc.grads["weight"])
    # top-1 with renormalised weights: w = p / p = 1, so without the aux loss the
    # router gets no gradient at all (Mixtral's k = 2 and the aux loss avoid this)
    assert not np.any(moe.router.grads["weight"])


def test_model_aux_loss_sums_the_blocks_and_daux_scales_its_gradient():
    model = make_model("moe").train()
    rng = np.random.default_rng(6)
    idx, targets = rng.integers(0, 29, (2, 12)), rng.integers(0, 29, (2, 12))
    loss_fn = SoftmaxCrossEntropy()
    grads = {}
    for daux in (0.0, 1.0, 2.0):
        model.zero_grad()
        loss_fn.forward(model.forward(idx), targets)
        model.backward(loss_fn.backward(), daux=daux)
        grads[daux] = to_numpy(model.blocks[0].mlp.router.grads["weight"]).copy()
    assert model.aux_loss == pytest.approx(sum(b.mlp.aux_loss for b in model.blocks))
    assert model.aux_loss > 0
    # the aux part of the router gradient is linear in daux, and not negligible
    np.testing.assert_allclose(grads[2.0] - grads[1.0], grads[1.0] - grads[0.0], atol=1e-12)
    assert np.abs(grads[1.0] - grads[0.0]).max() > 1e-4 * np.abs(grads[0.0]).max()


# ---------------------------------------------------------------------------
# Post-norm
# ---------------------------------------------------------------------------


def test_post_norm_block_outputs_are_normalised():
    model = make_model("rmsnorm-post")
    for block in model.blocks:
        block.ln2.params["weight"][...] = 1.0
    x = np.random.default_rng(0).standard_normal((2, 5, 16)) * 7.0
    y = model.blocks[0].forward(x)
    rms = np.sqrt((y * y).mean(axis=-1))
    np.testing.assert_allclose(rms, 1.0, rtol=1e-4)  # the block ends with its RMSNorm
    pre = make_model("gpt2").blocks[0].forward(x)
    assert np.abs(np.sqrt((pre * pre).mean(axis=-1)) - 1.0).max() > 1.0  # pre-norm does not
