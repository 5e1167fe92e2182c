"""SequenceLogProb and DPOLoss (tinylm/nn/preference.py) against PyTorch, their stability at
extreme margins, and what they report, on every backend."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tinylm.backend import get_xp, to_device, to_numpy
from tinylm.nn import DPOLoss, SequenceLogProb, SoftmaxCrossEntropy

FIXTURE = Path(__file__).parent / "fixtures" / "finetune_reference.npz"
RTOL, ATOL = 1e-10, 1e-12


@pytest.fixture(scope="module")
def ref() -> dict[str, np.ndarray]:
    with np.load(FIXTURE, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def close(actual, expected):
    np.testing.assert_allclose(to_numpy(actual), expected, rtol=RTOL, atol=ATOL)


def test_sequence_logprob_matches_pytorch(ref, device):
    xp = get_xp(device)
    seq = SequenceLogProb()
    logp = seq.forward(to_device(ref["seq/logits"], xp), to_device(ref["seq/targets"], xp),
                       to_device(ref["seq/mask"], xp))
    assert logp.shape == (3,) and logp.dtype == np.float64
    close(logp, ref["seq/logp"])
    close(seq.backward(to_device(ref["seq/d"], xp)), ref["seq/grad/logits"])


def test_dpo_matches_pytorch(ref, device):
    xp = get_xp(device)
    on = lambda key: to_device(ref[key], xp)  # noqa: E731
    B = 3
    seq, dpo = SequenceLogProb(), DPOLoss(beta=float(ref["dpo/beta"]))
    logp = seq.forward(on("dpo/logits"), on("dpo/targets"), on("dpo/mask"))  # (2B,)
    close(logp[:B], ref["dpo/policy_chosen"])
    close(logp[B:], ref["dpo/policy_rejected"])
    loss = dpo.forward(logp[:B], logp[B:], on("dpo/ref")[:B], on("dpo/ref")[B:])
    assert isinstance(loss, float)
    np.testing.assert_allclose(loss, ref["dpo/loss"], rtol=RTOL)
    close(dpo.chosen_rewards, ref["dpo/chosen_rewards"])
    close(dpo.rejected_rewards, ref["dpo/rejected_rewards"])
    d_chosen, d_rejected = dpo.backward()
    close(d_chosen, ref["dpo/grad/policy_chosen"])
    close(d_rejected, ref["dpo/grad/policy_rejected"])
    # ...and on through SequenceLogProb to the logits
    close(seq.backward(xp.concatenate([d_chosen, d_rejected])), ref["dpo/grad/logits"])


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_dpo_is_finite_at_extreme_margins(ref, device, dtype):
    """beta * margin = -1e4 .. 1e4: exp overflows there, logaddexp does not."""
    xp = get_xp(device)
    arrays = [to_device(ref[f"dpo_extreme/{k}"].astype(dtype), xp) for k in (
        "policy_chosen", "policy_rejected", "ref_chosen", "ref_rejected")]
    dpo = DPOLoss(beta=float(ref["dpo_extreme/beta"]))
    # not even an intermediate overflow (exp(-1e4) underflowing to 0 is the right answer)
    with np.errstate(over="raise", divide="raise", invalid="raise"):
        loss = dpo.forward(*arrays)
        d_chosen, d_rejected = (to_numpy(d) for d in dpo.backward())
    assert np.isfinite(loss) and np.all(np.isfinite(d_chosen)) and np.all(np.isfinite(d_rejected))
    tol = dict(rtol=RTOL, atol=ATOL) if dtype == "float64" else dict(rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(loss, ref["dpo_extreme/loss"], **tol)
    np.testing.assert_allclose(d_chosen, ref["dpo_extreme/grad/policy_chosen"], **tol)
    np.testing.assert_allclose(d_rejected, ref["dpo_extreme/grad/policy_rejected"], **tol)
    # z = -1e4: loss 1e4 and the full gradient -beta/B; z = +1e4: nothing left to learn
    assert d_chosen[0] == pytest.approx(-0.5 / 5) and d_chosen[-1] == 0.0
    np.testing.assert_array_equal(d_rejected, -d_chosen)


def test_dpo_reports_rewards_and_accuracy():
    dpo = DPOLoss(beta=0.5)
    pc, pr = np.array([-1.0, -2.0, -3.0, -4.0]), np.array([-2.0, -1.0, -5.0, -4.0])
    rc = rr = np.zeros(4)
    loss = dpo.forward(pc, pr, rc, rr)
    np.testing.assert_allclose(dpo.chosen_rewards, 0.5 * pc)
    np.testing.assert_allclose(dpo.rejected_rewards, 0.5 * pr)
    assert dpo.accuracy == 0.5  # pairs 0 and 2 prefer the chosen response; a tie does not count
    assert dpo.reward_margin == pytest.approx(0.5 * np.mean(pc - pr))
    assert loss == pytest.approx(np.mean(np.log1p(np.exp(-0.5 * (pc - pr)))))
    assert repr(dpo) == "DPOLoss(beta=0.5)"
    # at z = 0 the loss is log 2 and each pair's gradient is -beta / (2B)
    dpo.forward(pc, pc, rc, rr)
    assert dpo.accuracy == 0.0 and dpo.reward_margin == 0.0
    d_chosen, d_rejected = dpo.backward(2.0)  # an upstream factor scales both
    np.testing.assert_allclose(d_chosen, np.full(4, -2.0 * 0.5 / 8))
    np.testing.assert_allclose(d_rejected, -d_chosen)


def test_sequence_logprob_is_minus_the_summed_cross_entropy(device):
    """With every token counted, sum_b out[b] = -N * SoftmaxCrossEntropy (its mean)."""
    xp = get_xp(device)
    rng = np.random.default_rng(0)
    logits = to_device(rng.standard_normal((2, 4, 7)) * 3, xp)
    targets = to_device(rng.integers(0, 7, (2, 4)), xp)
    ones = xp.ones((2, 4), dtype=bool)
    total = float(SequenceLogProb().forward(logits, targets, ones).sum())
    assert total == pytest.approx(-8 * SoftmaxCrossEntropy().forward(logits, targets), rel=1e-12)
    huge = logits * 1e3  # the row max keeps the softmax finite
    assert np.all(np.isfinite(to_numpy(SequenceLogProb().forward(huge, targets, ones))))


def test_masked_positions_are_not_read(device):
    xp = get_xp(device)
    logits = to_device(np.random.default_rng(1).standard_normal((1, 3, 4)), xp)
    mask = to_device(np.array([[0.0, 1.0, 1.0]]), xp)
    seq = SequenceLogProb()
    a = seq.forward(logits, to_device(np.array([[-100, 2, 3]]), xp), mask)
    b = seq.forward(logits, to_device(np.array([[1, 2, 3]]), xp), mask)
    assert float(a[0]) == float(b[0])
    dlogits = to_numpy(seq.backward(to_device(np.ones(1), xp)))
    assert np.all(dlogits[0, 0] == 0.0)  # the prompt gets no gradient


def test_errors():
    seq = SequenceLogProb()
    logits = np.zeros((2, 3, 4))
    with pytest.raises(ValueError, match=r"must have shape \(2, 3\)"):
        seq.forward(logits, np.zeros((2, 4), dtype=int), np.ones((2, 3)))
    with pytest.raises(TypeError, match="integer token ids"):
        seq.forward(logits, np.zeros((2, 3)), np.ones((2, 3)))
    with pytest.raises(ValueError, match="target 4 under a nonzero mask"):
        seq.forward(logits, np.full((2, 3), 4), np.ones((2, 3)))
    with pytest.raises(RuntimeError, match="without a matching forward"):
        seq.backward(np.ones(2))
    with pytest.raises(ValueError, match="beta must be > 0"):
        DPOLoss(beta=0.0)
    with pytest.raises(ValueError, match="four"):
        DPOLoss().forward(np.zeros(2), np.zeros(3), np.zeros(2), np.zeros(2))
    with pytest.raises(RuntimeError, match="without a matching forward"):
        DPOLoss().backward()
