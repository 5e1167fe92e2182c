"""Check every layer's backward against finite differences (float64).

For a layer y = f(x; params) pick a random upstream gradient G with y's shape
and look at the scalar s = sum(y * G). Its gradient with respect to anything is
exactly what `backward(G)` returns (for x) or adds into `grads` (for params).
Central differences estimate the same numbers independently:

    ds/dx[i] ~ (s(x + eps e_i) - s(x - eps e_i)) / (2 eps)        error O(eps^2)

Small tensors are checked element by element; large ones at a sample of
elements plus a few random unit directions u, comparing the directional
derivative (s(x + eps u) - s(x - eps u)) / (2 eps) with <grad, u>.
The report gives, per tensor, the largest relative error and where it is.

`tinylm gradcheck` runs the whole suite (every layer, the GPT-2 model and the
modern variants: RoPE, RMSNorm, SwiGLU, GQA, sliding windows, MoE) and exits
with status 1 if anything fails.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass

import numpy as np

from tinylm.backend import get_xp, to_device, to_numpy, xp_of
from tinylm.nn.activation import seed_dropout

DEFAULT_EPS = 1e-5  # balances truncation (eps^2) against rounding (1e-16/eps) in float64
DEFAULT_TOL = 1e-5  # correct code gives 1e-10..3e-7 here; a wrong gradient gives >1e-2
NOISE_FLOOR = 1e-4  # entries smaller than this x |f| are compared absolutely (see below)


@dataclass
class GradcheckResult:
    """How one tensor's analytic gradient compares with finite differences."""

    name: str  # e.g. "blocks.0.attn.qkv.weight" or "input"
    max_rel_error: float
    worst: tuple  # index (elementwise) or ("direction", k) with the largest error
    n_checked: int  # elements or directions compared
    method: str  # "elementwise" or "sampled+directions"
    tol: float

    @property
    def passed(self) -> bool:
        return bool(self.max_rel_error <= self.tol)  # NaN fails


def _rel_error(a: float, n: float, floor: float) -> float:
    return abs(a - n) / max(abs(a), abs(n), floor)


def compare_gradient(f, x, analytic, *, name: str, rng: np.random.Generator, f_scale: float,
                     eps=DEFAULT_EPS, tol=DEFAULT_TOL, max_elementwise=128, n_samples=24,
                     n_directions=4):
    """Compare `analytic` (x's gradient) with central differences of the scalar f().

    `x` is perturbed in place and always restored; `f` must read x's current
    values. `f_scale` is the size of the terms summed into f: rounding makes
    each difference quotient uncertain by about 1e-16 * f_scale / eps, so
    gradient entries below NOISE_FLOOR * f_scale (e.g. exact zeros such as the
    key bias's gradient, or masked positions) are compared absolutely.
    """
    xp = xp_of(x)
    a_host = to_numpy(analytic).astype(np.float64)  # (x.shape)
    floor = max(NOISE_FLOOR * f_scale, 1e-300)
    worst_err, worst_at = 0.0, ()

    def central(perturb):
        perturb(+eps)
        f_plus = f()
        perturb(-2 * eps)
        f_minus = f()
        perturb(+eps)  # restore (to rounding; the original is re-assigned below anyway)
        return (f_plus - f_minus) / (2 * eps)

    if x.size <= max_elementwise:
        indices = list(np.ndindex(*x.shape))
        method = "elementwise"
    else:  # a sample of single elements, then random directions
        flat = rng.choice(x.size, size=min(n_samples, x.size), replace=False)
        indices = [np.unravel_index(i, x.shape) for i in flat]
        method = "sampled+directions"

    for index in indices:
        original = x[index].copy() if xp is not np else x[index]

        def perturb(delta, index=index):
            x[index] += delta

        numeric = central(perturb)
        x[index] = original
        err = _rel_error(a_host[index], numeric, floor)
        if not err <= worst_err:  # also catches NaN
            worst_err, worst_at = err, tuple(int(i) for i in index)
            if math.isnan(err):
                break

    if method != "elementwise":
        original = x.copy()
        for k in range(n_directions):
            u = rng.standard_normal(x.shape)
            u /= np.linalg.norm(u)
            u_dev = to_device(u.astype(x.dtype), xp)

            def perturb(delta, u_dev=u_dev):
                x[...] += delta * u_dev

            numeric = central(perturb)
            x[...] = original
            err = _rel_error(float((a_host * u).sum()), numeric, floor)
            if not err <= worst_err:
                worst_err, worst_at = err, ("direction", k)
        n_checked = len(indices) + n_directions
    else:
        n_checked = len(indices)
    return GradcheckResult(name, worst_err, worst_at, n_checked, method, tol)


def check_layer(layer, *inputs, seed=0, eps=DEFAULT_EPS, tol=DEFAULT_TOL, check_inputs=True,
                **compare_kw) -> list[GradcheckResult]:
    """Gradient-check `layer.backward` for its parameters and its float input.

    Works for any object with the layer interface (forward/backward/params/grads,
    `parameters()`), including losses whose forward returns a float. Dropout
    inside the layer is held fixed by restarting its mask stream before every
    forward. Everything should be float64.

    Layers with an auxiliary loss inside (MoE) add it to the objective, and their
    backward adds its gradient: then s = sum(y * G) + the aux losses.
    """
    rng = np.random.default_rng(seed)
    has_dropout = hasattr(layer, "modules")

    def forward():
        if has_dropout:
            seed_dropout(layer, seed)
        return layer.forward(*inputs)

    out = forward()
    scalar_out = isinstance(out, float)
    if scalar_out:
        G = 1.0 + rng.random()  # a random scalar upstream gradient
    else:
        G = to_device(rng.standard_normal(out.shape).astype(out.dtype), xp_of(out))  # (out.shape)

    def f() -> float:
        y = forward()
        aux = sum(m.aux_loss for m in layer.aux_layers()) if has_dropout else 0.0
        return (float(y) * G if scalar_out else float((y * G).sum())) + aux

    f_scale = abs(float(out) * G) if scalar_out else float(abs(out * G).sum())

    # the analytic gradients, from one forward/backward
    for _, _, g in layer.parameters():
        g.fill(0)
    forward()
    dx = layer.backward(G)
    results = []
    if check_inputs:
        float_inputs = [x for x in inputs if getattr(x, "dtype", np.dtype(int)).kind == "f"]
        if float_inputs:
            results.append(compare_gradient(f, float_inputs[0], dx, name="input", rng=rng,
                                            f_scale=f_scale, eps=eps, tol=tol, **compare_kw))
    grads = {name: g.copy() for name, _, g in layer.parameters()}
    for name, p, _ in layer.parameters():
        results.append(compare_gradient(f, p, grads[name], name=name, rng=rng, f_scale=f_scale,
                                        eps=eps, tol=tol, **compare_kw))
    return results


def check_model(model, idx, targets, loss_fn, *, seed=0, eps=DEFAULT_EPS, tol=DEFAULT_TOL,
                **compare_kw) -> list[GradcheckResult]:
    """Gradient-check a whole GPT: s = loss_fn(model(idx), targets) + model.aux_loss
    (the MoE load-balancing loss, 0 without experts), every parameter."""
    rng = np.random.default_rng(seed)

    def f() -> float:
        model.seed_dropout(seed)
        loss = loss_fn.forward(model.forward(idx), targets)
        return loss + model.aux_loss

    model.zero_grad()
    f_scale = abs(f())
    model.backward(loss_fn.backward())
    grads = {name: g.copy() for name, _, g in model.parameters()}
    return [compare_gradient(f, p, grads[name], name=name, rng=rng, f_scale=f_scale, eps=eps,
                             tol=tol, **compare_kw)
            for name, p, _ in model.parameters()]


def randomize_params(layer, rng: np.random.Generator, scale: float = 0.3) -> None:
    """Move every parameter away from its initial value (LayerNorm 1/0, zero biases),
    so that the check sees non-trivial gradients everywhere."""
    for _, p, _ in layer.parameters():
        noise = rng.standard_normal(p.shape) * scale
        p += to_device(noise.astype(p.dtype), xp_of(p))


# ---------------------------------------------------------------------------
# The suite behind `tinylm gradcheck` (tests use the same cases)
# ---------------------------------------------------------------------------


def suite_cases(device: str = "cpu"):
    """(label, thunk) pairs; each thunk builds a float64 case and returns its results.
    The cases are in tinylm/gradcheck_suite.py."""
    from tinylm.gradcheck_suite import suite_cases as cases  # it imports this module

    return cases(device)


def run_suite(device: str = "cpu", only: str | None = None):
    """Yield (label, results, seconds) for every case of the suite."""
    for label, thunk in suite_cases(device):
        if only and only.lower() not in label.lower():
            continue
        start = time.perf_counter()
        results = thunk()
        yield label, results, time.perf_counter() - start


# -- the command line ------------------------------------------------------


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"],
                        help="where to run the checks (default: cpu)")
    parser.add_argument("--only", metavar="TEXT",
                        help="check only the cases whose name contains TEXT (e.g. 'GPT')")
    parser.add_argument("--verbose", "-v", action="store_true",
                        help="one row per tensor instead of one row per layer")


def run(args) -> int:
    from tinylm.backend import resolve_device

    device = resolve_device(args.device)
    get_xp(device)  # fail now, with the install hint, if CUDA is not usable
    print(f"tinylm gradcheck: float64 central differences (eps={DEFAULT_EPS:g}, "
          f"tol={DEFAULT_TOL:g}) on {device}")
    header = f"{'case':<44} {'tensor':<32} {'checked':>7} {'max rel err':>12}  status"
    print(header)
    print("-" * len(header))
    n_failed = n_cases = 0
    for label, results, _seconds in run_suite(device, args.only):
        n_cases += 1
        failed = [r for r in results if not r.passed]
        n_failed += bool(failed)
        if args.verbose:
            for r in results:
                print(_row(label, r.name, r.n_checked, r))
        else:  # one row per case: its worst tensor
            worst = max(results, key=lambda r: (math.isnan(r.max_rel_error), r.max_rel_error))
            print(_row(label, worst.name, sum(r.n_checked for r in results), worst))
            for r in failed:
                if r is not worst:
                    print(_row("", r.name, r.n_checked, r))
    if n_cases == 0:
        raise ValueError(f"no gradcheck case matches --only {args.only!r}")
    print("-" * len(header))
    print(f"{n_cases - n_failed} passed, {n_failed} failed")
    return 1 if n_failed else 0


def _row(label: str, tensor: str, checked: int, r: GradcheckResult) -> str:
    status = "ok" if r.passed else f"FAIL (worst at {r.worst})"
    return f"{label:<44} {tensor:<32} {checked:>7} {r.max_rel_error:>12.2e}  {status}"
