"""int8/int4 weight quantization and quantized models (tinylm/quant.py)."""

from __future__ import annotations

import numpy as np
import pytest

from tinylm.backend import get_xp, to_device, to_numpy
from tinylm.model import GPT, GPTConfig
from tinylm.nn import Embedding, Linear
from tinylm.nn.kv_cache import KVCache
from tinylm.quant import (
    QuantizedLinear,
    model_nbytes,
    quantize_model,
    quantize_tensor,
    quantized_state,
    restore_quantized,
)


def weight(shape, seed=0, outliers=True):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal(shape) * 0.02).astype(np.float32)
    if outliers:  # a few large entries, as trained weights have
        w.flat[rng.integers(0, w.size, 5)] = rng.choice([-1, 1], 5) * 0.5
    return w


def per_weight_scale(q):
    """(in, out): the scale that each weight of q was quantized with."""
    s = to_numpy(q.scales)
    if q.scheme == "int8":
        return np.broadcast_to(s, q.shape)
    return np.repeat(s, q.group_size, axis=0)[:q.shape[0]]


CASES = [("int8", 32, (64, 48)), ("int8", 32, (7, 5)), ("int4", 32, (64, 48)),
         ("int4", 128, (256, 40)), ("int4", 32, (50, 9)), ("int4", 32, (51, 7)),
         ("int4", 2, (6, 3)), ("int4", 128, (33, 4))]


@pytest.mark.parametrize("scheme,group,shape", CASES)
def test_error_is_at_most_half_a_scale(device, scheme, group, shape):
    xp = get_xp(device)
    w = weight(shape)
    q = quantize_tensor(to_device(w, xp), scheme, group)
    deq = q.dequantize()
    assert deq.shape == w.shape and deq.dtype == np.float32
    err = np.abs(to_numpy(deq) - w)
    s = per_weight_scale(q)
    # s / 2 from rounding to the nearest code, plus float32's rounding of code * s
    assert np.all(err <= s / 2 + 2.0**-23 * np.abs(w)), float((err / s).max())
    # the scale is absmax / qmax of its block: the largest weight gets the largest code
    codes = to_numpy(q.int_codes())
    qmax = 127 if scheme == "int8" else 7
    assert codes.min() >= -qmax and codes.max() <= qmax
    assert np.abs(codes).max() == qmax


def test_int8_has_one_scale_per_output_column():
    w = weight((32, 6))
    q = quantize_tensor(w, "int8")
    assert q.codes.dtype == np.int8 and q.codes.shape == (32, 6) and q.scales.shape == (6,)
    np.testing.assert_allclose(q.scales, np.abs(w).max(axis=0) / 127, rtol=1e-7)
    np.testing.assert_array_equal(q.codes, np.rint(w / q.scales.astype(np.float64)))
    assert q.nbytes == 32 * 6 + 4 * 6


def test_int4_packed_layout_round_trips():
    """Two codes a byte, code + 8 as a nibble: even input row low, odd row high; one
    scale per group of G rows within each column."""
    G, n_in, n_out = 4, 8, 2
    w = np.zeros((n_in, n_out), np.float32)
    w[:, 0] = [7, -7, 1, 0, 3, -2, 0.5, 2]  # group 0: scale 1; group 1: scale 3/7
    w[:4, 1] = [-3.5, 3.5, 0, 1.75]  # group 0: scale 0.5; group 1: all zero
    q = quantize_tensor(w, "int4", G)
    assert q.codes.dtype == np.uint8 and q.codes.shape == (4, 2)
    assert q.scales.shape == (2, 2) and q.nbytes == 4 * 2 + 4 * 4
    np.testing.assert_allclose(q.scales, [[1.0, 0.5], [3 / 7, 0.0]], rtol=1e-7)
    want = np.array([[7, -7], [-7, 7], [1, 0], [0, 4], [7, 0], [-5, 0], [1, 0], [5, 0]])
    np.testing.assert_array_equal(q.int_codes(), want)
    low, high = q.codes & 0x0F, q.codes >> 4  # the byte layout, spelled out
    np.testing.assert_array_equal(low, want[0::2] + 8)
    np.testing.assert_array_equal(high, want[1::2] + 8)
    assert (low > 0).all() and (high > 0).all()  # nibble 0 (code -8) is never used
    # a random weight: packing then unpacking gives the codes back
    w = weight((96, 17), seed=4)
    q = quantize_tensor(w, "int4", 32)
    scale = per_weight_scale(q).astype(np.float64)
    np.testing.assert_array_equal(q.int_codes(), np.clip(np.rint(w / scale), -7, 7))


def test_int4_stores_a_partial_last_group_without_padding():
    w = weight((51, 3), outliers=False)
    q = quantize_tensor(w, "int4", 32)
    assert q.codes.shape == (26, 3) and q.scales.shape == (2, 3)  # 51 rows: 26 bytes a column
    assert (q.codes[-1] >> 4 == 8).all()  # the odd last row's partner: code 0
    np.testing.assert_allclose(q.scales[1], np.abs(w[32:]).max(axis=0) / 7, rtol=1e-7)


def test_smaller_groups_and_more_bits_give_smaller_errors():
    w = weight((512, 64))
    rms = {}
    for scheme, g in (("int8", 32), ("int4", 32), ("int4", 128)):
        rms[scheme, g] = float(np.sqrt(np.mean((quantize_tensor(w, scheme, g).dequantize()
                                                - w) ** 2)))
    assert rms["int8", 32] < rms["int4", 32] < rms["int4", 128]


def test_zero_blocks_and_float64():
    w = np.zeros((4, 3))
    for scheme in ("int8", "int4"):
        q = quantize_tensor(w, scheme, 2)
        np.testing.assert_array_equal(q.dequantize(), 0.0)
        assert q.dequantize(np.float64).dtype == np.float64


@pytest.mark.parametrize("bad,match", [
    (dict(w=np.ones(4)), "2-D"), (dict(w=np.ones((2, 2)), scheme="int3"), "scheme"),
    (dict(w=np.ones((4, 2)), scheme="int4", group_size=3), "even"),
    (dict(w=np.array([[1.0, np.nan]])), "NaN")])
def test_bad_inputs_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        quantize_tensor(**bad)


# ---------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------


def small_gpt(device="cpu", **over):
    cfg = dict(vocab_size=50, context_length=16, d_model=64, n_layers=2, n_heads=4, dropout=0.0)
    model = GPT(GPTConfig(**{**cfg, **over}), seed=0, device=device)
    # move away from the N(0, 0.02) initialisation: larger, heavier-tailed weights
    rng = np.random.default_rng(1)
    for _, p, _ in model.parameters():
        if p.ndim == 2:
            p += to_device((rng.standard_t(4, p.shape) * 0.05).astype(np.float32), model.xp)
    return model.eval()


def ids(seed=0, v=50):
    return np.random.default_rng(seed).integers(0, v, (3, 16))


@pytest.mark.parametrize("scheme,tol,agree", [("int8", 0.05, 0.95), ("int4", 0.4, 0.6)])
def test_quantized_logits_are_close_to_the_float_model(device, scheme, tol, agree):
    """Relative RMS error of the logits (int8 about 2%, int4 g32 about 27% on these
    heavy-tailed random weights) and how often the most likely token is the same."""
    ref = small_gpt(device)
    want = to_numpy(ref.forward(ids()))
    model = quantize_model(small_gpt(device), scheme, group_size=32)
    assert model.quantization == {"scheme": scheme, "group_size": 32 if scheme == "int4" else None}
    got = to_numpy(model.forward(ids()))
    rel = np.sqrt(np.mean((got - want) ** 2) / np.mean(want**2))
    assert rel < tol, rel
    assert (got.argmax(-1) == want.argmax(-1)).mean() > agree


def test_every_linear_is_replaced_and_embeddings_stay_float():
    model = quantize_model(small_gpt(tie_weights=False, n_experts=2, experts_per_token=1),
                           "int4", 16)
    kinds = [type(m) for m in model.modules()]
    assert Linear not in kinds and kinds.count(QuantizedLinear) == 2 * (2 + 1 + 2 * 2) + 1
    assert isinstance(model.head, QuantizedLinear)
    assert isinstance(model.tok_emb, Embedding) and "tok_emb.weight" in model.state_dict()
    assert "blocks.0.attn.qkv.weight" not in model.state_dict()  # the codes are not params
    model.forward(ids())
    assert model_nbytes(model) < 0.5 * small_gpt(tie_weights=False, n_experts=2,
                                                 experts_per_token=1).num_parameters() * 4


def test_quantized_model_is_inference_only():
    model = quantize_model(small_gpt(), "int8")
    logits = model.forward(ids())
    with pytest.raises(RuntimeError, match="inference only"):
        model.backward(np.ones_like(logits))


def test_kv_cache_generation_matches_forward():
    model = quantize_model(small_gpt(), "int4")
    x = ids()
    full = model.forward(x)
    cache = KVCache.for_model(model, batch_size=3)
    step = model.forward_cached(x, cache, all_logits=True)
    np.testing.assert_allclose(step, full, atol=1e-5)


def test_quantized_model_moves_between_devices(fake_cuda):
    model = quantize_model(small_gpt(), "int4")
    want = model.forward(ids())
    model.to("cuda")
    got = model.forward(ids())
    assert type(got).__module__ == fake_cuda.__name__
    np.testing.assert_allclose(to_numpy(got), want, rtol=1e-5, atol=1e-6)
    model.to("cpu", "float64")
    np.testing.assert_allclose(model.forward(ids()), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("scheme,group", [("int8", 32), ("int4", 32), ("int4", 24)])
def test_quantized_state_round_trips_through_an_npz(tmp_path, scheme, group):
    model = quantize_model(small_gpt(tie_weights=False), scheme, group)
    want = model.forward(ids())
    np.savez(tmp_path / "m.npz", **quantized_state(model))
    with np.load(tmp_path / "m.npz", allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    assert arrays["blocks.1.mlp.fc.weight.codes"].dtype == (np.int8 if scheme == "int8"
                                                            else np.uint8)
    fresh = GPT(model.config, seed=5)  # other weights: everything comes from the file
    fresh.load_state_dict(restore_quantized(fresh, arrays, model.quantization))
    assert fresh.quantization == model.quantization
    np.testing.assert_array_equal(fresh.forward(ids()), want)


def test_restore_refuses_missing_or_misshapen_codes():
    model = quantize_model(small_gpt(), "int4", 32)
    arrays = quantized_state(model)
    broken = {k: v for k, v in arrays.items() if k != "blocks.0.attn.qkv.weight.codes"}
    with pytest.raises(ValueError, match="blocks.0.attn.qkv.weight.codes"):
        restore_quantized(GPT(model.config), broken, model.quantization)
    with pytest.raises(ValueError, match="do not fit"):
        restore_quantized(GPT(model.config), arrays, {"scheme": "int4", "group_size": 16})
    with pytest.raises(ValueError, match="quantization"):
        restore_quantized(GPT(model.config), arrays, {"scheme": "int2"})


# ---------------------------------------------------------------------------
# Quantized checkpoints and the quantize / eval / generate commands
# ---------------------------------------------------------------------------

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n" * 40


@pytest.fixture
def float_checkpoint(tmp_path):
    from tinylm import checkpoint
    from tinylm.tokenizer import CharTokenizer

    tok = CharTokenizer.train(TEXT)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, context_length=16, d_model=64, n_layers=2,
                          n_heads=4), seed=0)
    (tmp_path / "text.txt").write_text(TEXT, encoding="utf-8")
    return checkpoint.save(tmp_path / "float", model, tokenizer=tok), model


@pytest.mark.parametrize("scheme,group", [("int8", 32), ("int4", 32), ("int4", 128)])
def test_quantized_checkpoint_round_trips(float_checkpoint, tmp_path, scheme, group):
    from tinylm import checkpoint

    path, model = float_checkpoint
    quantize_model(model, scheme, group)
    want = model.forward(ids(v=model.config.vocab_size))
    checkpoint.save(tmp_path / "q", model)
    meta = checkpoint.read_meta(tmp_path / "q")
    assert meta["quantization"] == model.quantization
    size = (tmp_path / "q" / "model.npz").stat().st_size
    assert size < 0.45 * (path / "model.npz").stat().st_size
    loaded = checkpoint.load(tmp_path / "q").model
    assert isinstance(loaded.blocks[0].mlp.fc, QuantizedLinear)
    np.testing.assert_array_equal(loaded.forward(ids(v=model.config.vocab_size)), want)
    with pytest.raises(ValueError, match="inference only"):
        checkpoint.save(tmp_path / "q2", loaded, optimizer={"t": 0})


def test_a_tampered_quantized_checkpoint_is_refused(float_checkpoint, tmp_path):
    from tinylm import checkpoint
    from tinylm.fileio import FileFormatError, read_json, write_json

    _, model = float_checkpoint
    checkpoint.save(tmp_path / "q", quantize_model(model, "int4", 32))
    arrays = dict(np.load(tmp_path / "q" / "model.npz"))
    arrays["blocks.0.attn.qkv.weight.codes"] = arrays["blocks.0.attn.qkv.weight.codes"].view(
        np.int8)
    np.savez(tmp_path / "q" / "model.npz", **arrays)
    with pytest.raises(FileFormatError, match="uint8"):
        checkpoint.load(tmp_path / "q")
    checkpoint.save(tmp_path / "q", model)
    meta = read_json(tmp_path / "q" / "config.json")
    write_json(tmp_path / "q" / "config.json", {**meta, "quantization": {"scheme": "int8"}})
    with pytest.raises(FileFormatError, match="do not match|missing|shape"):
        checkpoint.load(tmp_path / "q")
    write_json(tmp_path / "q" / "config.json", {**meta, "quantization": {"scheme": "int3"}})
    with pytest.raises(FileFormatError, match="quantization"):
        checkpoint.load(tmp_path / "q")


def test_quantize_then_eval_and_generate_commands(float_checkpoint, tmp_path, capsys):
    import json

    from tinylm.cli import main

    path, _ = float_checkpoint
    out = tmp_path / "q4"
    assert main(["quantize", "--checkpoint", str(path), "--scheme", "int4", "--group-size",
                 "16", "--out", str(out)]) == 0
    assert "smaller" in capsys.readouterr().out
    data = ["--data", str(tmp_path / "text.txt")]
    assert main(["eval", "--checkpoint", str(out), *data, "--json"]) == 0
    q = json.loads(capsys.readouterr().out)
    assert main(["eval", "--checkpoint", str(path), *data, "--json"]) == 0
    f = json.loads(capsys.readouterr().out)
    assert q["quantization"] == {"scheme": "int4", "group_size": 16}
    assert q["weights_bytes"] < 0.4 * f["weights_bytes"] and q["tokens"] == f["tokens"]
    assert abs(q["bits_per_byte"] - f["bits_per_byte"]) < 0.05 * f["bits_per_byte"]
    assert main(["generate", "--checkpoint", str(out), "--prompt", "First", "--max-new-tokens",
                 "8", "--seed", "0"]) == 0
    assert capsys.readouterr().out.startswith("First")
    assert main(["quantize", "--checkpoint", str(out), "--scheme", "int8", "--out",
                 str(tmp_path / "again")]) == 2
    assert "already quantized" in capsys.readouterr().err
