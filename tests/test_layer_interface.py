"""The one layer interface: one masking path, one cache name, `to`, auxiliary losses."""

from __future__ import annotations

import numpy as np
import pytest

from tinylm import GPT, GPTConfig
from tinylm.backend import to_device, to_numpy
from tinylm.nn import CausalSelfAttention, KVCache, Linear, MoE
from tinylm.nn.attention import attend, attention_mask


def no_mask(q_pos, k_pos, xp, dtype):
    return xp.zeros((len(q_pos), len(k_pos)), dtype=dtype)  # every key visible


def small_model(device="cpu", n_layers=2, **kw):
    cfg = GPTConfig(vocab_size=11, context_length=8, d_model=8, n_layers=n_layers, n_heads=2,
                    **kw)
    return GPT(cfg, seed=0, device=device, dtype="float64")


def test_overriding_mask_changes_forward_and_forward_cached(device):
    """`mask` is the one override point: both paths see the change, and agree."""
    model = small_model(device, n_layers=1).eval()
    idx = to_device(np.array([[1, 2, 3, 4, 5]]), model.xp)
    causal = to_numpy(model.forward(idx))
    for block in model.blocks:
        block.attn.mask = no_mask  # DEMO: position t may now look at t+1..T-1
    unmasked = to_numpy(model.forward(idx))
    # (one layer) the last position sees everything either way; earlier ones now see the future
    np.testing.assert_allclose(unmasked[:, -1], causal[:, -1], atol=1e-12)
    assert np.abs(unmasked[:, :-1] - causal[:, :-1]).max() > 1e-3
    # the cached path uses the same mask: a prefill of the whole prompt gives the same rows
    cache = KVCache.for_model(model, 1)
    cached = to_numpy(model.forward_cached(idx, cache, all_logits=True))
    np.testing.assert_allclose(cached, unmasked, atol=1e-12)


def test_unmasked_attention_weights_have_a_future(device):
    attn = CausalSelfAttention(8, 2).to(device, "float64")
    x = to_device(np.random.default_rng(0).standard_normal((1, 4, 8)), attn.xp)
    future = np.triu_indices(4, k=1)  # (query, key) pairs with key > query
    attn.forward(x)
    assert np.all(to_numpy(attn.attention_weights)[0, 0][future] == 0)
    attn.mask = no_mask
    attn.forward(x)
    assert np.all(to_numpy(attn.attention_weights)[0, 0][future] > 0)


def test_attend_matches_the_formula_per_head():
    """attend(q, k^T, v, mask) = softmax(q k^T / sqrt(hs) + mask) v, for G stacked heads."""
    rng = np.random.default_rng(1)
    B, Hkv, G, T, hs = 2, 2, 3, 5, 4
    q = rng.standard_normal((B, Hkv, G * T, hs))
    k = rng.standard_normal((B, Hkv, T, hs))
    v = rng.standard_normal((B, Hkv, T, hs))
    mask = attention_mask(np.arange(T), np.arange(T), 3, np, np.float64)
    y, att, _ = attend(q, k.swapaxes(-1, -2).copy(), v, mask)
    for g in range(G):
        rows = slice(g * T, (g + 1) * T)
        s = q[:, :, rows] @ k.swapaxes(-1, -2) / np.sqrt(hs) + mask  # (B, Hkv, T, T)
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        np.testing.assert_allclose(att[:, :, rows], p, atol=1e-14)
        np.testing.assert_allclose(y[:, :, rows], p @ v, atol=1e-14)


def test_every_backward_cache_is_dropped_by_one_call():
    model = small_model(n_experts=2, experts_per_token=1).train()
    model.forward(np.array([[1, 2, 3]]))
    kept = [model, model.tok_emb, model.ln_f, model.blocks[0].attn, model.blocks[1].mlp]
    assert all(m._cache is not None for m in kept)
    model.clear_backward_caches()
    assert all(m._cache is None for m in model.modules())  # ...and all gone
    with pytest.raises(RuntimeError, match="without a matching forward"):
        model.backward(np.zeros((1, 3, 11)))


def test_to_moves_parameters_grads_and_buffers(device):
    layer = Linear(3, 2).to(device, "float64")
    for store in (layer.params, layer.grads):
        assert all(a.dtype == np.float64 for a in store.values())
    model = GPT(GPTConfig(vocab_size=5, context_length=4, d_model=4, n_layers=1, n_heads=1,
                          pos="sinusoidal"), dtype="float32").to(device, "float64")
    assert model.buffers["pos_table"].dtype == np.float64
    assert all(p.dtype == np.float64 and m.dtype == np.float64
               for m in model.modules() for p in m.params.values())
    assert model.forward(np.array([[1, 2]])).dtype == np.float64


def test_gpt_weights_do_not_depend_on_device_or_dtype(device):
    a = small_model("cpu").state_dict()
    b = small_model(device).state_dict()
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_aux_layers_are_found_and_daux_scales_their_gradient():
    model = small_model(n_experts=3, experts_per_token=2, moe_aux_loss_coef=0.5)
    assert [type(m) for m in model.aux_layers()] == [MoE, MoE]
    idx = np.array([[1, 2, 3, 4]])
    grads = {}
    for daux in (0.0, 1.0, 2.0):
        model.zero_grad()
        logits = model.forward(idx)
        model.backward(np.zeros_like(logits), daux=daux)  # the aux loss alone
        grads[daux] = {n: g.copy() for n, _, g in model.parameters() if "router" in n}
    for name in grads[1.0]:
        assert np.all(grads[0.0][name] == 0)
        np.testing.assert_allclose(grads[2.0][name], 2 * grads[1.0][name], rtol=1e-12)
    assert np.abs(grads[1.0][name]).max() > 0
