"""Every layer's and the whole model's backward against float64 finite differences,
on every backend, plus the places where backward bugs like to hide."""

from __future__ import annotations

import numpy as np
import pytest

from tinylm.backend import get_xp, to_device, to_numpy
from tinylm.gradcheck import check_layer, compare_gradient, randomize_params, suite_cases
from tinylm.nn import Block, CausalSelfAttention, Embedding, Linear, SoftmaxCrossEntropy

CASE_NAMES = [label for label, _ in suite_cases("cpu")]


@pytest.mark.parametrize("case", CASE_NAMES)
def test_gradcheck_suite(case, device):
    """The same cases `tinylm gradcheck` prints, on NumPy, the CuPy double and a real GPU."""
    thunk = dict(suite_cases(device))[case]
    results = thunk()
    assert results, "a case must check something"
    failed = [(r.name, r.max_rel_error, r.worst) for r in results if not r.passed]
    assert not failed, f"{case}: gradient mismatch {failed}"


def test_checker_catches_a_wrong_backward():
    """A checker that cannot fail proves nothing: break a backward on purpose."""

    class BrokenLinear(Linear):
        def backward(self, dout):
            dx = super().backward(dout)
            self.grads["weight"] *= 1.01  # a 1% error in the weight gradient
            return dx

    layer = BrokenLinear(4, 3).to(dtype="float64")
    x = np.random.default_rng(0).standard_normal((2, 4))
    results = {r.name: r for r in check_layer(layer, x)}
    assert results["input"].passed and results["bias"].passed
    assert not results["weight"].passed
    assert results["weight"].max_rel_error > 1e-3


def test_directional_check_catches_errors_on_large_tensors():
    """Large tensors are checked at sampled elements and along random directions."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal(500)
    w = rng.standard_normal(500)

    def f():
        return float(np.sin(x) @ w)

    good = np.cos(x) * w
    r = compare_gradient(f, x, good, name="x", rng=rng, f_scale=10.0)
    assert r.method == "sampled+directions" and r.passed
    bad = good.copy()
    bad[rng.integers(500, size=50)] += 0.5  # wrong in 10% of the entries
    assert not compare_gradient(f, x, bad, name="x", rng=rng, f_scale=10.0).passed


def test_causal_mask_no_gradient_from_the_future(device):
    xp = get_xp(device)
    attn = CausalSelfAttention(8, 2).to(device, "float64")
    randomize_params(attn, np.random.default_rng(1))
    x = to_device(np.random.default_rng(2).standard_normal((2, 6, 8)), xp)
    y = to_numpy(attn.forward(x))
    # forward: changing position 4 leaves outputs 0..3 untouched
    x2 = x.copy()
    x2[:, 4] += 1.0
    y2 = to_numpy(attn.forward(x2))
    np.testing.assert_array_equal(y2[:, :4], y[:, :4])
    assert np.abs(y2[:, 4:] - y[:, 4:]).max() > 1e-3
    # backward: a gradient on output position 2 only reaches inputs 0..2
    attn.forward(x)
    dout = np.zeros((2, 6, 8))
    dout[:, 2] = 1.0
    dx = to_numpy(attn.backward(to_device(dout, xp)))
    assert np.all(dx[:, 3:] == 0.0), "gradient leaked from the future"
    assert np.abs(dx[:, :3]).min(axis=-1).max() > 0


def test_embedding_repeated_ids_sum(device):
    xp = get_xp(device)
    emb = Embedding(5, 3).to(device, "float64")
    ids = np.array([[1, 4, 1], [1, 0, 4]])
    dout = np.random.default_rng(0).standard_normal((2, 3, 3))
    emb.forward(to_device(ids, xp))
    emb.backward(to_device(dout, xp))
    expected = np.zeros((5, 3))
    np.add.at(expected, ids.ravel(), dout.reshape(-1, 3))  # the slow, obviously right way
    np.testing.assert_allclose(to_numpy(emb.grads["weight"]), expected, rtol=1e-12)
    assert np.all(to_numpy(emb.grads["weight"])[[2, 3]] == 0)  # unused rows get nothing


def test_tied_embedding_gets_sum_of_lookup_and_head_gradients():
    """Tied: dW = (lookup's scatter-add) + (head's matmul). Build the untied twin whose
    head equals W^T: its two separate gradients must add up to the tied gradient."""
    from tinylm import GPT, GPTConfig

    common = dict(vocab_size=11, context_length=6, d_model=8, n_layers=1, n_heads=2)
    tied = GPT(GPTConfig(**common, tie_weights=True), seed=3, dtype="float64")
    untied = GPT(GPTConfig(**common, tie_weights=False), seed=3, dtype="float64")
    state = tied.state_dict()
    state["head.weight"] = state["tok_emb.weight"].T.copy()
    untied.load_state_dict(state)
    rng = np.random.default_rng(0)
    idx, targets = rng.integers(0, 11, (2, 6)), rng.integers(0, 11, (2, 6))
    grads = []
    for model in (tied, untied):
        loss_fn = SoftmaxCrossEntropy()
        model.zero_grad()
        loss_fn.forward(model.forward(idx), targets)
        model.backward(loss_fn.backward())
        grads.append({n: to_numpy(g) for n, _, g in model.parameters()})
    g_tied, g_untied = grads
    np.testing.assert_allclose(
        g_tied["tok_emb.weight"], g_untied["tok_emb.weight"] + g_untied["head.weight"].T,
        rtol=1e-10, atol=1e-14)
    # and the head's share is not negligible, so the test would notice it missing
    assert np.abs(g_untied["head.weight"]).max() > 0.1 * np.abs(g_tied["tok_emb.weight"]).max()


def test_residual_fork_passes_gradient_straight_through():
    """With both branches' output projections zeroed, a Block is the identity and its
    input gradient is exactly dout (the residual path), while branches still get gradients."""
    block = Block(8, 2).to(dtype="float64")
    for layer in (block.attn.proj, block.mlp.proj):
        for p in layer.params.values():
            p[...] = 0.0
    x = np.random.default_rng(0).standard_normal((2, 4, 8))
    np.testing.assert_array_equal(block.forward(x), x)
    dout = np.random.default_rng(1).standard_normal((2, 4, 8))
    np.testing.assert_array_equal(block.backward(dout), dout)
    assert np.abs(block.mlp.proj.grads["weight"]).max() > 0


def test_parameter_gradients_accumulate(device):
    """Two backward passes without zero_grad sum up (as in PyTorch)."""
    xp = get_xp(device)
    layer = Linear(3, 2).to(device, "float64")
    x = to_device(np.random.default_rng(0).standard_normal((4, 3)), xp)
    dout = to_device(np.ones((4, 2)), xp)
    layer.forward(x)
    layer.backward(dout)
    once = to_numpy(layer.grads["weight"]).copy()
    layer.forward(x)
    layer.backward(dout)
    np.testing.assert_allclose(to_numpy(layer.grads["weight"]), 2 * once)
    layer.zero_grad()
    assert not to_numpy(layer.grads["weight"]).any()


def test_backward_without_forward_is_a_clear_error():
    layer = Linear(3, 2)
    with pytest.raises(RuntimeError, match="without a matching forward"):
        layer.backward(np.ones((1, 2), dtype=np.float32))
