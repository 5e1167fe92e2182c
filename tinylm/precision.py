"""Number formats for training: rounding to float16/bfloat16, loss scaling, and the
mixed-precision recipe (float32 master weights, low-precision compute).

    round_to(x, "fp16" | "bf16")   float32 array holding the nearest value of that format
    LossScaler()                   dynamic loss scaling, the arithmetic of torch.amp.GradScaler
    MixedPrecision("bf16")         the recipe: rounds weights and Linear activations/gradients

The three formats (1 sign bit, then exponent and stored fraction bits):

    fp32  8 exponent bits, 23 fraction bits   max 3.4e38   eps 2^-23 (1.2e-7)
    fp16  5 exponent bits, 10 fraction bits   max 65504    eps 2^-10 (9.8e-4)
    bf16  8 exponent bits,  7 fraction bits   max 3.4e38   eps 2^-7  (7.8e-3)

fp16 has the finer grid but the narrow range: gradients smaller than its smallest
subnormal (2^-24, 6e-8) become 0, which loss scaling prevents by multiplying the
loss (and so every gradient) by a large factor first. bf16 is float32 with the
last 16 bits dropped: the same range, no loss scaling needed, a coarser grid.

NumPy has no fast float16 matmul on the CPU and no bfloat16 at all, so the
low-precision compute here is *emulated*: the operands are rounded to the format
and stored in float32 arrays, and the matmuls accumulate in float32, which is
what a GPU tensor core does with them (the product of two fp16 numbers, 11 bits
times 11 bits, is exact in float32's 24 bits). The numbers are the low-precision
ones; only the speed is not. docs/precision.md says exactly where rounding happens.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import numpy as np

from tinylm.backend import xp_of
from tinylm.nn.linear import Linear

__all__ = ["FORMATS", "FloatFormat", "LossScaler", "MixedPrecision", "format_info", "round_to"]


@dataclass(frozen=True)
class FloatFormat:
    """A binary floating-point format: 1 sign bit, `exponent_bits`, `mantissa_bits`
    stored fraction bits (the leading 1 of a normal number is implicit)."""

    name: str
    exponent_bits: int
    mantissa_bits: int

    @property
    def bits(self) -> int:
        return 1 + self.exponent_bits + self.mantissa_bits

    @property
    def bias(self) -> int:
        return 2 ** (self.exponent_bits - 1) - 1  # stored exponent = true exponent + bias

    @property
    def max(self) -> float:
        """The largest finite value: all fraction bits set, largest exponent."""
        return (2.0 - 2.0 ** -self.mantissa_bits) * 2.0 ** self.bias

    @property
    def min_normal(self) -> float:
        return 2.0 ** (1 - self.bias)

    @property
    def min_subnormal(self) -> float:
        """The smallest value above 0; anything below half of it rounds to 0."""
        return 2.0 ** (1 - self.bias - self.mantissa_bits)

    @property
    def eps(self) -> float:
        """The gap between 1 and the next value: relative rounding error <= eps / 2."""
        return 2.0 ** -self.mantissa_bits


FORMATS = {
    "fp32": FloatFormat("fp32", 8, 23),
    "fp16": FloatFormat("fp16", 5, 10),  # IEEE binary16
    "bf16": FloatFormat("bf16", 8, 7),  # Google Brain's bfloat16: float32's top 16 bits
}


def format_info(fmt: str) -> FloatFormat:
    """The FloatFormat of "fp32", "fp16" or "bf16"."""
    try:
        return FORMATS[fmt]
    except (KeyError, TypeError):
        raise ValueError(f"precision must be one of {tuple(FORMATS)}, got {fmt!r}") from None


# ---------------------------------------------------------------------------
# Rounding
# ---------------------------------------------------------------------------


def round_to(x, fmt: str):
    """The nearest value of format `fmt` ("fp16", "bf16"; "fp32" too) to each element of
    `x`, as a float32 array: round to nearest, ties to even, overflow to +-inf as IEEE
    (a value at least max + half a step away from 0), gradual underflow, NaN stays NaN.
    Both formats are rounded by hand on float32 bits (_round_fp16, _round_bf16).

    float64 inputs are rounded once, not to float32 by nearest first (see
    _to_float32_odd): rounding twice can land on the wrong side of a tie."""
    format_info(fmt)
    if not hasattr(x, "dtype"):  # a Python number or list
        x = np.asarray(x, dtype=np.float64)
    xp = xp_of(x)
    with np.errstate(over="ignore", invalid="ignore"):  # overflow to inf is the rule here
        if fmt == "fp32":
            return x.astype(xp.float32)
        # float64 inputs are first rounded to float32 *to odd*, see _to_float32_odd
        x32 = _to_float32_odd(x) if x.dtype == np.float64 else x.astype(xp.float32)  # a copy
        return _round_fp16(x32) if fmt == "fp16" else _round_bf16(x32)


def _round_bf16(x32):
    """bfloat16 rounding written out on the float32 bit pattern.

    A bf16 is the top 16 bits of a float32. To round to nearest, add just under half
    of the dropped part's weight (0x7FFF) plus the lowest kept bit (lsb), then drop
    the low 16 bits: a dropped part above 0x8000 carries into the kept bits (round up),
    one below does not, and exactly 0x8000 carries only when lsb is 1 (ties to even).
    The carry runs into the exponent when the fraction is all ones, which is right:
    it is the next power of two, and from the largest finite value it gives inf
    (0x7F7FFFFF -> 0x7F800000). Subnormals need no special case: their bit patterns
    are ordered like their values. Only NaN would go wrong (0x7FFFFFFF + 0x8000
    overflows into the sign), so NaN keeps its sign and gets the quiet bit instead.
    """
    xp = xp_of(x32)
    u = x32.view(xp.uint32)
    lsb = (u >> xp.uint32(16)) & xp.uint32(1)
    rounded = (u + xp.uint32(0x7FFF) + lsb) & xp.uint32(0xFFFF0000)
    quiet_nan = (u | xp.uint32(0x00400000)) & xp.uint32(0xFFFF0000)
    return xp.where(xp.isnan(x32), quiet_nan, rounded).view(xp.float32)


def _round_fp16(x32):
    """float16 rounding written out on float32 values (the float16 cast would do, but
    NumPy's takes a slow path for every subnormal result: 10x slower on gradients).

    fp16's normal numbers have 10 fraction bits, float32's 23: drop 13 bits with the
    bf16 trick (add 0x0FFF + lsb, clear the low 13 bits). Below fp16's smallest normal,
    2^-14, the grid is fixed: multiples of 2^-24. Adding 0.5 (whose float32 neighbours
    are 2^-24 apart) rounds |x| to that grid, to nearest even, and subtracting 0.5 again
    is exact. From 65520 up (max 65504 plus half a step, a tie that goes to the even
    neighbour 2^16) it is inf."""
    xp = xp_of(x32)
    u = x32.view(xp.uint32)
    lsb = (u >> xp.uint32(13)) & xp.uint32(1)
    normal = ((u + xp.uint32(0x0FFF) + lsb) & xp.uint32(0xFFFFE000)).view(xp.float32)
    a = xp.abs(x32)
    half = xp.float32(0.5)
    subnormal = xp.copysign((a + half) - half, x32)  # keeps -0.0 for tiny negatives
    out = xp.where(a < xp.float32(2.0**-14), subnormal, normal)
    out = xp.where(a >= xp.float32(65520.0), xp.copysign(xp.float32(xp.inf), x32), out)
    return xp.where(xp.isnan(x32), x32, out)  # NaN (and its bits) as it was


def _to_float32_odd(x):
    """float64 -> float32 rounded *to odd*: truncated toward zero, and the last bit set
    when that dropped anything. Rounding this to bf16 gives the correctly rounded bf16
    of the float64 (Boldo & Melquiond 2008: rounding to odd with at least 2 extra bits,
    here 24 - 8 = 16, makes the second rounding exact), while float64 -> float32 ->
    bf16 by nearest twice can turn 1 + 2^-8 + 2^-40 into 1 (a false tie) instead of 1 + 2^-7."""
    xp = xp_of(x)
    y = x.astype(xp.float32)  # nearest; values beyond float32's range give inf
    away = xp.abs(y.astype(xp.float64)) > xp.abs(x)  # rounded away from zero: step back
    y = xp.where(away, xp.nextafter(y, xp.float32(0)), y)
    inexact = y.astype(xp.float64) != x  # False for NaN (NaN != NaN is handled: isnan below)
    inexact &= ~xp.isnan(x)
    return (y.view(xp.uint32) | inexact.astype(xp.uint32)).view(xp.float32)


def _rounder(fmt: str):
    """x -> x rounded to `fmt`, in x's own dtype (float64 holds every fp16/bf16 value)."""
    return lambda a: round_to(a, fmt).astype(a.dtype, copy=False)


# ---------------------------------------------------------------------------
# Loss scaling
# ---------------------------------------------------------------------------


class LossScaler:
    """Dynamic loss scaling (Micikevicius et al. 2018), step for step the arithmetic of
    `torch.amp.GradScaler`:

        backward of (loss * scale)          every gradient is `scale` times too large, so
                                            small ones stay above fp16's underflow
        finite = unscale_(params)           divide the gradients by `scale`, check them
        if finite: clip, optimizer step     else: skip the step (the weights are unchanged)
        update(finite)

    `update` halves the scale (backoff_factor) after a step with an inf or NaN gradient
    and doubles it (growth_factor) after growth_interval finite steps in a row, so the
    scale hovers just below the largest value that does not overflow. With the
    default factors the scale stays a power of two, and dividing by it is exact.
    """

    def __init__(self, init_scale: float = 2.0**16, growth_factor: float = 2.0,
                 backoff_factor: float = 0.5, growth_interval: int = 2000):
        if not (init_scale > 0 and math.isfinite(init_scale)):
            raise ValueError(f"init_scale must be a finite number > 0, got {init_scale}")
        if not growth_factor > 1.0:
            raise ValueError(f"growth_factor must be > 1, got {growth_factor}")
        if not 0.0 < backoff_factor < 1.0:
            raise ValueError(f"backoff_factor must be in (0, 1), got {backoff_factor}")
        if not (isinstance(growth_interval, int) and growth_interval >= 1):
            raise ValueError(f"growth_interval must be an int >= 1, got {growth_interval!r}")
        self.scale = float(init_scale)
        self.growth_factor = float(growth_factor)
        self.backoff_factor = float(backoff_factor)
        self.growth_interval = growth_interval
        self.growth_tracker = 0  # finite steps since the last change of scale
        self.skipped = 0  # optimizer steps skipped because a gradient was not finite

    def unscale_(self, params) -> bool:
        """Divide every gradient of `params` ((name, param, grad) triples) by `scale`, in
        place; True when all of them are finite (the optimizer step may go ahead)."""
        finite = None
        for _, _, g in params:
            g /= self.scale
            ok = xp_of(g).isfinite(g).all()  # stays on the device: one sync at the end
            finite = ok if finite is None else finite & ok
        return True if finite is None else bool(finite)

    def update(self, finite: bool) -> None:
        """After each step: back off after an overflow, grow after growth_interval good steps."""
        if not finite:
            self.scale *= self.backoff_factor
            self.growth_tracker = 0
            self.skipped += 1
            return
        self.growth_tracker += 1
        if self.growth_tracker == self.growth_interval:
            grown = self.scale * self.growth_factor
            if math.isfinite(grown):  # as torch: never grow into inf
                self.scale = grown
            self.growth_tracker = 0

    def state_dict(self) -> dict:
        """JSON-ready: the scale, the counters and the factors."""
        return {"scale": self.scale, "growth_factor": self.growth_factor,
                "backoff_factor": self.backoff_factor, "growth_interval": self.growth_interval,
                "growth_tracker": self.growth_tracker, "skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        try:
            scale, tracker = float(state["scale"]), int(state["growth_tracker"])
            skipped = int(state.get("skipped", 0))
            factors = (float(state.get("growth_factor", self.growth_factor)),
                       float(state.get("backoff_factor", self.backoff_factor)),
                       int(state.get("growth_interval", self.growth_interval)))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"damaged loss scaler state ({type(exc).__name__}: {exc})") from None
        if not (scale > 0 and math.isfinite(scale)) or tracker < 0 or skipped < 0:
            raise ValueError(f"damaged loss scaler state: {state!r}")
        self.scale, self.growth_tracker, self.skipped = scale, tracker, skipped
        self.growth_factor, self.backoff_factor, self.growth_interval = factors

    def __repr__(self) -> str:
        return (f"LossScaler(scale={self.scale:g}, growth_tracker={self.growth_tracker}, "
                f"skipped={self.skipped})")


# ---------------------------------------------------------------------------
# The mixed-precision recipe
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class MixedPrecision:
    """The mixed-precision recipe: float32 master weights and AdamW state, compute in
    `precision`. Where the numbers are rounded to the format (all else is float32):

      1. weights: inside `compute(model)` every parameter holds its rounded value (the
         low-precision copy); the float32 master values come back on exit, and AdamW
         updates those
      2. every Linear layer (attention's qkv and proj, the MLP's, a MoE's router and
         experts, an untied head): its input and output in forward; in backward the
         incoming gradient, the outgoing gradient and the weight and bias gradients it
         adds (each a GEMM output in the format, added into the float32 .grad)
      3. the logits, and the gradient of the loss with respect to them
         (`forward_backward` does this: the tied head is computed inside GPT itself)

    Float32 throughout: the residual stream and the elementwise layers (GELU, dropout,
    residual adds, RoPE), attention's scores, softmax and weighted sum (from rounded q,
    k, v), the norms' statistics, the loss, gradient accumulation, clipping and AdamW.
    "fp32" rounds nothing: `compute` and `forward_backward` are then the plain model.
    """

    precision: str = "fp32"  # the compute format: "fp32", "fp16" or "bf16"

    def __post_init__(self):
        format_info(self.precision)

    @property
    def enabled(self) -> bool:
        return self.precision != "fp32"

    @property
    def needs_loss_scaling(self) -> bool:
        """fp16 only: bf16 has float32's exponent range, so its gradients do not underflow."""
        return self.precision == "fp16"

    def round(self, x):
        """`x` rounded to the compute format, in x's dtype (x itself for fp32)."""
        return _rounder(self.precision)(x) if self.enabled else x

    @contextlib.contextmanager
    def compute(self, model):
        """Inside: `model` computes in the low precision (rounding points 1 and 2 above).

        Run a forward and its backward inside one `with`; the optimizer step outside it,
        on the master weights restored on exit (also when an error is raised)."""
        if not self.enabled:
            yield model
            return
        rnd = _rounder(self.precision)
        params = [p for _, p, _ in model.parameters()]
        masters = [p.copy() for p in params]  # the float32 master weights
        linears = [m for m in model.modules() if isinstance(m, Linear)]
        try:
            for p in params:
                p[...] = rnd(p)  # in place: the optimizer's references stay valid
            for lin in linears:
                _hook_linear(lin, rnd)
            yield model
        finally:
            for lin in linears:
                vars(lin).pop("forward", None)
                vars(lin).pop("backward", None)
            for p, master in zip(params, masters, strict=True):
                p[...] = master

    def forward_backward(self, model, loss_fn, x, y, dloss: float = 1.0,
                         daux: float = 1.0) -> float:
        """One micro-batch in the compute format: forward, loss, backward; returns the loss.

        `dloss` is the loss's upstream gradient: the loss scale (fp16), times 1/k when
        k micro-batches are accumulated. Gradients are added into the model's float32
        grads; they are `dloss` times too large until the scaler unscales them.
        A loss that is not finite is returned without a backward (its gradients would
        be NaN; the caller decides what a diverged step means)."""
        # a scaled fp16 gradient may overflow to inf (and inf - inf gives NaN): expected,
        # the scaler finds it and the step is skipped, so NumPy need not warn
        quiet = np.errstate(over="ignore", invalid="ignore") if self.enabled else \
            contextlib.nullcontext()
        with quiet, self.compute(model):
            logits = self.round(model.forward(x))  # (B, T, V) as a low-precision head gives them
            loss = loss_fn.forward(logits, y)  # float32: log-sum-exp and the mean
            if not math.isfinite(loss):
                model.clear_backward_caches()
                return loss
            dlogits = self.round(loss_fn.backward(dloss))  # (B, T, V)
            model.backward(dlogits, daux=daux)
        return loss


def _hook_linear(lin: Linear, rnd) -> None:
    """Make `lin` compute as a low-precision GEMM does, until the hooks are removed
    (instance attributes shadowing the class's methods; `compute` deletes them)."""
    cls = type(lin)

    def forward(x):
        # rounded input times the rounded weight copy: exact products, float32 sums;
        # the output is stored in the format
        return rnd(cls.forward(lin, rnd(x)))

    def backward(dout):
        # the weight and bias gradients of this call are GEMM outputs in the format:
        # collect them in fresh zero arrays, round them, then add them to the float32 grads
        grads = lin.grads
        lin.grads = {name: xp_of(g).zeros_like(g) for name, g in grads.items()}
        try:
            dx = cls.backward(lin, rnd(dout))
            for name, g in lin.grads.items():
                grads[name] += rnd(g)
        finally:
            lin.grads = grads
        return rnd(dx)

    lin.forward, lin.backward = forward, backward
