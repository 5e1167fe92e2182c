"""Sinusoidal position encodings and the attention-weights hook used by the notebooks."""

from __future__ import annotations

import numpy as np
import pytest

from tinylm.nn import CausalSelfAttention
from tinylm.nn.positions import sinusoidal_positions


def test_sinusoidal_values_and_relative_shift():
    P = sinusoidal_positions(50, 8, dtype="float64")
    assert P.shape == (50, 8)
    np.testing.assert_allclose(P[0], [0, 1] * 4)  # sin(0), cos(0)
    np.testing.assert_allclose(P[3, 0], np.sin(3.0))
    np.testing.assert_allclose(P[3, 3], np.cos(3.0 / 10000 ** (2 / 8)))
    # PE[t + k] = R_k PE[t] with R_k a rotation per channel pair: a linear map that
    # depends on k only (the reason the encoding makes relative positions easy)
    k = 5
    for i in range(4):
        w = 10000 ** (-2 * i / 8)
        R = np.array([[np.cos(k * w), -np.sin(k * w)], [np.sin(k * w), np.cos(k * w)]])
        pairs = P[:, 2 * i:2 * i + 2]  # (T, 2) = (sin, cos)
        np.testing.assert_allclose(pairs[:-k] @ R, pairs[k:], atol=1e-12)
    with pytest.raises(ValueError, match="even dimension"):
        sinusoidal_positions(4, 5)


def test_attention_weights_are_causal_distributions():
    attn = CausalSelfAttention(8, 2).to(dtype="float64")
    x = np.random.default_rng(0).standard_normal((1, 5, 8))
    attn.forward(x)
    att = attn.attention_weights
    assert att.shape == (1, 2, 5, 5)
    np.testing.assert_allclose(att.sum(axis=-1), 1.0)
    assert np.all(np.triu(att[0, 0], k=1) == 0)
    attn.backward(np.ones((1, 5, 8)))
    with pytest.raises(RuntimeError, match="call forward first"):
        _ = attn.attention_weights
