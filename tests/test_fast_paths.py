"""The fast paths compute what the plain code computes; recomputation changes nothing.

Each fast path (tinylm/nn/functional.py, "Fast paths": row chunks on a thread pool)
is checked against the plain reference code beside it, in float64, where the two
differ only by the order of a few roundings. CHUNK is made tiny so that every test
splits its rows into many chunks, and two threads are asked for, so that the
chunks really are shared out. Activation recomputation (`GPT.recompute`) must give
bit-identical losses and gradients, dropout included.
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from tinylm import GPT, GPTConfig
from tinylm.nn import GELU, LayerNorm, Linear, SoftmaxCrossEntropy
from tinylm.nn import functional as F
from tinylm.optim import AdamW, clip_grad_norm

TOL = 1e-12


@pytest.fixture(autouse=True)
def many_small_chunks(monkeypatch):
    monkeypatch.setattr(F, "CHUNK", 64)  # a few rows per chunk
    monkeypatch.setattr(F, "MIN_SPLIT", 16)
    monkeypatch.setattr(F, "MIN_FAST", 0)  # fast paths for the tests' small arrays too
    F.set_num_threads(2)
    yield
    F.set_num_threads(None)


def both(fn):
    """fn() with the plain code, then with the fast paths."""
    with F.simple_paths():
        plain = fn()
    assert F.FAST
    return plain, fn()


def close(a, b, tol=TOL):
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol * max(np.abs(b).max(), 1.0))


def rand(*shape, seed=0, scale=1.0):
    return np.random.default_rng(seed).standard_normal(shape) * scale


def step(layer, x, dout):
    """(y, dx, {parameter: gradient}) of one forward and backward of `layer`."""
    layer.zero_grad()
    y = layer.forward(x)
    dx = layer.backward(dout)
    return y, dx, {name: g.copy() for name, _, g in layer.parameters()}


def close_steps(plain, fast):
    """Two `step` results agree: output, input gradient, every parameter gradient."""
    (y0, dx0, g0), (y1, dx1, g1) = plain, fast
    close(y0, y1)
    close(dx0, dx1)
    assert g0.keys() == g1.keys()
    for name in g0:
        close(g0[name], g1[name])


# ---------------------------------------------------------------- the pool itself


def test_run_chunks_keeps_order_and_uses_the_threads(monkeypatch):
    import threading

    names = set()

    def work(i):
        names.add(threading.current_thread().name)
        return i * i

    assert F.run_chunks(work, [(i,) for i in range(10)]) == [i * i for i in range(10)]
    assert len(names) == 2  # the caller and one pool thread
    F.set_num_threads(1)
    names.clear()
    assert F.run_chunks(work, [(i,) for i in range(10)]) == [i * i for i in range(10)]
    assert names == {threading.current_thread().name}


def test_run_chunks_raises_a_worker_error():
    def work(i):
        if i == 7:
            raise ValueError("chunk 7")

    with pytest.raises(ValueError, match="chunk 7"):
        F.run_chunks(work, [(i,) for i in range(10)])


def test_row_chunks_cover_every_row_once():
    for n_rows, row in [(1, 1000), (10, 7), (100, 64), (3, 0)]:
        chunks = F.row_chunks(n_rows, row)
        assert chunks[0][0] == 0 and chunks[-1][1] == n_rows
        assert all(a[1] == b[0] for a, b in zip(chunks, chunks[1:], strict=False))


def test_num_threads_comes_from_the_environment(monkeypatch):
    F.set_num_threads(None)
    monkeypatch.setenv("TINYLM_NUM_THREADS", "3")
    assert F.num_threads() == 3
    F.set_num_threads(None)
    monkeypatch.delenv("TINYLM_NUM_THREADS")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert F.num_threads() == 1
    with pytest.raises(ValueError):
        F.set_num_threads(0)


def test_small_arrays_take_the_plain_code(monkeypatch):
    monkeypatch.setattr(F, "MIN_FAST", 100)
    assert not F.use_fast(np.zeros(99))
    assert F.use_fast(np.zeros(100))


def test_fast_paths_are_numpy_float_only():
    assert F.use_fast(np.zeros(3), np.zeros(3, np.float32))
    assert not F.use_fast(np.zeros(3, np.float16))
    assert not F.use_fast(np.zeros(3, np.int64))
    with F.simple_paths():
        assert not F.use_fast(np.zeros(3))


# ------------------------------------------------------------- layer by layer


@pytest.mark.parametrize("training", [True, False])
def test_gelu(training):
    """Training: the fast forward keeps dy/dx (one array) instead of x and tanh(u);
    eval: it keeps x and tanh(u) as the plain code does. Both give the plain gradient."""
    x, dout = rand(4, 9, 40, scale=3.0), rand(4, 9, 40, seed=1)
    layer = GELU().train(training)

    def run():
        y = layer.forward(x)
        kept = layer._cache
        return y, layer.backward(dout), kept

    (y0, dx0, kept0), (y1, dx1, kept1) = both(run)
    close(y0, y1)
    close(dx0, dx1)
    assert isinstance(kept0, tuple) and isinstance(kept1, tuple) != training


@pytest.mark.parametrize("bias", [True, False])
def test_layernorm(bias):
    x, dout = rand(3, 11, 24, scale=2.0) + 0.5, rand(3, 11, 24, seed=1)
    layer = LayerNorm(24, bias=bias).to(dtype="float64")
    for p in layer.params.values():
        p[...] = rand(24, seed=2)

    close_steps(*both(lambda: step(layer, x, dout)))


def test_softmax_in_place_with_masked_entries():
    x = rand(2, 3, 10, 10, scale=4.0)
    x[..., np.triu_indices(10, 1)[0], np.triu_indices(10, 1)[1]] = -np.inf  # causal mask

    def in_place():
        a = x.copy()
        assert F.softmax(a, out=a) is a
        return a

    p0, p1 = both(in_place)
    close(p0, p1)
    assert (p1[..., 0, 1:] == 0).all()


def test_softmax_backward_matches_the_formula():
    p = F.softmax(rand(2, 3, 10, 10, scale=4.0))
    dp = rand(2, 3, 10, 10, seed=1)
    want = 0.25 * p * (dp - (dp * p).sum(axis=-1, keepdims=True))  # dloss/ds
    got = F.softmax_backward_fast(p, dp.copy(), 0.25)
    close(got, want)
    assert np.abs(got.sum(axis=-1)).max() < 1e-12  # each row of a softmax gradient sums to 0


@pytest.mark.parametrize("transpose", [False, True])
def test_matmul_splits_a_stack_between_threads(monkeypatch, transpose):
    a, b = rand(2, 3, 8, 5), rand(2, 3, 5, 8, seed=1)
    if transpose:  # a transposed view on the left, as attention's backward passes them
        a = rand(2, 3, 5, 8).swapaxes(-1, -2)
    calls = []
    real = np.matmul
    monkeypatch.setattr(np, "matmul", lambda x, y, **kw: calls.append(len(x)) or real(x, y, **kw))
    got = F.matmul(a, b)
    assert calls == [3, 3]  # the stack of 6 products, in two halves
    monkeypatch.setattr(np, "matmul", real)
    close(got, a @ b, tol=1e-15)
    F.set_num_threads(1)
    assert calls == [3, 3] and np.array_equal(F.matmul(a, b), a @ b)  # one thread: plain


def test_attention_backward_fast_equals_plain():
    from tinylm.nn import CausalSelfAttention

    x, dout = rand(2, 12, 16), rand(2, 12, 16, seed=1)

    attn = CausalSelfAttention(16, 4, n_kv_heads=2, rng=np.random.default_rng(0))
    attn.to(dtype="float64")
    close_steps(*both(lambda: step(attn, x, dout)))


@pytest.mark.parametrize("kw", [{}, {"n_kv_heads": 2}, {"sliding_window": 5},
                                {"n_kv_heads": 1, "sliding_window": 40, "rope_theta": 1e4}])
def test_causal_row_blocks_equal_the_full_attention(monkeypatch, kw):
    """One thread: the training forward takes the row blocks (tinylm/nn/causal_blocks.py);
    outputs, gradients and the plotted weights equal the plain code's."""
    from tinylm.nn import CausalSelfAttention, causal_blocks

    F.set_num_threads(1)
    monkeypatch.setattr(causal_blocks, "MIN_BLOCK", 4)
    T = 18  # 4 blocks of 4 or 5 rows
    x, dout = rand(2, T, 16), rand(2, T, 16, seed=1)
    taken = []
    real = causal_blocks.attend_blocks
    monkeypatch.setattr("tinylm.nn.attention.attend_blocks",
                        lambda *a: taken.append(1) or real(*a))

    def run():
        attn = CausalSelfAttention(16, 4, rng=np.random.default_rng(0), max_positions=T, **kw)
        attn.to(dtype="float64")
        y = attn.forward(x)
        weights = attn.attention_weights.copy()
        dx = attn.backward(dout)
        return y, dx, weights, {n: g.copy() for n, _, g in attn.parameters()}

    (y0, dx0, w0, g0), (y1, dx1, w1, g1) = both(run)
    assert taken == [1]  # the fast run took the blocks, the plain one did not
    close(y0, y1)
    close(dx0, dx1)
    np.testing.assert_array_equal(w1 == 0, w0 == 0)  # the same hidden entries, exactly 0
    close(w0, w1)
    for k in g0:
        close(g0[k], g1[k])


@pytest.mark.parametrize("threads", [1, 2])
def test_fast_paths_pass_the_float64_gradient_check(monkeypatch, threads):
    """Finite differences through the fast paths themselves (chunks of 64 elements, on
    `threads` threads; on one thread attention takes the causal row blocks, on two the
    split matmuls and the chunked softmax backward)."""
    from tinylm.gradcheck import check_layer, randomize_params
    from tinylm.nn import CausalSelfAttention, causal_blocks
    from tinylm.nn.causal_blocks import RowBlocks

    F.set_num_threads(threads)
    monkeypatch.setattr(causal_blocks, "MIN_BLOCK", 4)
    rng = np.random.default_rng(0)
    x = rand(2, 12, 16)
    attn = CausalSelfAttention(16, 4, n_kv_heads=2, sliding_window=7, rng=rng)
    for layer in (GELU(), LayerNorm(16), attn):
        layer.to(dtype="float64")
        randomize_params(layer, rng)
        failed = [r for r in check_layer(layer, x) if not r.passed]
        assert not failed, (type(layer).__name__, failed)
    attn.forward(x)
    assert isinstance(attn._take_cache()[3], RowBlocks) == (threads == 1)
    loss = SoftmaxCrossEntropy(label_smoothing=0.1)
    targets = np.random.default_rng(1).integers(0, 16, (2, 12))
    failed = [r for r in check_layer(loss, rand(2, 12, 16, scale=2.0), targets)
              if not r.passed]
    assert not failed, failed


def test_row_blocks_cover_the_rows_and_visible_keys():
    from tinylm.nn.causal_blocks import row_blocks

    blocks = row_blocks(130, window=20)
    assert [(a, b) for a, b, _ in blocks] == [(0, 32), (32, 65), (65, 97), (97, 130)]
    assert [k0 for _, _, k0 in blocks] == [0, 13, 46, 78]  # a - W + 1: the first key row a sees


def test_linear():
    x, dout = rand(3, 11, 20), rand(3, 11, 30, seed=1)
    layer = Linear(20, 30).to(dtype="float64")
    layer.params["bias"][...] = rand(30, seed=2)

    close_steps(*both(lambda: step(layer, x, dout)))


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_cross_entropy(smoothing):
    logits = rand(3, 7, 50, scale=3.0)
    targets = np.random.default_rng(1).integers(0, 50, (3, 7))
    targets[0, :3] = -100  # ignored positions
    loss_fn = SoftmaxCrossEntropy(label_smoothing=smoothing)
    (l0, d0), (l1, d1) = both(lambda: (loss_fn.forward(logits, targets), loss_fn.backward(0.5)))
    assert abs(l0 - l1) <= TOL * abs(l0)
    close(d0, d1)
    assert (d1[0, :3] == 0).all()


def test_cross_entropy_with_every_row_ignored():
    loss_fn = SoftmaxCrossEntropy()
    targets = np.full((2, 3), -100)
    assert np.isnan(loss_fn.forward(rand(2, 3, 5), targets))
    assert (loss_fn.backward() == 0).all()


def test_adamw_is_bit_identical():
    def run():
        params = [("w", rand(30, 20), rand(30, 20, seed=1)), ("b", rand(20), rand(20, seed=2))]
        opt = AdamW(params, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
        for step in range(3):
            for _, _, g in params:
                g[...] = rand(*g.shape, seed=10 + step)
            opt.step()
        return [p.copy() for _, p, _ in params] + [a.copy() for a in opt.m.values()]

    for a, b in zip(*both(run), strict=True):
        np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------- a whole model


def _step(model, ids, recompute=False, lr=1e-2):
    """Two training steps; losses and every gradient of the second."""
    model.recompute = recompute
    loss_fn = SoftmaxCrossEntropy(label_smoothing=0.1)
    opt = AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    losses = []
    for _ in range(2):
        model.zero_grad()
        losses.append(loss_fn.forward(model.forward(ids[:, :-1]), ids[:, 1:]))
        model.backward(loss_fn.backward())
        grads = {name: g.copy() for name, _, g in model.parameters()}
        clip_grad_norm(model.parameters(), 1.0)
        opt.step()
    return losses, grads


CFG = dict(vocab_size=37, context_length=16, d_model=24, n_layers=2, n_heads=3)


def test_gpt_step_fast_equals_plain():
    ids = np.random.default_rng(0).integers(0, 37, (3, 17))
    (l0, g0), (l1, g1) = both(lambda: _step(GPT(GPTConfig(**CFG), dtype="float64"), ids))
    np.testing.assert_allclose(l0, l1, rtol=TOL)
    for name in g0:
        close(g0[name], g1[name], tol=1e-10)


def test_float32_stays_float32():
    """No float64 creeps into a float32 step (a float64 scalar or arange would upcast
    whole arrays): every activation kept for backward, the logits and every
    gradient and optimizer moment are float32."""
    model = GPT(GPTConfig(**CFG))
    ids = np.random.default_rng(0).integers(0, 37, (2, 17))
    loss_fn = SoftmaxCrossEntropy(label_smoothing=0.1)
    logits = model.forward(ids[:, :-1])
    assert logits.dtype == np.float32
    for m in model.modules():
        cache = m._cache if isinstance(m._cache, tuple) else (m._cache,)
        for a in cache:
            if isinstance(a, np.ndarray) and a.dtype.kind == "f":
                assert a.dtype == np.float32, type(m).__name__
    loss_fn.forward(logits, ids[:, 1:])
    dlogits = loss_fn.backward()
    assert dlogits.dtype == np.float32
    model.backward(dlogits)
    opt = AdamW(model.parameters(), weight_decay=0.1)
    opt.step()
    for name, p, g in model.parameters():
        assert p.dtype == g.dtype == opt.m[name].dtype == opt.v[name].dtype == np.float32, name


# ------------------------------------------------------- activation recomputation


@pytest.mark.parametrize("variant", [
    dict(),
    dict(pos="rope", norm="rmsnorm", mlp="swiglu", n_kv_heads=1),
    dict(n_experts=2, experts_per_token=1),
    dict(norm_placement="post", attention="flash", dropout=0.0),
])
def test_recompute_gives_identical_gradients(variant):
    """Bit for bit, with dropout on (the masks are drawn again from the same streams)."""
    cfg = GPTConfig(**{**CFG, "dropout": 0.2, **variant})
    ids = np.random.default_rng(0).integers(0, 37, (3, 17))
    l0, g0 = _step(GPT(cfg, seed=1, dtype="float64"), ids, recompute=False)
    l1, g1 = _step(GPT(cfg, seed=1, dtype="float64"), ids, recompute=True)
    assert l0 == l1
    for name in g0:
        np.testing.assert_array_equal(g0[name], g1[name], err_msg=name)


def test_recompute_keeps_only_the_block_inputs():
    model = GPT(GPTConfig(**CFG, dropout=0.1))
    model.recompute = True
    ids = np.random.default_rng(0).integers(0, 37, (2, 16))
    model.forward(ids)
    for block in model.blocks:
        x, streams = block._cache  # the checkpoint: the block's input
        assert x.shape == (2, 16, 24)
        assert len(streams) == sum(1 for m in block.modules() if type(m).__name__ == "Dropout")
        assert all(m._cache is None for m in block.modules() if m is not block)
    model.clear_backward_caches()  # inference after training drops the checkpoints too
    assert all(block._cache is None for block in model.blocks)
    model.eval()
    model.forward(ids)  # no checkpoints outside training: eval forwards run as usual
    assert all(block._cache is None for block in model.blocks)


def test_recompute_lowers_the_peak_memory():
    cfg = GPTConfig(vocab_size=64, context_length=64, d_model=64, n_layers=4, n_heads=4)
    ids = np.random.default_rng(0).integers(0, 64, (4, 65))
    peaks = []
    for recompute in (False, True):
        model = GPT(cfg)
        model.recompute = recompute
        loss_fn = SoftmaxCrossEntropy()
        tracemalloc.start()
        loss_fn.forward(model.forward(ids[:, :-1]), ids[:, 1:])
        model.backward(loss_fn.backward())
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    assert peaks[1] < 0.6 * peaks[0]
