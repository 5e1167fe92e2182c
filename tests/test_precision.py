"""Rounding to fp16/bf16, the loss scaler and the mixed-precision recipe (tinylm/precision.py).

Rounding is checked against two references that do not use tinylm's code: ml_dtypes'
bfloat16 (when installed: the `dev` extra) and an exact table lookup written here
(every finite value of the format, sorted; nearest neighbour, ties to the even pattern).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from tinylm.backend import get_xp, to_device, to_numpy
from tinylm.model import GPT, GPTConfig
from tinylm.nn import Linear, SoftmaxCrossEntropy
from tinylm.optim import AdamW
from tinylm.precision import LossScaler, MixedPrecision, format_info, round_to

# ---------------------------------------------------------------------------
# An exact reference for rounding
# ---------------------------------------------------------------------------


def _table(fmt):
    """(values, patterns): every non-negative finite value of `fmt` ascending as float64,
    then the overflow threshold 2^(emax+1) standing for inf, and their bit patterns."""
    if fmt == "fp16":
        pats = np.arange(0x7C00 + 1, dtype=np.uint32)  # 0x7C00 is +inf
        vals = pats.astype(np.uint16).view(np.float16).astype(np.float64)
    else:
        pats = np.arange(0x7F80 + 1, dtype=np.uint32)  # 0x7F80 is +inf
        vals = (pats << 16).view(np.float32).astype(np.float64)
    vals[-1] = 2.0 * 2.0 ** format_info(fmt).bias  # where inf "would be": 65536 or 2^128
    return vals, pats


def reference_round(x, fmt):
    """Round float32/float64 values to `fmt` by table lookup (exact in float64); NaN -> NaN."""
    vals, pats = _table(fmt)
    with np.errstate(invalid="ignore"):  # signalling NaN patterns
        x = np.asarray(x, dtype=np.float64)
    a = np.abs(x)
    i = np.clip(np.searchsorted(vals, a, side="right") - 1, 0, len(vals) - 2)  # vals[i] <= a
    lo, hi = vals[i], vals[i + 1]
    mid = (lo + hi) / 2  # exact: the values have at most 11 significant bits
    up = (a > mid) | ((a == mid) & (pats[i] % 2 == 1))  # ties to the even pattern
    j = np.where(a >= vals[-1], len(vals) - 1, np.where(up, i + 1, i))
    out = vals[j]
    out[j == len(vals) - 1] = np.inf
    out = np.copysign(out, x)  # -0.0 stays -0.0; tiny negatives round to -0.0
    out[np.isnan(x)] = np.nan
    with np.errstate(over="ignore"):
        return out.astype(np.float32)


def same_bits(a, b):
    """Bit-for-bit equal, any NaN equal to any NaN."""
    a, b = np.asarray(a, dtype=np.float32), np.asarray(b, dtype=np.float32)
    nan = np.isnan(a)
    return bool(np.array_equal(nan, np.isnan(b)) and
                np.array_equal(a[~nan].view(np.uint32), b[~nan].view(np.uint32)))


def random_float32_patterns(rng, n):
    """Random bit patterns (every exponent, subnormals, inf, NaN) and the hard cases for
    bf16: dropped halves exactly at the tie 0x8000 and one either side of it, and the
    patterns around the overflow boundary and the smallest subnormals."""
    u = rng.integers(0, 2**32, size=n, dtype=np.uint64).astype(np.uint32)
    high = u & np.uint32(0xFFFF0000)
    ties = np.concatenate([high | np.uint32(low) for low in (0x7FFF, 0x8000, 0x8001)])
    edges = np.arange(0x7F7F0000, 0x7F810000, 97, dtype=np.uint32)  # max finite .. NaN
    tiny = np.arange(0, 0x00030000, 7, dtype=np.uint32)  # subnormals, ties among them
    every = np.concatenate([u, ties, edges, tiny])
    return np.concatenate([every, every | np.uint32(0x80000000)]).view(np.float32)


# ---------------------------------------------------------------------------
# round_to
# ---------------------------------------------------------------------------


def test_every_float16_bit_pattern_round_trips(device):
    xp = get_xp(device)
    half = np.arange(2**16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    x = half.astype(np.float32)  # all 65536: zeros, subnormals, normals, infs, NaNs
    out = round_to(to_device(x, xp), "fp16")
    assert out.dtype == np.float32 and out.shape == x.shape
    assert same_bits(to_numpy(out), x)


def test_every_bfloat16_bit_pattern_round_trips(device):
    xp = get_xp(device)
    x = (np.arange(2**16, dtype=np.uint32) << 16).view(np.float32)
    assert same_bits(to_numpy(round_to(to_device(x, xp), "bf16")), x)


@pytest.mark.parametrize("fmt", ["fp16", "bf16"])
def test_rounding_matches_the_exact_table(device, fmt):
    xp = get_xp(device)
    x = random_float32_patterns(np.random.default_rng(1), 1_000_000)
    got = to_numpy(round_to(to_device(x, xp), fmt))
    assert same_bits(got, reference_round(x, fmt))


def test_bfloat16_matches_ml_dtypes_on_millions_of_values(device):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    xp = get_xp(device)
    x = random_float32_patterns(np.random.default_rng(2), 2_000_000)  # ~10.5 M values
    with np.errstate(invalid="ignore"):  # NaN inputs
        want = x.astype(ml_dtypes.bfloat16).astype(np.float32)
    got = to_numpy(round_to(to_device(x, xp), "bf16"))
    assert same_bits(got, want)
    # the cases that matter, by name
    got = round_to(np.array([1 + 2**-8, 1 + 3 * 2**-8, 3.4e38, -1e-45, np.nan], np.float32), "bf16")
    np.testing.assert_array_equal(got[:3], [1.0, 1 + 2**-6, np.inf])  # ties to even; overflow
    assert got[3] == 0 and np.signbit(got[3]) and np.isnan(got[4])


def test_float16_matches_numpys_cast_on_millions_of_values(device):
    xp = get_xp(device)
    x = random_float32_patterns(np.random.default_rng(4), 2_000_000)
    x = np.concatenate([x, (x.view(np.uint32) & np.uint32(0x87FFFFFF)).view(np.float32)])  # tiny
    with np.errstate(over="ignore", invalid="ignore"):
        want = x.astype(np.float16).astype(np.float32)  # NumPy's IEEE cast
    assert same_bits(to_numpy(round_to(to_device(x, xp), "fp16")), want)


def test_fp16_overflow_and_underflow_as_ieee():
    got = round_to(np.array([65504, 65519.9, 65520, -1e6, 2**-25, 2**-25 * 1.01, 2**-24],
                            np.float32), "fp16")
    np.testing.assert_array_equal(got, [65504, 65504, np.inf, -np.inf, 0, 2**-24, 2**-24])


def test_float64_inputs_are_rounded_once(device):
    """Through float32 first, 1 + 2^-8 + 2^-40 would become the tie 1 + 2^-8 and then 1:
    round_to must give the nearest bf16, 1 + 2^-7 (and likewise for fp16)."""
    xp = get_xp(device)
    x = np.array([1 + 2**-8 + 2**-40, -(1 + 2**-8 + 2**-40), 1 + 2**-8 - 2**-40])
    got = to_numpy(round_to(to_device(x, xp), "bf16"))
    np.testing.assert_array_equal(got, [1 + 2**-7, -(1 + 2**-7), 1.0])
    got = to_numpy(round_to(to_device(np.array([1 + 2**-11 + 2**-40]), xp), "fp16"))
    np.testing.assert_array_equal(got, [1 + 2**-10])
    # many near-ties, against the table (which rounds float64 exactly)
    rng = np.random.default_rng(3)
    ties = (rng.integers(0, 0x7F80, 200_000, dtype=np.uint32) << 16 | 0x8000).view(np.float32)
    x = ties.astype(np.float64) * (1 + rng.choice([-1, 1], ties.size) * 2.0**-40)
    x = np.concatenate([x, [1e300, -1e300, 1e-300, np.inf, np.nan]])
    for fmt in ("bf16", "fp16"):
        assert same_bits(to_numpy(round_to(to_device(x, xp), fmt)), reference_round(x, fmt))


def test_round_to_rejects_unknown_formats():
    with pytest.raises(ValueError, match="fp16"):
        round_to(np.ones(2, np.float32), "fp8")


def test_format_constants():
    fp16, bf16 = format_info("fp16"), format_info("bf16")
    assert (fp16.max, fp16.min_normal, fp16.min_subnormal) == (65504.0, 2.0**-14, 2.0**-24)
    assert bf16.max == float(np.float32(2**127 * (2 - 2**-7))) and bf16.eps == 2**-7
    assert round_to(np.float32(fp16.max * 2), "fp16") == np.inf


# ---------------------------------------------------------------------------
# LossScaler
# ---------------------------------------------------------------------------


def grads_of(xp, *arrays):
    return [(f"p{i}", to_device(np.zeros_like(a), xp), to_device(np.array(a), xp))
            for i, a in enumerate(arrays)]


def test_unscale_divides_in_place_and_reports_finiteness(device):
    xp = get_xp(device)
    scaler = LossScaler(init_scale=1024.0)
    g0 = np.array([3.0, -5.0, 1e-3], np.float32)
    params = grads_of(xp, g0 * 1024, np.ones((2, 2), np.float32) * 2048)
    held = [g for _, _, g in params]
    assert scaler.unscale_(params) is True
    np.testing.assert_array_equal(to_numpy(params[0][2]), g0)  # exact: a power of two
    np.testing.assert_array_equal(to_numpy(params[1][2]), 2.0)
    assert all(g is h for (_, _, g), h in zip(params, held, strict=True))  # in place
    for bad in (np.inf, -np.inf, np.nan):
        assert scaler.unscale_(grads_of(xp, g0, np.array([1.0, bad], np.float32))) is False


def test_overflow_halves_the_scale_and_counts_a_skip():
    scaler = LossScaler(init_scale=2.0**16, growth_interval=3)
    scaler.update(True)
    scaler.update(True)
    scaler.update(False)  # overflow: back off, restart the growth count
    assert (scaler.scale, scaler.growth_tracker, scaler.skipped) == (2.0**15, 0, 1)
    scaler.update(True)
    scaler.update(True)
    assert scaler.scale == 2.0**15  # only 2 good steps since the overflow
    scaler.update(True)
    assert (scaler.scale, scaler.growth_tracker) == (2.0**16, 0)  # grows after 3


def test_growth_follows_torch_gradscaler_sequence():
    """The scale after each step of a finite/overflow pattern, as torch.amp.GradScaler's
    update (_amp_update_scale_) computes it for init 8, growth 2, backoff 0.5, interval 2."""
    scaler = LossScaler(init_scale=8.0, growth_interval=2)
    pattern = [True, True, True, False, True, True, True, True, False, False, True]
    expect = [8, 16, 16, 8, 8, 16, 16, 32, 16, 8, 8]
    seen = []
    for finite in pattern:
        scaler.update(finite)
        seen.append(scaler.scale)
    assert seen == expect and scaler.skipped == 3


def test_scale_never_grows_into_inf():
    scaler = LossScaler(init_scale=2.0**1023, growth_interval=1)
    scaler.update(True)
    assert scaler.scale == 2.0**1023


def test_state_round_trips_through_json():
    a = LossScaler(init_scale=2.0**10, growth_factor=4.0, backoff_factor=0.25, growth_interval=5)
    for finite in (True, False, True, True):
        a.update(finite)
    b = LossScaler()
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert b.state_dict() == a.state_dict()
    for finite in (True, True, True, False, True):  # and they go on identically
        a.update(finite)
        b.update(finite)
        assert b.state_dict() == a.state_dict()
    with pytest.raises(ValueError, match="loss scaler"):
        b.load_state_dict({"scale": "x"})


@pytest.mark.parametrize("kwargs", [{"init_scale": 0}, {"growth_factor": 1.0},
                                    {"backoff_factor": 1.0}, {"growth_interval": 0}])
def test_scaler_rejects_bad_settings(kwargs):
    with pytest.raises(ValueError):
        LossScaler(**kwargs)


# ---------------------------------------------------------------------------
# MixedPrecision
# ---------------------------------------------------------------------------


def tiny_gpt(device="cpu", **over):
    cfg = dict(vocab_size=40, context_length=16, d_model=32, n_layers=2, n_heads=4,
               dropout=0.0)
    return GPT(GPTConfig(**{**cfg, **over}), seed=0, device=device)


def batch(n=4, t=16, v=40, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, v, (n, t)), rng.integers(0, v, (n, t))


def grads_flat(model):
    return np.concatenate([to_numpy(g).ravel() for _, _, g in model.parameters()])


def test_fp32_recipe_is_the_plain_model(device):
    x, y = batch()
    a, b = tiny_gpt(device), tiny_gpt(device)
    xp = a.xp
    la = MixedPrecision("fp32").forward_backward(a, SoftmaxCrossEntropy(), to_device(x, xp),
                                                 to_device(y, xp))
    loss_fn = SoftmaxCrossEntropy()
    lb = loss_fn.forward(b.forward(to_device(x, xp)), to_device(y, xp))
    b.backward(loss_fn.backward())
    assert la == lb
    np.testing.assert_array_equal(grads_flat(a), grads_flat(b))


@pytest.mark.parametrize("fmt", ["fp16", "bf16"])
def test_compute_rounds_weights_and_linear_outputs_then_restores(device, fmt):
    model = tiny_gpt(device)
    masters = {n: to_numpy(p).copy() for n, p, _ in model.parameters()}
    arrays = {n: p for n, p, _ in model.parameters()}
    x, _ = batch()
    seen = []
    with MixedPrecision(fmt).compute(model):
        for name, p, _ in model.parameters():
            assert same_bits(to_numpy(p), to_numpy(round_to(p, fmt))), name
        qkv = model.blocks[0].attn.qkv
        out = qkv.forward(to_device(np.random.default_rng(0).standard_normal((2, 3, 32)),
                                    model.xp).astype(np.float32))
        seen.append(same_bits(to_numpy(out), to_numpy(round_to(out, fmt))))
        qkv.backward(out)
        model.forward(to_device(x, model.xp))
        model.clear_backward_caches()
    assert seen == [True]
    for name, p, _ in model.parameters():  # master weights back, bit for bit, same arrays
        assert p is arrays[name]
        np.testing.assert_array_equal(to_numpy(p), masters[name])
    assert not any("forward" in vars(m) for m in model.modules() if isinstance(m, Linear))


def test_compute_restores_on_error():
    model = tiny_gpt()
    masters = model.state_dict()
    with pytest.raises(RuntimeError, match="boom"), MixedPrecision("bf16").compute(model):
        raise RuntimeError("boom")
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(value, masters[name])


def test_linear_weight_gradients_are_rounded_before_accumulating():
    lin = Linear(8, 4, rng=0)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 8)).astype(np.float32)
    dy = rng.standard_normal((5, 4)).astype(np.float32)
    lin.grads["weight"][...] = 0.1  # accumulation continues in float32 from here
    with MixedPrecision("bf16").compute(lin):
        lin.forward(x)
        dx = lin.backward(dy)
    r = lambda a: round_to(a, "bf16")
    w16 = r(lin.params["weight"])
    np.testing.assert_array_equal(lin.grads["weight"], np.float32(0.1) + r(r(x).T @ r(dy)))
    np.testing.assert_array_equal(dx, r(r(dy) @ w16.T))


@pytest.mark.parametrize("fmt", ["fp16", "bf16"])
def test_low_precision_gradients_are_close_to_float32(fmt):
    x, y = batch()
    ref, low = tiny_gpt(), tiny_gpt()
    l32 = MixedPrecision("fp32").forward_backward(ref, SoftmaxCrossEntropy(), x, y)
    l16 = MixedPrecision(fmt).forward_backward(low, SoftmaxCrossEntropy(), x, y, dloss=1024.0)
    LossScaler(init_scale=1024.0).unscale_(low.parameters())
    g32, g16 = grads_flat(ref), grads_flat(low)
    assert abs(l16 - l32) < 2e-2 * abs(l32)
    cos = g32 @ g16 / np.linalg.norm(g32) / np.linalg.norm(g16)
    assert cos > 0.99, cos


def test_float64_models_stay_float64():
    model = tiny_gpt().to(dtype="float64")
    x, y = batch()
    MixedPrecision("bf16").forward_backward(model, SoftmaxCrossEntropy(), x, y)
    assert all(g.dtype == np.float64 for _, _, g in model.parameters())


def test_loss_scaling_rescues_gradients_that_underflow_in_fp16():
    """A loss averaged over many tokens (here 1/4096 of one batch's, as with 4096-way
    accumulation) gives gradients below fp16's smallest subnormal: without scaling they
    flush to zero; scaled by 2^16 they survive and, unscaled, match float32."""
    x, y = batch()
    tiny = 1 / 4096
    ref, plain, scaled = tiny_gpt(), tiny_gpt(), tiny_gpt()
    MixedPrecision("fp32").forward_backward(ref, SoftmaxCrossEntropy(), x, y, dloss=tiny)
    MixedPrecision("fp16").forward_backward(plain, SoftmaxCrossEntropy(), x, y, dloss=tiny)
    scaler = LossScaler()
    MixedPrecision("fp16").forward_backward(scaled, SoftmaxCrossEntropy(), x, y,
                                            dloss=tiny * scaler.scale)
    assert scaler.unscale_(scaled.parameters())
    g32, g_plain, g_scaled = grads_flat(ref), grads_flat(plain), grads_flat(scaled)
    zero = lambda g: float(np.mean(g == 0))
    assert zero(g_plain) > zero(g32) + 0.1  # a good part of the gradient is lost
    assert zero(g_scaled) < zero(g32) + 0.01
    err = lambda g: np.linalg.norm(g - g32) / np.linalg.norm(g32)
    assert err(g_scaled) < 0.01 < 0.2 < err(g_plain)


def test_an_overflowing_step_is_skipped_and_the_scale_halves(device):
    """Scale 2^40: the scaled gradients overflow fp16 (inf), unscale_ says so, the step
    is skipped (weights and AdamW state untouched) and the scale halves; later steps
    with a smaller scale go through."""
    model = tiny_gpt(device)
    xp = model.xp
    x, y = (to_device(a, xp) for a in batch())
    opt = AdamW(model.parameters(), lr=1e-2)
    scaler = LossScaler(init_scale=2.0**40)
    mp = MixedPrecision("fp16")
    before = model.state_dict()
    model.zero_grad()
    mp.forward_backward(model, SoftmaxCrossEntropy(), x, y, dloss=scaler.scale)
    finite = scaler.unscale_(model.parameters())
    if finite:
        opt.step()
    scaler.update(finite)
    assert not finite and scaler.scale == 2.0**39 and scaler.skipped == 1 and opt.t == 0
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(value, before[name])
    scaler = LossScaler(init_scale=2.0**8)
    model.zero_grad()
    mp.forward_backward(model, SoftmaxCrossEntropy(), x, y, dloss=scaler.scale)
    assert scaler.unscale_(model.parameters())


def test_mixed_precision_rejects_unknown_formats():
    with pytest.raises(ValueError, match="bf16"):
        MixedPrecision("fp8")
    assert MixedPrecision("fp16").needs_loss_scaling
    assert not MixedPrecision("bf16").needs_loss_scaling


# ---------------------------------------------------------------------------
# The trainer's --precision
# ---------------------------------------------------------------------------


@pytest.fixture
def tiny(tmp_path):
    """A TrainConfig for a model of a few thousand parameters: steps take milliseconds."""
    from tinylm.data import bundled_text_path
    from tinylm.training.config import TrainConfig

    text = tmp_path / "text.txt"
    text.write_text(bundled_text_path().read_text(encoding="utf-8")[:20_000], encoding="utf-8")

    def make(**changes):
        base = dict(data=str(text), context_length=16, d_model=16, n_layers=2, n_heads=2,
                    batch_size=4, max_iters=8, warmup_iters=2, eval_interval=4, eval_iters=2,
                    out_dir=str(tmp_path / "run"))
        return TrainConfig(**{**base, **changes})

    return make


def step_records(trainer):
    from tinylm.training.rundir import read_log

    return [r for r in read_log(trainer.log_path) if r["event"] == "step"]


def start_high(trainer):
    """A scale that overflows at first and grows every 2 steps: skips, back-offs, growth."""
    trainer.scaler = LossScaler(init_scale=2.0**22, growth_interval=2)
    trainer._snapshot = trainer.trainer_state()
    return trainer


def test_fp16_training_skips_overflows_and_resumes_bitwise(tiny):
    from tinylm import checkpoint
    from tinylm.training.trainer import Trainer

    config = tiny(precision="fp16", dropout=0.1)
    straight = start_high(Trainer(config.replace(out_dir=config.out_dir + "-straight")))
    straight.train()
    records = step_records(straight)
    assert records[0]["skipped"] and records[0]["grad_norm"] is None
    assert records[1]["loss_scale"] == 2.0**21  # halved after the overflow
    assert not all(r["skipped"] for r in records) and straight.scaler.skipped >= 1
    assert straight.optimizer.t == 8 - straight.scaler.skipped  # skipped steps take no step

    def stop_at_4(event, info):
        if event == "step" and info["step"] == 4:
            raise KeyboardInterrupt

    first = start_high(Trainer(config, reporter=stop_at_4))
    with pytest.raises(KeyboardInterrupt):
        first.train()
    saved = checkpoint.read_trainer_state(first.last_dir)
    assert saved["step"] == 4 and saved["loss_scaler"]["growth_interval"] == 2
    resumed = Trainer(config, resume=first.last_dir)
    assert resumed.scaler.state_dict() == saved["loss_scaler"]
    resumed.train()
    assert resumed.scaler.state_dict() == straight.scaler.state_dict()
    for name, value in straight.model.state_dict().items():
        np.testing.assert_array_equal(resumed.model.state_dict()[name], value)
    assert resumed.result()["val_loss"] == straight.result()["val_loss"]


@pytest.mark.parametrize("changes", [dict(precision="bf16"),
                                     dict(precision="fp16", loss_scaling=False)])
def test_bf16_and_unscaled_fp16_train_close_to_fp32(tiny, changes):
    from tinylm.training.trainer import Trainer

    ref = Trainer(tiny(out_dir=tiny().out_dir + "-fp32"))
    ref.train()
    low = Trainer(tiny(**changes))
    assert low.scaler is None
    low.train()
    assert "loss_scale" not in step_records(low)[0]
    assert abs(low.result()["val_loss"] - ref.result()["val_loss"]) < 0.05
    assert low.result()["val_loss"] != ref.result()["val_loss"]  # it did round


def test_precision_flag_and_field(tiny, tmp_path, capsys):
    from tinylm.cli import main

    assert main(["train", "--precision", "bf16", "--dry-run", "--out", str(tmp_path / "r")]) == 0
    assert '"bf16"' in capsys.readouterr().out
    with pytest.raises(ValueError, match="precision"):
        tiny(precision="fp8")


def test_fp16_ranks_agree_on_every_skip(tiny):
    """Data-parallel fp16: an overflow on one rank skips the step on all of them."""
    import tinylm.distributed as dist
    from tinylm.training.trainer import Trainer

    config = tiny(precision="fp16", batch_size=6)

    def rank_fn(comm):
        trainer = start_high(Trainer(config, comm=comm))
        trainer.train()
        return trainer.scaler.state_dict(), trainer.model.state_dict()

    (s0, w0), (s1, w1) = dist.run_ranks(rank_fn, 2)
    assert s0 == s1 and s0["skipped"] >= 1
    for name, value in w0.items():
        np.testing.assert_array_equal(w1[name], value)
