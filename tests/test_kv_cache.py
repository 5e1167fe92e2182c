"""The KV cache: cached inference gives the logits of recomputing from scratch.

Everything in float64, where the two paths differ only by summation order
(~1e-16), so any real difference (a wrong position, a stale key, an off-by-one
in the mask) shows up far above the rtol of 1e-10.
"""

from __future__ import annotations

import numpy as np
import pytest

from tinylm import GPT, GPTConfig
from tinylm.backend import to_device, to_numpy, xp_of
from tinylm.nn import SoftmaxCrossEntropy
from tinylm.nn.kv_cache import KVCache
from tinylm.sampling import Decoder, generate

RTOL = 1e-10
CFG = GPTConfig(vocab_size=37, context_length=8, d_model=24, n_layers=2, n_heads=3)


def make_model(device="cpu", cfg=CFG, dtype="float64", seed=0):
    model = GPT(cfg, seed=seed, device=device, dtype=dtype)
    # GPT-2's init makes nearly uniform logits; scale the weights up so the
    # attention patterns and logits are far from flat and differences would show
    state = {k: v * (1.0 if ".ln" in k or k.startswith("ln_") else 8.0)
             for k, v in model.state_dict().items()}
    model.load_state_dict(state)
    return model.eval()


def tokens(B, T, seed=0, V=CFG.vocab_size):
    return np.random.default_rng(seed).integers(0, V, size=(B, T))


def close(a, b):
    a, b = to_numpy(a), to_numpy(b)
    np.testing.assert_allclose(a, b, rtol=RTOL, atol=RTOL * np.abs(b).max())


def test_prefill_gives_forward_logits_at_every_position(device):
    model = make_model(device)
    ids = tokens(3, CFG.context_length)
    cache = KVCache.for_model(model, batch_size=3)
    logits = model.forward_cached(ids, cache, all_logits=True)  # (B, T, V)
    assert xp_of(logits) is model.xp and cache.pos == CFG.context_length
    close(logits, model.forward(ids))


def test_decoding_one_token_at_a_time_and_in_chunks(device):
    model = make_model(device)
    ids = tokens(2, CFG.context_length, seed=1)
    full = to_numpy(model.forward(ids))  # (B, L, V)
    cache = KVCache.for_model(model, batch_size=2)
    close(model.forward_cached(ids[:, :3], cache), full[:, 2])  # prefill, last position
    close(model.forward_cached(ids[:, 3:6], cache, all_logits=True), full[:, 3:6])  # pos > 0, t > 1
    for t in range(6, CFG.context_length):  # single steps
        close(model.forward_cached(ids[:, t:t + 1], cache), full[:, t])
    assert cache.pos == CFG.context_length and cache.free == 0


@pytest.mark.parametrize("prompt_len", [1, 5, 8, 13])  # shorter, equal, longer than the context
def test_cached_and_uncached_logits_agree_at_every_step(device, prompt_len):
    """A run that crosses the context boundary (total 20 tokens, context 8)."""
    model = make_model(device)
    seq = tokens(2, 20, seed=prompt_len)
    cached, uncached = Decoder(model, 2, use_cache=True), Decoder(model, 2, use_cache=False)
    L = CFG.context_length
    for n in range(prompt_len, seq.shape[1] + 1):
        a, b = cached.next_logits(seq[:, :n]), uncached.next_logits(seq[:, :n])
        # the reference, spelled out: a forward over the last L tokens
        ref = to_numpy(model.forward(seq[:, max(n - L, 0):n]))[:, -1]
        close(a, ref)
        close(b, ref)
        assert a.dtype == np.float64 and a.shape == (2, CFG.vocab_size)


def test_generate_gives_the_same_tokens_with_and_without_cache(device):
    model = make_model(device)
    prompt = tokens(3, 5, seed=2)
    for kwargs in (dict(temperature=0), dict(temperature=0.9, top_k=10, seed=3),
                   dict(top_p=0.8, repetition_penalty=1.3, seed=4)):
        a = generate(model, prompt, 12, use_cache=True, **kwargs)  # crosses the context (8)
        b = generate(model, prompt, 12, use_cache=False, **kwargs)
        np.testing.assert_array_equal(a, b)


def test_float32_cache_lives_on_the_model_device(device):
    model = make_model(device, dtype="float32")
    cache = KVCache.for_model(model, batch_size=2)
    assert len(cache.k) == CFG.n_layers
    assert cache.k[0].shape == (2, CFG.n_heads, CFG.context_length, CFG.head_size)
    assert cache.k[0].dtype == np.float32 and xp_of(cache.v[1]) is model.xp
    assert cache.nbytes() == 2 * CFG.n_layers * 2 * CFG.d_model * CFG.context_length * 4
    ids = tokens(2, 6, seed=5)
    np.testing.assert_allclose(to_numpy(model.forward_cached(ids, cache)),
                               to_numpy(model.forward(ids))[:, -1], rtol=1e-4, atol=1e-5)


def test_reorder_moves_rows_and_keeps_buffers():
    model = make_model()
    ids = tokens(3, 4, seed=6)
    cache = KVCache.for_model(model, batch_size=3)
    model.forward_cached(ids, cache)
    k0 = cache.k[0]
    before = [k.copy() for k in cache.k]
    cache.reorder([2, 2, 0])
    assert cache.k[0] is k0  # buffers keep their identity
    for k, old in zip(cache.k, before, strict=True):
        np.testing.assert_array_equal(k[:, :, :4], old[[2, 2, 0], :, :4])
    # decoding on from the reordered cache = decoding the reordered sequences
    nxt = tokens(3, 1, seed=7)
    close(model.forward_cached(nxt, cache),
          model.forward(np.concatenate([ids[[2, 2, 0]], nxt], axis=1))[:, -1])


def test_forward_cached_refuses_training_mode_and_overflow():
    model = make_model()
    cache = KVCache.for_model(model, batch_size=1)
    model.train()
    with pytest.raises(RuntimeError, match="eval"):
        model.forward_cached(tokens(1, 2), cache)
    model.eval()
    model.forward_cached(tokens(1, 6), cache)
    with pytest.raises(ValueError, match="exceed context_length"):
        model.forward_cached(tokens(1, 3), cache)
    with pytest.raises(ValueError, match="holds 1 sequences"):
        model.forward_cached(tokens(2, 1), cache)


def _training_step(model, ids):
    loss_fn = SoftmaxCrossEntropy()
    model.zero_grad()
    targets = to_device(ids[:, 1:], model.xp)
    loss = loss_fn.forward(model.forward(ids[:, :-1]), targets)
    model.backward(loss_fn.backward())
    return loss, {name: to_numpy(g).copy() for name, _, g in model.parameters()}


def test_generation_does_not_disturb_training(device):
    """Same losses and gradients with or without a generate() between two steps,
    with dropout on: generation runs in eval mode (drawing no dropout masks),
    restores training mode, and leaves no activations behind."""
    cfg = GPTConfig(vocab_size=37, context_length=8, d_model=24, n_layers=2, n_heads=3,
                    dropout=0.2)
    ids = tokens(2, 9, seed=8)
    runs = []
    for with_generation in (False, True):
        model = GPT(cfg, seed=1, device=device, dtype="float64")
        _training_step(model, ids)
        if with_generation:
            generate(model, ids[:, :3], 10, seed=0)  # crosses the context
            generate(model, ids[:, :3], 4, seed=0, use_cache=False)
            assert model.training and all(m.training for m in model.modules())
            for m in model.modules():  # no backward cache is holding an array
                for name in ("_x", "_ids", "_cache", "_h"):
                    assert getattr(m, name, None) is None, (type(m).__name__, name)
        runs.append(_training_step(model, ids))
    (loss_a, grads_a), (loss_b, grads_b) = runs
    assert loss_a == loss_b
    for name in grads_a:
        np.testing.assert_array_equal(grads_a[name], grads_b[name], err_msg=name)


def test_backward_after_inference_is_a_clear_error():
    model = make_model()
    model.forward(tokens(1, 4))
    model.forward_cached(tokens(1, 4), KVCache.for_model(model, 1))
    with pytest.raises(RuntimeError, match="without a matching forward"):
        model.backward(np.zeros((1, 4, CFG.vocab_size)))


# -------------------------------------------------- past the context: a rolling cache

ROLLS_EXACTLY = [  # rolling_is_exact: no cached key depends on a token out of the window
    dict(pos="rope", n_layers=1),
    dict(pos="none", n_layers=1),
    dict(pos="rope", n_layers=2, sliding_window=3),  # receptive field 2 * (3 - 1) < 8
]


def cfg_with(**kw):
    return GPTConfig(**{**CFG.to_dict(), **kw})


@pytest.mark.parametrize("kw", ROLLS_EXACTLY)
@pytest.mark.parametrize("rolling", [None, False])
def test_rolling_cache_gives_the_cropped_forward_where_promised(device, kw, rolling):
    """By default (rolling=None) the Decoder rolls where that is exact: its logits are
    the cropped forward's at every step, far past the context; rolling=False rebuilds."""
    from tinylm.sampling import rolling_is_exact

    cfg = cfg_with(**kw)
    assert rolling_is_exact(cfg)
    model = make_model(device, cfg)
    seq = tokens(2, 30, seed=3)
    decoder = Decoder(model, 2, use_cache=True, rolling=rolling)
    assert decoder.rolling == (rolling is None)
    L = CFG.context_length
    for n in range(3, seq.shape[1] + 1):  # 22 steps past the context of 8
        ref = to_numpy(model.forward(seq[:, max(n - L, 0):n]))[:, -1]
        close(decoder.next_logits(seq[:, :n]), ref)
        assert decoder.cache.pos <= L  # positions are renumbered, never past the tables


def test_rolling_true_is_exact_for_layer_0_keys_only():
    """A 2-layer RoPE model, rolling=True: exact until the window slides; after, the
    layer-0 keys it holds are those of a forward over the window (renumbered 0..T-2),
    the layer-1 keys are not (they saw tokens that have left the window)."""
    from tinylm.sampling import rolling_is_exact

    cfg = cfg_with(pos="rope")
    assert not rolling_is_exact(cfg)
    model = make_model(cfg=cfg)
    seq = tokens(1, 20, seed=4)
    L = CFG.context_length
    decoder = Decoder(model, 1, use_cache=True, rolling=True)
    exact = Decoder(model, 1, use_cache=True)
    assert decoder.rolling and not exact.rolling
    for n in range(3, L + 1):  # inside the context both are exact
        close(decoder.next_logits(seq[:, :n]), exact.next_logits(seq[:, :n]))
    for n in range(L + 1, seq.shape[1] + 1):
        decoder.next_logits(seq[:, :n])
    cache = decoder.cache
    held = cache.held
    assert held == cache.slots == L - 1 and cache.pos == held + 1
    # the rolling cache holds the last T-1 tokens at positions 1..T-1; a forward over the
    # last T tokens from scratch puts them at the same positions
    window = KVCache.for_model(model, 1)
    model.forward_cached(seq[:, -L:], window)
    close(cache.k[0][:, :, :held], window.k[0][:, :, 1:L])
    close(cache.v[0][:, :, :held], window.v[0][:, :, 1:L])
    assert np.abs(cache.k[1][:, :, :held] - window.k[1][:, :, 1:L]).max() > 1e-3


def test_rolling_generate_and_beam_search_match_recomputation():
    model = make_model(cfg=cfg_with(pos="rope", n_layers=1))
    prompt = tokens(2, 5, seed=5)
    a = generate(model, prompt, 25, temperature=0.8, top_k=10, seed=1)
    b = generate(model, prompt, 25, temperature=0.8, top_k=10, seed=1, use_cache=False)
    np.testing.assert_array_equal(a, b)
    from tinylm.sampling import beam_search

    a = beam_search(model, prompt, 15, beam_width=3)
    b = beam_search(model, prompt, 15, beam_width=3, use_cache=False)
    np.testing.assert_array_equal(a, b)


def test_rolling_needs_relative_positions_and_single_steps():
    model = make_model()  # pos="learned"
    with pytest.raises(ValueError, match="rolling"):
        generate(model, tokens(1, 3), 4, rolling=True)
    with pytest.raises(ValueError, match="rolling"):
        KVCache.for_model(model, 1, rolling=True)
    model = make_model(cfg=cfg_with(pos="none"))
    cache = KVCache.for_model(model, 1, rolling=True)
    assert cache.slots == CFG.context_length - 1
    model.forward_cached(tokens(1, CFG.context_length), cache)  # a full prefill still fits
    with pytest.raises(ValueError, match="one token at a time"):
        model.forward_cached(tokens(1, 2), cache)
    model.forward_cached(tokens(1, 1), cache)
    assert cache.pos == CFG.context_length
