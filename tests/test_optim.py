"""AdamW, gradient clipping and the cosine schedule."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tinylm.backend import get_xp, to_device, to_numpy
from tinylm.optim import AdamW, clip_grad_norm, cosine_schedule


def make_params(xp, rng):
    p = {"w": rng.standard_normal((3, 4)), "b": rng.standard_normal(4)}
    g = {"w": rng.standard_normal((3, 4)), "b": rng.standard_normal(4)}
    return [(k, to_device(p[k].copy(), xp), to_device(g[k].copy(), xp)) for k in p], p, g


def reference_adamw(p, g, m, v, t, lr, b1, b2, eps, wd):
    """The algorithm as printed in Loshchilov & Hutter / torch.optim.AdamW docs."""
    p = p * (1 - lr * wd)
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    m_hat, v_hat = m / (1 - b1**t), v / (1 - b2**t)
    return p - lr * m_hat / (np.sqrt(v_hat) + eps), m, v


def test_adamw_matches_the_textbook_update(device):
    xp = get_xp(device)
    rng = np.random.default_rng(0)
    params, p0, g0 = make_params(xp, rng)
    opt = AdamW(params, lr=0.1, betas=(0.8, 0.9), eps=1e-8, weight_decay=0.5)
    ref = {k: (p0[k].copy(), np.zeros_like(p0[k]), np.zeros_like(p0[k])) for k in p0}
    for t in (1, 2, 3):
        opt.step()
        for k in ref:
            wd = 0.5 if p0[k].ndim >= 2 else 0.0  # decay on matrices only
            ref[k] = reference_adamw(*ref[k][:1], g0[k], *ref[k][1:], t, 0.1, 0.8, 0.9, 1e-8, wd)
    for name, p, _ in params:
        np.testing.assert_allclose(to_numpy(p), ref[name][0], rtol=1e-12)


def test_no_weight_decay_on_vectors():
    w, b = np.ones((2, 2)), np.ones(2)
    opt = AdamW([("w", w, np.zeros((2, 2))), ("b", b, np.zeros(2))], lr=0.1, weight_decay=0.5)
    opt.step()  # zero gradients: only decay moves anything
    np.testing.assert_allclose(w, 0.95)
    np.testing.assert_array_equal(b, 1.0)


def test_lr_is_settable_and_updates_in_place():
    p, g = np.ones(3), np.ones(3)
    opt = AdamW([("p", p, g)], lr=0.1, weight_decay=0.0)
    opt.lr = 0.0
    opt.step()
    np.testing.assert_array_equal(p, 1.0)
    opt.lr = 0.1
    opt.step()
    assert np.all(p < 1.0)


def test_state_dict_round_trip():
    rng = np.random.default_rng(0)
    params, _, _ = make_params(np, rng)
    opt = AdamW(params, lr=0.1)
    opt.step()
    state = opt.state_dict()
    params2 = [(n, p.copy(), g.copy()) for n, p, g in params]
    opt2 = AdamW(params2, lr=0.5)
    opt2.load_state_dict(state)
    opt.step()
    opt2.step()
    for (_, a, _), (_, b, _) in zip(params, params2, strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="missing"):
        AdamW(params[:1]).load_state_dict(state)


def test_adamw_rejects_bad_hyperparameters():
    with pytest.raises(ValueError, match="betas"):
        AdamW([("p", np.ones(2), np.ones(2))], betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="no parameters"):
        AdamW([])


def test_clip_grad_norm(device):
    xp = get_xp(device)
    g1, g2 = to_device(np.array([3.0, 0.0]), xp), to_device(np.array([[4.0]]), xp)
    params = [("a", None, g1), ("b", None, g2)]
    norm = clip_grad_norm(params, 1.0)
    assert norm == pytest.approx(5.0)
    scale = 1.0 / (5.0 + 1e-6)
    np.testing.assert_allclose(to_numpy(g1), [3.0 * scale, 0.0])
    np.testing.assert_allclose(to_numpy(g2), [[4.0 * scale]])
    assert clip_grad_norm(params, 10.0) == pytest.approx(1.0, rel=1e-5)  # below: untouched
    np.testing.assert_allclose(to_numpy(g2), [[4.0 * scale]])


def test_cosine_schedule_shape():
    kw = dict(max_lr=1.0, min_lr=0.1, warmup_steps=10, decay_steps=110)
    assert cosine_schedule(0, **kw) == pytest.approx(0.1)  # (0 + 1) / 10
    assert cosine_schedule(9, **kw) == pytest.approx(1.0)
    assert cosine_schedule(10, **kw) == pytest.approx(1.0)
    assert cosine_schedule(60, **kw) == pytest.approx(0.55)  # half way: the mean
    assert cosine_schedule(110, **kw) == pytest.approx(0.1)
    assert cosine_schedule(5000, **kw) == pytest.approx(0.1)
    lrs = [cosine_schedule(s, **kw) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))  # monotone decay
    assert cosine_schedule(35, **kw) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 4)))
    with pytest.raises(ValueError, match="warmup_steps"):
        cosine_schedule(0, max_lr=1, min_lr=0, warmup_steps=10, decay_steps=5)
