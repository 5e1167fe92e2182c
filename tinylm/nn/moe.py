"""A mixture-of-experts MLP: a softmax router sends each token to its top-k experts.

(Shazeer et al. 2017; Switch Transformer, Fedus et al. 2021; Mixtral, Jiang et
al. 2024.) Instead of one MLP, E of them ("experts"); each token uses only k,
so the parameters grow E-fold while the compute per token grows k-fold.

For one token x (C,), with router weights W_r (C, E):

    r = x W_r                         (E,)  router logits
    p = softmax(r)                    (E,)  router probabilities
    S = top-k indices of p            (k,)  the experts this token uses
    w_s = p_s / sum_{j in S} p_j      (k,)  gate weights (renormalised, as Mixtral)
    y = sum_{s in S} w_s expert_s(x)  (C,)

The choice of S is a step function of x: it has no gradient, and finite
differences see none as long as no two probabilities tie. The router learns
through the gate weights w, which multiply the experts' outputs, when k >= 2.
(With k = 1 the renormalised weight is w = p / p = 1, so only the aux loss
below trains the router; the Switch Transformer gates with the plain p instead.)

Left alone, a router collapses onto a few experts (they get better, so they
get chosen more). The load-balancing loss (Switch Transformer, eq. 4; the
`load_balancing_loss_func` of Hugging Face's Mixtral) pushes back:

    f_e = (tokens that chose e) / N       fraction of the N tokens routed to e (sums to k)
    P_e = mean over tokens of p_e         mean router probability of e
    aux = coef * E * sum_e f_e P_e

It equals coef * k whenever the load is balanced (every f_e = k/E), and grows
when the tokens crowd onto experts that also get high probabilities. f is a
count (no gradient), so
d aux / d p[n, e] = coef * E * f_e / N: experts that are used a lot have their
probabilities pushed down.
"""

from __future__ import annotations

from tinylm.backend import xp_of
from tinylm.nn.functional import softmax
from tinylm.nn.linear import Linear
from tinylm.nn.mlp import make_mlp
from tinylm.nn.module import Module, init_rng


class MoE(Module):
    """`router` = Linear(C, E, bias=False) and `experts.{e}`, E MLPs of kind `kind`
    ("gelu", "relu" or "swiglu"). After `forward`, `aux_loss` (a float) is this
    layer's load-balancing loss, already multiplied by `aux_loss_coef`;
    `backward(dout)` adds `aux_grad` (default 1.0) times its gradient, so the
    objective whose gradient it computes is (the loss above) + aux_grad * aux_loss
    (`has_aux_loss` is how a model finds such layers: see Module), and
    `choices` (N, k) are the experts each token was sent to, best first (both
    kept after backward, for plots and logs).

    Cache: p (N, E), the top-k indices (N, k), the gate weights w (N, k), the load
    fractions f (E,), each expert's tokens and output, and the input shape (each
    expert keeps its own input for its backward).
    """

    has_aux_loss = True

    def __init__(self, d_model: int, n_experts: int, experts_per_token: int = 2, *,
                 kind: str = "gelu", hidden: int | None = None, aux_loss_coef: float = 0.01,
                 bias: bool = True, dropout: float = 0.0, rng=None):
        super().__init__()
        if not 1 <= experts_per_token <= n_experts:
            raise ValueError(f"experts_per_token must be in [1, n_experts={n_experts}], "
                             f"got {experts_per_token}")
        rng = init_rng(rng)
        self.d_model, self.n_experts, self.k = d_model, n_experts, experts_per_token
        self.aux_loss_coef = float(aux_loss_coef)
        self.router = Linear(d_model, n_experts, bias=False, rng=rng)
        self.experts = [make_mlp(kind, d_model, hidden, bias=bias, dropout=dropout, rng=rng)
                        for _ in range(n_experts)]
        self.aux_loss = 0.0  # the load-balancing loss of the last forward
        self.aux_grad = 1.0  # its upstream gradient in backward (a model may set 1/k)
        self.choices = None  # (N, k) expert ids of the last forward

    def extra_repr(self) -> str:
        return f"experts={self.n_experts}, per_token={self.k}"

    def forward(self, x):
        xp = xp_of(x)
        shape, C, E, k = x.shape, self.d_model, self.n_experts, self.k
        x2 = x.reshape(-1, C)  # (N, C) every token on its own
        N = x2.shape[0]
        r = self.router.forward(x2)  # (N, E) router logits
        p = softmax(r)  # (N, E) router probabilities
        top = xp.argsort(-p, axis=-1, kind="stable")[:, :k]  # (N, k) chosen experts, best first
        token = xp.arange(N)[:, None]  # (N, 1) row index for the (N, k) gather
        p_top = p[token, top]  # (N, k) their probabilities
        w = p_top / p_top.sum(axis=-1, keepdims=True)  # (N, k) gate weights, rows sum to 1

        y = xp.zeros_like(x2)  # (N, C)
        outputs = []  # per expert: (rows, slots, output) for the tokens it got
        for e, expert in enumerate(self.experts):
            rows, slots = xp.nonzero(top == e)  # (n_e,) each: token n picked e in slot s
            if rows.size == 0:
                outputs.append(None)  # no token chose e: it is not run, nor in backward
                continue
            out = expert.forward(x2[rows])  # (n_e, C)
            y[rows] += w[rows, slots][:, None] * out  # rows are distinct: a plain += is safe
            outputs.append((rows, slots, out))

        # load balancing: f_e (E,) fraction of tokens routed to e; P_e (E,) mean probability
        f = xp.zeros(E, dtype=p.dtype)
        for e, o in enumerate(outputs):
            if o is not None:
                f[e] = o[0].size / N
        P = p.mean(axis=0)  # (E,)
        self.aux_loss = self.aux_loss_coef * E * float((f * P).sum())
        self.choices = top
        self._cache = (p, top, w, f, outputs, shape)
        return y.reshape(shape)

    def backward(self, dout):
        p, top, w, f, outputs, shape = self._take_cache()
        xp = xp_of(dout)
        C, E = self.d_model, self.n_experts
        dy = dout.reshape(-1, C)  # (N, C)
        N = dy.shape[0]

        # y[n] = sum_s w[n, s] out_s[n]  =>  dout_s = w dy,  dw[n, s] = <dy[n], out_s[n]>
        dx = xp.zeros_like(dy)  # (N, C)
        dw = xp.zeros_like(w)  # (N, k)
        for expert, o in zip(self.experts, outputs, strict=True):
            if o is None:
                continue
            rows, slots, out = o
            dy_e = dy[rows]  # (n_e, C)
            dw[rows, slots] = (dy_e * out).sum(axis=-1)  # (n_e,)
            dx[rows] += expert.backward(w[rows, slots][:, None] * dy_e)  # x forks into experts

        # w = p_top / sum(p_top)  =>  dp_top = (dw - sum_s dw_s w_s) / sum(p_top)
        token = xp.arange(N)[:, None]  # (N, 1) row index for the (N, k) gathers
        p_top = p[token, top]  # (N, k)
        dp_top = (dw - (dw * w).sum(axis=-1, keepdims=True)) / p_top.sum(axis=-1, keepdims=True)
        dp = xp.zeros_like(p)  # (N, E): only the chosen experts' probabilities were used...
        dp[token, top] = dp_top  # (a token's k experts are distinct: no collisions)
        # ...and every probability is in the aux loss: d aux / d p[n, e] = coef E f_e / N
        dp += (self.aux_grad * self.aux_loss_coef * E / N) * f  # (E,) broadcast over tokens

        # p = softmax(r)  =>  dr = p * (dp - sum_e dp_e p_e)
        dr = p * (dp - (dp * p).sum(axis=-1, keepdims=True))  # (N, E)
        dx += self.router.backward(dr)  # the router is the other use of x
        return dx.reshape(shape)
