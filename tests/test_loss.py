"""SoftmaxCrossEntropy against a literal, loop-by-loop implementation of PyTorch's definition."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tinylm.backend import get_xp, to_device, to_numpy
from tinylm.nn import SoftmaxCrossEntropy


def literal_cross_entropy(logits, targets, eps, ignore_index):
    """F.cross_entropy(label_smoothing=eps, ignore_index=...), one row at a time."""
    total, n = 0.0, 0
    for z, y in zip(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), strict=True):
        if y == ignore_index:
            continue
        logp = [zi - math.log(sum(math.exp(zj) for zj in z)) for zi in z]
        total += (1 - eps) * -logp[y] + eps * -sum(logp) / len(z)
        n += 1
    return total / n


@pytest.mark.parametrize("eps", [0.0, 0.1, 1.0])
def test_matches_literal_definition(eps, device):
    xp = get_xp(device)
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((2, 4, 6)) * 3
    targets = rng.integers(0, 6, (2, 4))
    targets[1, 2] = targets[0, 0] = -1
    loss_fn = SoftmaxCrossEntropy(label_smoothing=eps, ignore_index=-1)
    loss = loss_fn.forward(to_device(logits, xp), to_device(targets, xp))
    assert isinstance(loss, float)
    assert loss == pytest.approx(literal_cross_entropy(logits, targets, eps, -1), rel=1e-12)
    dlogits = to_numpy(loss_fn.backward())
    assert dlogits.shape == logits.shape
    assert np.all(dlogits[1, 2] == 0) and np.all(dlogits[0, 0] == 0)  # ignored rows
    # each valid row of p - q sums to zero (both are distributions)
    np.testing.assert_allclose(dlogits.sum(axis=-1), 0.0, atol=1e-15)


def test_stable_for_huge_logits():
    logits = np.array([[1000.0, 0.0, -1000.0], [-5e4, 5e4, 0.0]])
    loss_fn = SoftmaxCrossEntropy()
    loss = loss_fn.forward(logits, np.array([0, 1]))
    assert loss == pytest.approx(0.0, abs=1e-12)
    assert np.isfinite(loss_fn.backward()).all()


def test_upstream_scalar_scales_the_gradient():
    rng = np.random.default_rng(0)
    logits, targets = rng.standard_normal((5, 4)), rng.integers(0, 4, 5)
    loss_fn = SoftmaxCrossEntropy(label_smoothing=0.1)
    loss_fn.forward(logits, targets)
    d1 = loss_fn.backward()
    loss_fn.forward(logits, targets)
    np.testing.assert_allclose(loss_fn.backward(2.5), 2.5 * d1)


def test_all_ignored_gives_nan_and_zero_gradient():
    loss_fn = SoftmaxCrossEntropy()
    assert math.isnan(loss_fn.forward(np.zeros((2, 3)), np.array([-100, -100])))
    assert not loss_fn.backward().any()


@pytest.mark.parametrize("targets, error, match", [
    (np.array([0, 1]), ValueError, r"targets must have shape \(3,\)"),
    (np.array([0, 1, 7]), ValueError, "target 7 is outside"),
    (np.array([0.0, 1.0, 2.0]), TypeError, "integer class ids"),
])
def test_bad_targets(targets, error, match):
    with pytest.raises(error, match=match):
        SoftmaxCrossEntropy().forward(np.zeros((3, 4)), targets)


def test_bad_smoothing():
    with pytest.raises(ValueError, match="label_smoothing"):
        SoftmaxCrossEntropy(label_smoothing=1.5)
