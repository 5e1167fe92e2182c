"""Flash attention (tinylm/nn/flash.py, attention="flash"): the same numbers as the
standard path, in tiles, with O(T) memory.

Exactness is checked in float64, where the two paths differ only by rounding
(the online softmax adds the same terms in another order and rescales them), so
a wrong tile, a missed rescale or a skipped tile that was visible shows up far
above the tolerance.
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from tinylm.backend import get_xp, to_device, to_numpy
from tinylm.gradcheck import randomize_params
from tinylm.nn import Block, CausalSelfAttention, KVCache
from tinylm.nn import flash as flash_module
from tinylm.nn.attention import attend
from tinylm.nn.flash import FULL, PART, SKIP, flash_backward, flash_forward, tile_grid

TOL = 1e-12

# (T, block_q, block_k, layer keywords): T not a multiple of the tiles, tiles of 1,
# tiles larger than T, GQA, MQA, windows narrower and wider than a tile, RoPE
CASES = {
    "mha-13-4x5": (13, 4, 5, {}),
    "gqa-window-13-4x5": (13, 4, 5, dict(n_kv_heads=2, sliding_window=3)),
    "mqa-window-rope-13-3x2": (13, 3, 2, dict(n_kv_heads=1, sliding_window=2, rope_theta=100.0,
                                             max_positions=16)),
    "gqa-rope-11-1x1": (11, 1, 1, dict(n_kv_heads=2, rope_theta=100.0, max_positions=16)),
    "mha-9-tiles-larger-than-T": (9, 64, 32, {}),
    "gqa-window-wide-17-4x4": (17, 4, 4, dict(n_kv_heads=2, sliding_window=9)),
    "rope-window-16-8x4": (16, 8, 4, dict(sliding_window=5, rope_theta=10.0, max_positions=16)),
}


def close(a, b, tol=TOL):
    a, b = to_numpy(a), to_numpy(b)
    assert a.shape == b.shape
    err = np.abs(a - b).max() / max(np.abs(b).max(), 1e-300)
    assert err <= tol, f"relative difference {err:.2e} > {tol:.0e}"
    return err


def layer_pair(device="cpu", dtype="float64", C=16, H=4, block_q=4, block_k=4, **kw):
    """A standard and a flash layer with the same (randomised) weights."""
    layers = []
    for attention, blocks in (("standard", {}), ("flash", dict(block_q=block_q,
                                                                 block_k=block_k))):
        layer = CausalSelfAttention(C, H, attention=attention, rng=0, **blocks, **kw)
        layer.to(device=device, dtype=dtype)
        # away from the nearly uniform initial attention, so that errors would show
        randomize_params(layer, np.random.default_rng(1), scale=0.5)
        layers.append(layer)
    return layers


def forward_backward(layer, x, G):
    layer.zero_grad()
    y = layer.forward(x)
    dx = layer.backward(G)
    return y, dx, {name: g.copy() for name, _, g in layer.parameters()}


@pytest.mark.parametrize("case", CASES)
def test_flash_layer_equals_standard_outputs_and_every_gradient(case, device):
    T, block_q, block_k, kw = CASES[case]
    standard, flash = layer_pair(device, block_q=block_q, block_k=block_k, **kw)
    xp = get_xp(device)
    rng = np.random.default_rng(2)
    x = to_device(rng.standard_normal((2, T, 16)), xp)  # (B, T, C)
    G = to_device(rng.standard_normal((2, T, 16)), xp)  # (B, T, C)
    y_s, dx_s, g_s = forward_backward(standard, x, G)
    y_f, dx_f, g_f = forward_backward(flash, x, G)
    close(y_f, y_s)
    close(dx_f, dx_s)
    assert g_f.keys() == g_s.keys()  # the same parameter names: one checkpoint, either path
    for name in g_s:
        close(g_f[name], g_s[name])


def test_flash_functions_equal_attend_with_offsets_and_give_the_log_sum_exp(device):
    """flash_forward/backward directly, against `attend` and its backward written out,
    for queries and keys at shifted true positions (as the KV cache uses them)."""
    xp = get_xp(device)
    rng = np.random.default_rng(0)
    B, Hkv, G, Tq, Tk, hs, pos, first = 2, 2, 3, 7, 12, 4, 9, 4  # queries 9..15, keys 4..15
    q = rng.standard_normal((B, Hkv, G, Tq, hs)) * 2  # (B, Hkv, G, Tq, hs)
    k = rng.standard_normal((B, Hkv, Tk, hs)) * 2  # (B, Hkv, Tk, hs)
    v = rng.standard_normal((B, Hkv, Tk, hs))  # (B, Hkv, Tk, hs)
    do = rng.standard_normal((B, Hkv, G, Tq, hs))  # (B, Hkv, G, Tq, hs)
    layer = CausalSelfAttention(8, 2, sliding_window=6)
    q_pos, k_pos = np.arange(pos, pos + Tq), np.arange(first, first + Tk)

    # the reference on the host: attend, then the softmax backward of section 8
    mask = layer.mask(q_pos, k_pos, np, np.float64)  # (Tq, Tk)
    qs = q.reshape(B, Hkv, G * Tq, hs)
    y, att, _ = attend(qs, k.swapaxes(-1, -2), v, mask)  # (B, Hkv, G*Tq, hs)
    dys = do.reshape(B, Hkv, G * Tq, hs)
    datt = dys @ v.swapaxes(-1, -2)
    ds = att * (datt - (datt * att).sum(-1, keepdims=True)) / np.sqrt(hs)
    dq_ref, dk_ref, dv_ref = ds @ k, ds.swapaxes(-1, -2) @ qs, att.swapaxes(-1, -2) @ dys
    scores = (q @ k[:, :, None].swapaxes(-1, -2)) / np.sqrt(hs) + mask  # (B, Hkv, G, Tq, Tk)
    top = scores.max(-1, keepdims=True)
    lse_ref = (top + np.log(np.exp(scores - top).sum(-1, keepdims=True)))[..., 0]

    dev = [to_device(a, xp) for a in (q, k, v, do)]
    kw = dict(q_start=pos, k_start=first, block_q=3, block_k=5, window=6)
    o, lse = flash_forward(*dev[:3], layer.mask, **kw)
    dq, dk, dv = flash_backward(*dev[:3], o, lse, dev[3], layer.mask, **kw)
    close(o, y.reshape(o.shape))
    close(lse, lse_ref.reshape(lse.shape))
    close(dq, dq_ref.reshape(dq.shape))
    close(dk, dk_ref)
    close(dv, dv_ref)


def test_tiles_above_the_diagonal_and_outside_the_band_are_skipped(monkeypatch):
    """The grid for T = 10 in tiles of 4 (3 x 3, the last row and column partial), and
    the scores are computed exactly for the visited tiles, forward and backward."""
    causal = tile_grid(10, 10, 4, 4)
    assert causal.tolist() == [[PART, SKIP, SKIP], [FULL, PART, SKIP], [FULL, FULL, PART]]
    banded = tile_grid(10, 10, 4, 4, window=3)
    # queries 8..9 with window 3 see keys 6..9: tile (2, 0), keys 0..3, is skipped
    assert banded.tolist() == [[PART, SKIP, SKIP], [PART, PART, SKIP], [SKIP, PART, PART]]
    everything = tile_grid(10, 10, 4, 4, window=3, causal_tiles=False)
    assert (everything == PART).all()

    calls = []
    real = flash_module._scores

    def counting(q_i, kT_j, scale, mask, kind, G, q_lo, q_hi, k_lo, k_hi):
        calls.append((q_lo // 4, k_lo // 4, kind))
        return real(q_i, kT_j, scale, mask, kind, G, q_lo, q_hi, k_lo, k_hi)

    monkeypatch.setattr(flash_module, "_scores", counting)
    layer = CausalSelfAttention(8, 2, sliding_window=3, attention="flash", block_q=4,
                                block_k=4).to(dtype="float64")
    x = np.random.default_rng(0).standard_normal((1, 10, 8))
    layer.backward(layer.forward(x))
    visited = sorted({(i, j) for i, j, _ in calls})
    assert visited == sorted(zip(*np.nonzero(banded != SKIP), strict=True))
    assert len(calls) == 2 * len(visited)  # once in forward, once in backward
    assert all(kind == banded[i, j] for i, j, kind in calls)  # FULL tiles go unmasked


def test_a_replaced_mask_visits_every_tile_and_still_equals_standard(monkeypatch):
    """Skipping is only valid for the built-in causal mask. A mask that shows the future
    (assigned to the instance, or a subclass's method) makes flash visit every tile."""
    calls = []
    real = flash_module._scores
    monkeypatch.setattr(flash_module, "_scores",
                        lambda *a: calls.append(a[4]) or real(*a))

    def no_mask(q_pos, k_pos, xp, dtype):  # every key visible: bidirectional attention
        return to_device(np.zeros((len(q_pos), len(k_pos)), dtype=dtype), xp)

    class Bidirectional(CausalSelfAttention):
        def mask(self, q_pos, k_pos, xp, dtype):
            return no_mask(q_pos, k_pos, xp, dtype)

    rng = np.random.default_rng(0)
    x, G = rng.standard_normal((2, 10, 16)), rng.standard_normal((2, 10, 16))
    standard, flash = layer_pair(block_q=4, block_k=3, n_kv_heads=2)
    standard.mask = flash.mask = no_mask
    sub = Bidirectional(16, 4, n_kv_heads=2, attention="flash", block_q=4, block_k=3, rng=0)
    sub.to(dtype="float64")
    randomize_params(sub, np.random.default_rng(1), scale=0.5)
    y_s, dx_s, g_s = forward_backward(standard, x, G)
    for layer in (flash, sub):
        calls.clear()
        y_f, dx_f, g_f = forward_backward(layer, x, G)
        assert len(calls) == 2 * 3 * 4 and set(calls) == {PART}  # all 3 x 4 tiles, masked
        close(y_f, y_s)
        close(dx_f, dx_s)
        for name in g_s:
            close(g_f[name], g_s[name])
    # and the future really is visible: output 0 depends on the last position
    causal = CausalSelfAttention(16, 4, n_kv_heads=2, attention="flash", block_q=4, block_k=3,
                                 rng=0).to(dtype="float64")
    randomize_params(causal, np.random.default_rng(1), scale=0.5)
    assert np.abs(to_numpy(y_f)[:, 0] - to_numpy(causal.forward(x))[:, 0]).max() > 1e-3


@pytest.mark.parametrize("kw", [dict(), dict(n_kv_heads=1, sliding_window=3,
                                              rope_theta=100.0, max_positions=16)])
def test_cached_flash_generation_equals_the_uncached_forward(kw, device):
    """Prefill of 5, then one position at a time, past the window (the cache keeps
    the last 3 keys only): every step equals the full forward's rows."""
    xp = get_xp(device)
    _, flash = layer_pair(device, block_q=2, block_k=2, **kw)
    flash.eval()
    T = 12
    x = to_device(np.random.default_rng(0).standard_normal((2, T, 16)), xp)  # (B, T, C)
    full = flash.forward(x)  # (B, T, C)
    flash.clear_backward_caches()
    cache = KVCache(1, 2, flash.n_kv_heads, T, flash.head_size, window=flash.sliding_window,
                    xp=xp, dtype=x.dtype)
    steps = [flash.forward_cached(x[:, :5], cache, 0, 0)]
    cache.pos = 5
    for p in range(5, T):
        steps.append(flash.forward_cached(x[:, p:p + 1], cache, 0, p))
        cache.pos = p + 1
    close(xp.concatenate(steps, axis=1), full)


def test_flash_errors():
    with pytest.raises(ValueError, match=r"attention='flash' does not support attention "
                                         r"dropout: dropout must be 0 \(got 0.1\)"):
        CausalSelfAttention(8, 2, attention="flash", dropout=0.1)
    with pytest.raises(ValueError, match=r"attention must be 'standard' or 'flash', got 'fast'"):
        CausalSelfAttention(8, 2, attention="fast")
    with pytest.raises(ValueError, match=r"block_k .* must be an int >= 1, got 0"):
        CausalSelfAttention(8, 2, attention="flash", block_k=0)
    with pytest.raises(ValueError, match="does not support attention dropout"):
        Block(8, 2, dropout=0.2, attention="flash")
    layer = CausalSelfAttention(8, 2, attention="flash")
    layer.forward(np.zeros((1, 3, 8), dtype=np.float32))
    with pytest.raises(RuntimeError, match="never forms the attention weights"):
        _ = layer.attention_weights
    assert "flash=128x128" in repr(layer)


def test_block_passes_the_option_through(device):
    xp = get_xp(device)
    blocks = [Block(16, 4, n_kv_heads=2, attention=a, block_q=3, block_k=3, rng=0)
              .to(device=device, dtype="float64") for a in ("standard", "flash")]
    assert blocks[1].attn.attention == "flash" and blocks[1].attn.block_q == 3
    x = to_device(np.random.default_rng(0).standard_normal((2, 7, 16)), xp)
    outs = [(b.forward(x), b.backward(x)) for b in blocks]
    close(outs[1][0], outs[0][0])
    close(outs[1][1], outs[0][1])


def test_float32_flash_is_close_to_standard():
    standard, flash = layer_pair(dtype="float32", block_q=16, block_k=16, n_kv_heads=2)
    rng = np.random.default_rng(0)
    x, G = (rng.standard_normal((2, 40, 16)).astype(np.float32) for _ in range(2))
    y_s, dx_s, _ = forward_backward(standard, x, G)
    y_f, dx_f, _ = forward_backward(flash, x, G)
    assert y_f.dtype == dx_f.dtype == np.float32
    close(y_f, y_s, tol=1e-5)
    close(dx_f, dx_s, tol=1e-5)


def test_flash_memory_grows_linearly_not_quadratically():
    """Peak memory of one forward + backward (tracemalloc, float32, C = 32): doubling T
    about doubles flash's peak; the standard path's (T, T) weights quadruple."""

    def peak(attention, T):
        layer = CausalSelfAttention(32, 2, attention=attention, block_q=32, block_k=32, rng=0)
        x = np.random.default_rng(0).standard_normal((1, T, 32)).astype(np.float32)
        tracemalloc.start()
        layer.backward(layer.forward(x))
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return peak

    flash_ratio = peak("flash", 1024) / peak("flash", 512)
    standard_ratio = peak("standard", 1024) / peak("standard", 512)
    assert flash_ratio < 2.3, flash_ratio
    assert standard_ratio > 3.0, standard_ratio
    assert peak("flash", 1024) * 5 < peak("standard", 1024)


# ---------------------------------------------------------------------------
# The public switch: GPTConfig(attention="flash"), `tinylm train --set attention=flash`
# ---------------------------------------------------------------------------

GPT_SHAPE = dict(vocab_size=29, context_length=12, d_model=16, n_layers=2, n_heads=4)


@pytest.mark.parametrize("switches", [{}, dict(pos="rope", rope_theta=100.0, norm="rmsnorm",
                                               mlp="swiglu", n_kv_heads=2, sliding_window=4,
                                               bias=False, tie_weights=False)],
                         ids=["gpt2", "llama-window"])
def test_whole_gpt_flash_equals_standard_logits_and_every_gradient(switches, device):
    from tinylm import GPT, GPTConfig
    from tinylm.nn import SoftmaxCrossEntropy

    rng = np.random.default_rng(0)
    idx = rng.integers(0, 29, (2, 11))
    targets = rng.integers(0, 29, (2, 11))
    runs = {}
    for attention in ("standard", "flash"):
        cfg = GPTConfig(**GPT_SHAPE, **switches, attention=attention)
        model = GPT(cfg, seed=0, device=device, dtype="float64")
        randomize_params(model, np.random.default_rng(1), scale=0.5)
        assert all(b.attn.attention == attention for b in model.blocks)
        loss_fn = SoftmaxCrossEntropy()
        logits = model.forward(to_device(idx, get_xp(device)))
        loss = loss_fn.forward(logits, to_device(targets, get_xp(device)))
        model.zero_grad()
        model.backward(loss_fn.backward())
        runs[attention] = (logits, loss, {n: g.copy() for n, _, g in model.parameters()})
    (logits_s, loss_s, grads_s), (logits_f, loss_f, grads_f) = runs["standard"], runs["flash"]
    close(logits_f, logits_s)
    assert abs(loss_f - loss_s) <= TOL * abs(loss_s)
    assert list(grads_f) == list(grads_s)  # the same names: a checkpoint loads into either
    for name in grads_s:
        close(grads_f[name], grads_s[name])


def test_one_checkpoint_runs_on_either_path(tmp_path):
    import dataclasses

    from tinylm import GPT, GPTConfig
    from tinylm.checkpoint import load, save

    model = GPT(GPTConfig(**GPT_SHAPE, n_kv_heads=2), seed=0, dtype="float64")
    randomize_params(model, np.random.default_rng(1), scale=0.5)
    save(tmp_path / "ckpt", model)
    loaded = load(tmp_path / "ckpt")
    assert loaded.config.attention == "standard"  # the default, also for older config.json
    flash = GPT(dataclasses.replace(loaded.config, attention="flash"), seed=1, dtype="float64")
    flash.load_state_dict(loaded.model.state_dict())
    idx = np.random.default_rng(2).integers(0, 29, (2, 12))
    close(flash.forward(idx), model.forward(idx))


def test_gpt_config_attention_field():
    from tinylm import GPTConfig
    from tinylm.config import VARIANT_FIELDS

    assert GPTConfig(**GPT_SHAPE).attention == "standard" and "attention" in VARIANT_FIELDS
    assert GPTConfig(**GPT_SHAPE, attention="flash").block_kwargs()["attention"] == "flash"
    with pytest.raises(ValueError, match=r"GPTConfig.attention must be one of "
                                         r"\('standard', 'flash'\), got 'fast'"):
        GPTConfig(**GPT_SHAPE, attention="fast")
    with pytest.raises(ValueError, match=r"GPTConfig.attention='flash' does not support "
                                         r"attention dropout: GPTConfig.dropout must be 0"):
        GPTConfig(**GPT_SHAPE, attention="flash", dropout=0.1)


def test_train_takes_attention_from_the_command_line():
    from tinylm.training.config import TrainConfig, parse_field_value

    value = parse_field_value("attention", "flash")
    config = TrainConfig().replace(attention=value)
    assert config.gpt_config(vocab_size=11).attention == "flash"
