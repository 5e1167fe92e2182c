"""Sequence log-probabilities and the DPO loss (Rafailov et al. 2023), hand-differentiated.

Preference tuning compares whole responses: for a prompt x with a chosen response
y_w and a rejected one y_l, the policy's log-probability of a response is the sum of
its tokens' log-probabilities (`SequenceLogProb`), and DPO pushes the policy's
log-ratio against a frozen reference model up for y_w and down for y_l:

    z    = beta * ((log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l)))
    loss = mean over pairs of -log sigmoid(z) = softplus(-z)

The gradients are derived in docs/backprop.md ("Sequence log-probabilities and DPO").
"""

from __future__ import annotations

from tinylm.backend import xp_of
from tinylm.nn.module import Module


class SequenceLogProb(Module):
    """`forward(logits (B,T,V), targets (B,T), mask (B,T)) -> (B,)`; `backward(d (B,)) -> dlogits`.

    out[b] = sum_t mask[b,t] * log softmax(logits[b,t])[targets[b,t]]: the summed
    log-probability of the masked target tokens, e.g. a response's tokens after its
    prompt. As for SoftmaxCrossEntropy, targets[b,t] is the token that logits[b,t]
    predicts (the input ids shifted by one). `mask` is 0/1 (bool or float; a float
    mask weights the tokens); targets under mask 0 are not read (any value, e.g. -100).

    Cache: the softmax probabilities p (N, V), the safe targets (N,), the mask (N,)
    in the logits' dtype and the logits' shape. No parameters.
    """

    def forward(self, logits, targets, mask):
        xp = xp_of(logits)
        if logits.ndim != 3:
            raise ValueError(f"logits must be (B, T, V), got shape {logits.shape}")
        if targets.shape != logits.shape[:-1] or mask.shape != logits.shape[:-1]:
            raise ValueError(f"targets and mask must have shape {logits.shape[:-1]} to match "
                             f"logits {logits.shape}, got {targets.shape} and {mask.shape}")
        if targets.dtype.kind not in "iu":
            raise TypeError(f"targets must be integer token ids, got dtype {targets.dtype}")
        B, T, V = logits.shape
        z = logits.reshape(-1, V)  # (N, V)
        y = targets.reshape(-1)  # (N,)
        m = mask.reshape(-1).astype(logits.dtype)  # (N,) token weights, 0 = not counted
        counted = m != 0  # (N,) bool
        bad = counted & ((y < 0) | (y >= V))
        if bool(bad.any()):
            raise ValueError(f"target {int(y[xp.argmax(bad)])} under a nonzero mask is "
                             f"outside [0, {V})")
        y_safe = xp.where(counted, y, 0)  # masked rows read column 0, then get weight 0
        # log-softmax, stabilised by the row max (log-sum-exp); p is kept for backward
        shifted = z - z.max(axis=-1, keepdims=True)  # (N, V)
        p = xp.exp(shifted)  # (N, V) unnormalised
        sumexp = p.sum(axis=-1, keepdims=True)  # (N, 1)
        logp = shifted[xp.arange(len(y)), y_safe] - xp.log(sumexp[:, 0])  # (N,)
        p /= sumexp  # (N, V) probabilities
        self._cache = (p, y_safe, m, logits.shape)
        return (logp * m).reshape(B, T).sum(axis=1)  # (B,)

    def backward(self, dout):
        p, y, m, shape = self._take_cache()
        xp = xp_of(p)
        B, T, V = shape
        N = p.shape[0]
        # d log p[y] / dz = onehot(y) - p; each row's share is d[b] * mask[b, t]
        dz = -p  # (N, V), a new buffer
        dz[xp.arange(N), y] += 1.0
        w = xp.repeat(dout.astype(p.dtype), T) * m  # (N,) row weights d[b] * mask[b, t]
        dz *= w[:, None]
        return dz.reshape(shape)  # (B, T, V)


class DPOLoss(Module):
    """`forward(policy_chosen, policy_rejected, ref_chosen, ref_rejected) -> float`;
    `backward(dloss=1.0) -> (d_policy_chosen, d_policy_rejected)`.

    Inputs are (B,) sequence log-probabilities (from SequenceLogProb). The loss is
    mean_b softplus(-z_b) with z = beta * ((pc - rc) - (pr - rr)), computed as
    logaddexp(0, -z): finite for any margin. The reference model is frozen, so its
    log-probabilities get no gradient.

    After a forward, for logging: `chosen_rewards` = beta * (pc - rc) and
    `rejected_rewards` = beta * (pr - rr), (B,) arrays on the inputs' device;
    `reward_margin` their mean difference (float); `accuracy` the fraction of pairs
    whose chosen reward is higher (float).

    Cache: the margins z (B,). No parameters.
    """

    def __init__(self, beta: float = 0.1):
        if not beta > 0:
            raise ValueError(f"DPO beta must be > 0, got {beta!r}")
        super().__init__()
        self.beta = float(beta)
        self.chosen_rewards = self.rejected_rewards = None
        self.reward_margin = self.accuracy = float("nan")

    def extra_repr(self) -> str:
        return f"beta={self.beta:g}"

    def forward(self, policy_chosen, policy_rejected, ref_chosen, ref_rejected) -> float:
        xp = xp_of(policy_chosen)
        shapes = {a.shape for a in (policy_chosen, policy_rejected, ref_chosen, ref_rejected)}
        if len(shapes) != 1 or policy_chosen.ndim != 1:
            raise ValueError(f"DPOLoss expects four (B,) arrays of the same shape, got "
                             f"{[tuple(s) for s in shapes]}")
        self.chosen_rewards = self.beta * (policy_chosen - ref_chosen)  # (B,)
        self.rejected_rewards = self.beta * (policy_rejected - ref_rejected)  # (B,)
        z = self.chosen_rewards - self.rejected_rewards  # (B,) the margins
        self.reward_margin = float(z.mean())
        self.accuracy = float((z > 0).mean())
        self._cache = z
        # -log sigmoid(z) = log(1 + exp(-z)) = logaddexp(0, -z): no overflow at z = -1e4,
        # no log(0) at z = +1e4
        return float(xp.logaddexp(0.0, -z).mean())

    def backward(self, dloss=1.0):
        z = self._take_cache()
        xp = xp_of(z)
        # d softplus(-z)/dz = -sigmoid(-z); sigmoid(-z) = exp(-logaddexp(0, z)) stays in [0, 1]
        # for any z (1 / (1 + exp(z)) would overflow exp at z = 1e4); the mean brings 1/B
        dz = -xp.exp(-xp.logaddexp(0.0, z)) * (float(dloss) / z.shape[0])  # (B,)
        # z = beta * (pc - rc) - beta * (pr - rr)
        return self.beta * dz, -self.beta * dz  # (B,), (B,)
