"""Files from strangers (docs/safety.md): whatever a checkpoint, tokenizer, safetensors
file or Hugging Face directory holds, loading it either gives a valid model or
tokenizer, or raises tinylm's own error (FileFormatError and its subclasses
HFCheckpointError and SafetensorsError, or FileNotFoundError) naming the file. Never
MemoryError, RecursionError, AttributeError, KeyError, TypeError, IndexError, never
a hang, and never more memory than 50x the files' size plus what the config
legitimately needs (measured with tracemalloc, which sees NumPy's arrays too).

First the regression cases a probe found, one test each; then property tests
(hypothesis) that mutate valid files at random.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import signal
import struct
import tempfile
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context

from tinylm import checkpoint, limits
from tinylm.fileio import FileFormatError
from tinylm.interop import (
    HFCheckpointError,
    SafetensorsError,
    from_hf_gpt2,
    from_hf_llama,
    load_file,
)
from tinylm.model import GPT, GPTConfig
from tinylm.optim import AdamW
from tinylm.tokenizer import BPETokenizer, CharTokenizer
from tinylm.tokenizer import load as load_tokenizer

FIXTURES = Path(__file__).resolve().parent / "fixtures"
CFG = GPTConfig(vocab_size=20, context_length=8, d_model=16, n_layers=2, n_heads=2)
OWN_ERRORS = (FileFormatError, FileNotFoundError)  # HF and safetensors errors included
BASELINE = 4 * 2**20  # bytes: what any load costs (JSON, zipfile, NumPy bookkeeping)
BACKTRACKING = "(?:a|a)*?(?:b|c)"  # exponential on "aaaa...d" (catastrophic backtracking)
SETTINGS = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class Hang(BaseException):
    """Raised by the alarm: a BaseException, so no `except OSError` on the way masks it."""


@contextlib.contextmanager
def time_limit(seconds: float):
    if not hasattr(signal, "setitimer"):  # Windows: no alarm; the test still runs
        yield
        return

    def alarm(signum, frame):
        raise Hang(f"no answer within {seconds} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def load_safely(load, *, names, budget: int, seconds: float = 10):
    """`load()`'s result, or the tinylm error it raised, whose message must name one of
    `names` (paths). Anything else fails the test: another exception (it propagates),
    more than `seconds`, or a peak of traced memory above `budget` bytes."""
    tracemalloc.start()
    try:
        with time_limit(seconds):
            result = load()
    except OWN_ERRORS as exc:
        result = exc
        assert any(str(name) in str(exc) for name in names), f"no file named in: {exc}"
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < budget, f"peak {peak:,} bytes > budget {budget:,}"
    if currently_in_test_context():  # for `pytest --hypothesis-show-statistics`: what happened
        event("loaded" if not isinstance(result, Exception) else str(result).split(": ")[1][:40])
    return result


def size_of(path: Path) -> int:
    """Bytes of a file, or of all files in a directory."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def legit_params(model: dict, npz_bytes: int) -> int:
    """Parameters a (mutated) model config may legitimately make a load allocate: those
    of a valid config that the weights file could hold, else 0."""
    try:
        cfg = GPTConfig.from_dict(model)
        _, params = limits.check_config(cfg, "config.json")
    except (TypeError, ValueError, OverflowError):
        return 0
    fits = params * limits.MIN_WEIGHT_BYTES <= npz_bytes * limits.MAX_EXPANSION
    return params + limits.computed_elements(cfg) if fits else 0


def npy_bytes(shape, descr="<f4", body=b"") -> bytes:
    """An .npy file whose header says `descr` and `shape`, followed by `body` (which need
    not match: that is the point)."""
    header = repr({"descr": descr, "fortran_order": False, "shape": tuple(shape)}).encode()
    header += b" " * (-(10 + len(header) + 1) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header + body


def array_bytes(array) -> bytes:
    f = io.BytesIO()
    np.lib.format.write_array(f, np.asarray(array))
    return f.getvalue()


def rewrite_npz(path: Path, replace=None, drop=(), raw=None, compression=zipfile.ZIP_STORED):
    """Rewrite the .npz at `path`: arrays replaced or added (`replace`), dropped, or raw
    members added (`raw`: {member file name: bytes})."""
    with np.load(path) as z:
        arrays = {name: z[name] for name in z.files if name not in drop}
    arrays.update(replace or {})
    with zipfile.ZipFile(path, "w", compression) as zf:
        for name, array in arrays.items():
            zf.writestr(name + ".npy", array_bytes(array))
        for name, data in (raw or {}).items():
            zf.writestr(name, data)


def edit_json(path: Path, edit) -> None:
    value = json.loads(path.read_text())
    edit(value)
    path.write_text(json.dumps(value))


# ---------------------------------------------------------------------------
# The valid files every test starts from
# ---------------------------------------------------------------------------


def rng_state(seed):
    return np.random.default_rng(seed).bit_generator.state


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory) -> Path:
    model = GPT(CFG, seed=0)
    opt = AdamW(model.parameters(), lr=1e-2)
    for _, p, g in model.parameters():  # one step, so that the moments are not zero
        g[...] = p
    opt.step()
    trainer_state = {"format": "tinylm-trainer", "version": 1, "step": 1, "tokens_seen": 16,
                     "best_val_loss": 2.5, "last_eval": None, "elapsed_s": 0.5,
                     "config": {}, "data": {},
                     "rng": {"batches": rng_state(1), "eval": rng_state(2),
                             "dropout": [rng_state(3), rng_state(4)]}}
    path = tmp_path_factory.mktemp("good") / "ck"
    return checkpoint.save(path, model, opt, CharTokenizer("abcdefghijklmnopqrst"),
                           trainer_state)


@pytest.fixture(scope="module")
def good_tokenizer(tmp_path_factory) -> Path:
    text = (FIXTURES.parent.parent / "tinylm" / "data" / "tinyshakespeare.txt").read_text()
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    BPETokenizer.train(text[:5000], 300, "gpt4", ["<|endoftext|>"]).save(path)
    return path


@contextlib.contextmanager
def copy_of(path: Path):
    """A fresh copy of the file or directory `path`, removed afterwards."""
    with tempfile.TemporaryDirectory() as tmp:
        dst = Path(tmp) / path.name
        if path.is_dir():
            shutil.copytree(path, dst)
        else:
            shutil.copy(path, dst)
        yield dst


def load_checkpoint(ck: Path, params: int = 0):
    """checkpoint.load under load_safely, with the memory a checkpoint may take: 50x its
    files, plus 64 bytes per legitimate parameter (weights and gradients in float64, the
    initialisation's float64 draws, the arrays read, AdamW's two moments: ~48 bytes)."""
    budget = 50 * size_of(ck) + 64 * params + BASELINE
    result = load_safely(lambda: checkpoint.load(ck), names=[ck], budget=budget)
    if not isinstance(result, Exception):
        assert isinstance(result.model, GPT) and result.model.config == result.config
    return result


def model_npz_bytes(ck: Path) -> int:
    return (ck / "model.npz").stat().st_size if (ck / "model.npz").is_file() else 0


# ---------------------------------------------------------------------------
# What a config implies, without building the model
# ---------------------------------------------------------------------------

VARIANTS = [
    {},
    {"bias": False, "tie_weights": False},
    {"pos": "sinusoidal", "norm": "rmsnorm", "mlp": "swiglu"},
    {"pos": "rope", "n_kv_heads": 1, "mlp": "relu", "mlp_hidden": 24},
    {"pos": "none", "norm_placement": "post", "sliding_window": 3},
    {"n_experts": 3, "experts_per_token": 2, "mlp": "swiglu", "bias": False},
    {"n_experts": 2, "experts_per_token": 1, "norm": "rmsnorm", "tie_weights": False},
]


@pytest.mark.parametrize("variant", VARIANTS)
def test_parameter_shapes_are_the_models(variant):
    cfg = GPTConfig(vocab_size=11, context_length=6, d_model=8, n_layers=2, n_heads=2,
                    **variant)
    model = GPT(cfg)
    assert limits.parameter_shapes(cfg) == {n: tuple(p.shape) for n, p, _ in model.parameters()}
    assert limits.count(cfg) == (len(list(model.parameters())), model.num_parameters())


def test_config_caps_apply_to_products_not_only_fields():
    wide = GPTConfig(vocab_size=2**24, context_length=8, d_model=2**16, n_layers=1, n_heads=1)
    with pytest.raises(FileFormatError, match=r"x.json: the model would have .* parameters"):
        limits.check_config(wide, "x.json")
    table = GPTConfig(vocab_size=8, context_length=2**20, d_model=128, n_layers=1, n_heads=1,
                      pos="sinusoidal")
    with pytest.raises(FileFormatError, match="x.json: the sinusoidal position table"):
        limits.check_config(table, "x.json")
    with pytest.raises(HFCheckpointError, match="describes a model of 1,000 parameters"):
        limits.check_fits("x.json", "w.npz", params=1000, tensors=2, max_bytes=1999,
                          max_tensors=2, error=HFCheckpointError)
    with pytest.raises(FileFormatError, match="x.json: describes a model of 21 parameter "
                       "tensors, but w.npz holds only 2 arrays"):
        limits.check_fits("x.json", "w.npz", params=1, tensors=21, max_bytes=2, max_tensors=2)


# ---------------------------------------------------------------------------
# Regressions: small files, huge allocations
# ---------------------------------------------------------------------------


def test_checkpoint_config_with_1e8_layers(good_checkpoint):
    with copy_of(good_checkpoint) as ck:
        edit_json(ck / "config.json", lambda m: m["model"].update(n_layers=100_000_000))
        error = load_checkpoint(ck)
        assert isinstance(error, FileFormatError) and "config.json" in str(error)


def test_config_within_the_caps_but_not_backed_by_the_weights(good_checkpoint):
    """Sizes that pass every per-field cap, but that a model.npz of a few kB cannot hold:
    refused before anything is allocated, even the table of expected names."""
    with copy_of(good_checkpoint) as ck:
        edit_json(ck / "config.json", lambda m: m["model"].update(n_layers=4096, d_model=1024))
        assert "config.json: describes a model of 49,156 parameter tensors, but " \
               f"{ck / 'model.npz'} holds only 28 arrays" in str(load_checkpoint(ck))
        edit_json(ck / "config.json", lambda m: m["model"].update(n_layers=2, d_model=2**14))
        assert "config.json: describes a model of 6,443,368,448 parameters (at least " \
               f"12,886,736,896 bytes), but {ck / 'model.npz'} can hold only 31,744 bytes" \
            in str(load_checkpoint(ck))


def test_extra_member_whose_header_claims_3_gb(good_checkpoint):
    """An .npy header saying (750_000_000,) float32 (3 GB) over a 64-byte body, under an
    unknown name and under a real one: refused from the headers alone."""
    claim = npy_bytes((750_000_000,), "<f4", b"\0" * 64)
    with copy_of(good_checkpoint) as ck:
        rewrite_npz(ck / "model.npz", raw={"zeros.npy": claim})
        assert "unexpected [zeros]" in str(load_checkpoint(ck))
    with copy_of(good_checkpoint) as ck:
        rewrite_npz(ck / "model.npz", drop=["ln_f.weight"], raw={"ln_f.weight.npy": claim})
        assert "3,000,000,000 bytes of data, but the zip entry holds 64" in \
            str(load_checkpoint(ck))


def test_header_claiming_10_to_the_12_elements(good_checkpoint):
    with copy_of(good_checkpoint) as ck:
        rewrite_npz(ck / "model.npz", drop=["tok_emb.weight"],
                    raw={"tok_emb.weight.npy": npy_bytes((10**12,), "<f4", b"\0" * 64)})
        assert "declares float32 (1000000000000,)" in str(load_checkpoint(ck))


def test_zip_entry_declaring_3_gb(good_checkpoint):
    """The zip directory's own sizes lie (3 GB unpacked for every member)."""
    with copy_of(good_checkpoint) as ck:
        raw = bytearray((ck / "model.npz").read_bytes())
        at = raw.find(b"PK\x01\x02")
        while at != -1:  # every central directory entry: packed and unpacked sizes
            raw[at + 20:at + 28] = struct.pack("<II", 3_000_000_000, 3_000_000_000)
            at = raw.find(b"PK\x01\x02", at + 4)
        (ck / "model.npz").write_bytes(bytes(raw))
        assert "ends past the end of the file" in str(load_checkpoint(ck))


def test_deflated_member_of_zeros_is_a_zip_bomb(good_checkpoint):
    """A real deflated member: 48 MiB of zeros in ~50 kB. Refused before it is unpacked
    (as the 3 GB of zeros in a 3 MB model.npz the probe found)."""
    n = 12 * 2**20  # float32 zeros
    with copy_of(good_checkpoint) as ck:
        with zipfile.ZipFile(ck / "model.npz", "a") as zf:
            info = zipfile.ZipInfo("tok_emb.weight2.npy")
            info.compress_type = zipfile.ZIP_DEFLATED
            with zf.open(info, "w") as w:
                w.write(npy_bytes((n,), "<f4"))
                for _ in range(n * 4 // 2**20):
                    w.write(bytes(2**20))
        assert size_of(ck / "model.npz") < 200_000
        assert "refused as a zip bomb" in str(load_checkpoint(ck))


def test_a_971_byte_tokenizer_whose_merges_double_to_2_to_the_40(tmp_path):
    merges = [[97, 97, 256, ""]] + [[255 + i, 255 + i, 256 + i, ""] for i in range(1, 41)]
    path = tmp_path / "tok.json"
    path.write_text(json.dumps({"format": "tinylm-tokenizer", "version": 1, "type": "bpe",
                                "pattern": None, "special_tokens": {}, "merges": merges}))
    assert path.stat().st_size < 1000
    error = load_safely(lambda: load_tokenizer(path), names=[path], budget=BASELINE)
    assert "bytes in all, above the limit of 65,536" in str(error)


@pytest.mark.parametrize("kind", ["hf_gpt2", "hf_llama"])
def test_hugging_face_config_with_1e8_layers(tmp_path, kind):
    directory = tmp_path / kind
    shutil.copytree(FIXTURES / kind, directory)
    key = "n_layer" if kind == "hf_gpt2" else "num_hidden_layers"
    edit_json(directory / "config.json", lambda c: c.update({key: 100_000_000}))
    load = from_hf_gpt2 if kind == "hf_gpt2" else from_hf_llama
    error = load_safely(lambda: load(directory), names=[directory / "config.json"],
                        budget=BASELINE)
    assert isinstance(error, HFCheckpointError)


# ---------------------------------------------------------------------------
# Regressions: a tokenizer file must not hang the program
# ---------------------------------------------------------------------------


def test_an_unknown_split_pattern_is_refused_unless_trusted(good_tokenizer, tmp_path,
                                                            monkeypatch):
    monkeypatch.delenv("TINYLM_TRUST_PATTERN", raising=False)
    path = tmp_path / "tok.json"
    edit = json.loads(good_tokenizer.read_text())
    edit["pattern"] = BACKTRACKING
    path.write_text(json.dumps(edit))
    with time_limit(5), pytest.raises(FileFormatError, match="tok.json: its split pattern "
                                      r"'\(\?:a\|a\)\*\?\(\?:b\|c\)' is neither GPT-2's"):
        load_tokenizer(path)
    # an explicit opt-in (the pattern is not run here: it really is exponential)
    assert BPETokenizer.load(path, trust_pattern=True).pattern == BACKTRACKING
    monkeypatch.setenv("TINYLM_TRUST_PATTERN", "1")
    assert load_tokenizer(path).pattern == BACKTRACKING
    with pytest.raises(FileFormatError, match="neither GPT-2's nor GPT-4's"):
        load_tokenizer(path, trust_pattern=False)  # an explicit no wins


def test_a_checkpoint_tokenizer_with_an_unknown_pattern(good_checkpoint, monkeypatch):
    monkeypatch.delenv("TINYLM_TRUST_PATTERN", raising=False)
    with copy_of(good_checkpoint) as ck:
        doc = BPETokenizer(pattern=None).to_dict()
        doc["pattern"] = "(a+)+$"
        (ck / "tokenizer.json").write_text(json.dumps(doc))
        edit_json(ck / "config.json", lambda m: m["model"].update(vocab_size=256))
        rewrite_npz(ck / "model.npz", replace={"tok_emb.weight": np.zeros((256, 16), "f4")})
        rewrite_npz(ck / "optimizer.npz", replace={f"{k}/tok_emb.weight": np.zeros((256, 16))
                                                   for k in "mv"})
        with time_limit(5), pytest.raises(FileFormatError, match="tokenizer.json: its split"):
            checkpoint.load(ck)
        assert checkpoint.load(ck, trust_pattern=True).tokenizer.pattern == "(a+)+$"


@pytest.mark.parametrize("pattern", ["gpt2", "gpt4", None])
def test_known_patterns_load_and_encode_fast(tmp_path, pattern):
    path = tmp_path / "tok.json"
    BPETokenizer(pattern=pattern).save(path)
    with time_limit(5):
        assert load_tokenizer(path).encode("a" * 5000 + "d" + " x" * 5000)


# ---------------------------------------------------------------------------
# Regressions: NaN, infinity, wrong dtypes, wrong types, duplicate keys
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(("file", "name", "value", "message"), [
    ("model.npz", "ln_f.weight", np.nan, "ln_f.weight holds 1 NaN or infinite"),
    ("model.npz", "tok_emb.weight", -np.inf, "tok_emb.weight holds 1 NaN or infinite"),
    ("optimizer.npz", "m/ln_f.weight", np.nan, "m/ln_f.weight holds 1 NaN"),
    ("optimizer.npz", "v/ln_f.weight", np.inf, "v/ln_f.weight holds 1 NaN"),
    ("optimizer.npz", "v/ln_f.weight", -1.0, "v/ln_f.weight has negative entries"),
])
def test_non_finite_weights_and_moments_are_refused(good_checkpoint, file, name, value,
                                                    message):
    with copy_of(good_checkpoint) as ck:
        with np.load(ck / file) as z:
            array = z[name].copy()
        array.flat[3] = value
        rewrite_npz(ck / file, replace={name: array})
        assert f"{file}: {message}" in str(load_checkpoint(ck))


@pytest.mark.parametrize(("dtype", "message"), [
    ("complex64", "has dtype complex64; weights and moments must be one of float16"),
    ("int32", "has dtype int32"),
    ("longdouble", "has dtype float128"),
    ("object", "has dtype object: only numeric arrays are read (object arrays would need "
               "pickle"),
])
def test_weights_of_other_dtypes_are_refused(good_checkpoint, dtype, message):
    with copy_of(good_checkpoint) as ck:
        with np.load(ck / "model.npz") as z:
            array = z["tok_emb.weight"].astype(dtype)
        rewrite_npz(ck / "model.npz", replace={"tok_emb.weight": array})
        assert message in str(load_checkpoint(ck))


def test_duplicate_keys_and_members_are_refused(good_checkpoint, good_tokenizer, tmp_path):
    with copy_of(good_checkpoint) as ck:
        for name in ("config.json", "trainer.json", "tokenizer.json"):
            text = (ck / name).read_text()
            (ck / name).write_text(text.replace('"version": 1', '"version": 1, "version": 1'))
            assert f"{name}: " in str(load_checkpoint(ck))
            assert "duplicate key 'version'" in str(load_checkpoint(ck))
            (ck / name).write_text(text)
        with zipfile.ZipFile(ck / "model.npz", "a") as zf, pytest.warns(UserWarning):
            zf.writestr("ln_f.weight.npy", array_bytes(np.ones(16, "f4")))
        assert "member 'ln_f.weight.npy' is stored twice" in str(load_checkpoint(ck))
    path = tmp_path / "dup.safetensors"
    header = (b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
              b'"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}')
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 4)
    with pytest.raises(SafetensorsError, match="dup.safetensors: .*duplicate key 'w'"):
        load_file(path)


def test_trainer_json_of_the_wrong_shape(good_checkpoint):
    from tinylm.training.config import TrainConfig
    from tinylm.training.resume import open_checkpoint

    cases = [([1, 2], "trainer state must hold a JSON object, got list"),
             ({"step": "3"}, "'step' must be an int >= 0, got '3'"),
             ({"step": True}, "'step' must be an int >= 0, got True"),
             ({"best_val_loss": "low"}, "'best_val_loss' must be a finite number or null"),
             ({"rng": {"batches": {"bit_generator": "PCG64", "state": 5}}},
              "rng.batches is not a valid PCG64 state"),
             ({"rng": {"dropout": [{"bit_generator": "os.system"}]}},
              "rng.dropout[0] is not a NumPy generator state"),
             ({"rng": [1]}, "'rng' must be an object")]
    with copy_of(good_checkpoint) as ck:
        for value, message in cases:
            (ck / "trainer.json").write_text(json.dumps(value))
            assert f"trainer.json: {message}" in str(load_checkpoint(ck))
        (ck / "trainer.json").write_text("[1, 2]")
        with pytest.raises(FileFormatError, match="trainer.json: trainer state must hold"):
            open_checkpoint(ck, TrainConfig(), "cpu")  # was an AttributeError
        with pytest.raises(FileFormatError, match="trainer.json"):
            checkpoint.read_trainer_state(ck)


@pytest.mark.parametrize(("header", "message"), [
    (b"[" * 100_000 + b"]" * 100_000, "the header is not UTF-8 JSON (maximum recursion"),
    (b'{"w": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}',
     "unsupported dtype ['F32']"),
    (json.dumps({"w": {"dtype": "F32", "shape": [0, 2**70], "data_offsets": [0, 0]}}).encode(),
     "shape must be a list of at most 32 non-negative ints below 2**40"),
    (json.dumps({"w": {"dtype": "F32", "shape": [1] * 100, "data_offsets": [0, 4]}}).encode(),
     "shape must be a list of at most 32"),
    (b'{"__metadata__": {"a": [1]}}', "__metadata__ must map strings to strings"),
])
def test_safetensors_headers_that_used_to_escape(tmp_path, header, message):
    path = tmp_path / "odd.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 4)
    error = load_safely(lambda: load_file(path), names=[path], budget=BASELINE)
    assert isinstance(error, SafetensorsError) and message in str(error)


def test_safetensors_path_that_is_a_directory(tmp_path):
    (tmp_path / "x.safetensors").mkdir()
    with pytest.raises(SafetensorsError, match="x.safetensors: not a file"):
        load_file(tmp_path / "x.safetensors")


# ---------------------------------------------------------------------------
# Property tests: random mutations of valid files
# ---------------------------------------------------------------------------

# JSON values a hostile file may hold where a number belongs: odd numbers, odd types
odd_numbers = st.one_of(
    st.integers(-2**70, 2**70),
    st.sampled_from([0, 1, -1, 3, 4096, 2**16, 2**24, 2**31, 2**40, 10**12, 10**300]),
    st.floats(allow_nan=True, allow_infinity=True),
)
json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), odd_numbers, st.text(max_size=8)),
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=6,
)
model_fields = st.sampled_from([*GPTConfig.__dataclass_fields__, "evil"])
# values a config field may plausibly hold (valid ones too, within and past the caps)
config_values = st.one_of(
    st.integers(0, 64), st.sampled_from([4096, 2**16, 2**20, 2**24, 10**8, 0.1, 1e-6]),
    st.sampled_from(["rope", "sinusoidal", "none", "rmsnorm", "post", "swiglu", "relu",
                     True, False, None]),
    odd_numbers, json_values)


@SETTINGS
@given(changes=st.dictionaries(model_fields, config_values, min_size=1, max_size=3))
def test_checkpoint_config_mutations(good_checkpoint, changes):
    with copy_of(good_checkpoint) as ck:
        meta = json.loads((ck / "config.json").read_text())
        meta["model"].update(changes)
        (ck / "config.json").write_text(json.dumps(meta))
        load_checkpoint(ck, legit_params(meta["model"], model_npz_bytes(ck)))


sizes = st.one_of(st.integers(1, 64), st.sampled_from([2**10, 2**16, 2**20, 2**24]))


@st.composite
def valid_configs(draw) -> dict:
    """A GPTConfig that config.py accepts, of any size up to its caps."""
    d_model = draw(st.sampled_from([2, 16, 64, 1024, 2**16]))
    fields = dict(vocab_size=draw(sizes), context_length=draw(sizes), d_model=d_model,
                  n_layers=draw(st.one_of(st.integers(1, 4), st.sampled_from([64, 4096]))),
                  n_heads=draw(st.sampled_from([1, 2])), pos=draw(st.sampled_from(
                      ["learned", "sinusoidal", "rope", "none"])),
                  mlp=draw(st.sampled_from(["gelu", "swiglu"])),
                  mlp_hidden=draw(st.none() | sizes), n_experts=draw(st.sampled_from([0, 4096])))
    try:
        return GPTConfig(**fields).to_dict()
    except (TypeError, ValueError):
        return CFG.to_dict()


@SETTINGS
@given(model=valid_configs())
def test_valid_configs_of_any_size(good_checkpoint, model):
    """Every config that config.py accepts either matches the weights or is refused
    before its model is allocated: limits, the file's size, the headers' shapes."""
    with copy_of(good_checkpoint) as ck:
        edit_json(ck / "config.json", lambda m: m.update(model=model))
        load_checkpoint(ck, legit_params(model, model_npz_bytes(ck)))


@SETTINGS
@given(key=st.sampled_from(["format", "version", "model", "files", "dtype", "extra"]),
       value=st.one_of(json_values, st.sampled_from(
           ["float64", "float16", "complex64", ["model.npz"], ["model.npz", "../x"],
            ["model.npz", "model.npz", "trainer.json"], [], {}]), st.lists(json_values)))
def test_checkpoint_meta_mutations(good_checkpoint, key, value):
    with copy_of(good_checkpoint) as ck:
        edit_json(ck / "config.json", lambda m: m.update({key: value}))
        load_checkpoint(ck, limits.count(CFG)[1])


@SETTINGS
@given(file=st.sampled_from(["model.npz", "optimizer.npz"]), data=st.data(),
       kind=st.sampled_from(["truncate", "flip", "zero", "flip headers"]))
def test_npz_byte_mutations(good_checkpoint, file, data, kind):
    with copy_of(good_checkpoint) as ck:
        raw = bytearray((ck / file).read_bytes())
        # "flip headers": in the first member's zip and .npy headers, or the zip directory
        headers = [*range(200), *range(raw.rfind(b"PK\x01\x02"), len(raw))]
        where = st.sampled_from(headers) if kind == "flip headers" else \
            st.integers(0, len(raw) - 1)
        if kind == "truncate":
            raw = raw[:data.draw(st.integers(0, len(raw) - 1))]
        else:
            for at in data.draw(st.lists(where, min_size=1, max_size=8)):
                raw[at] = 0 if kind == "zero" else raw[at] ^ data.draw(st.integers(1, 255))
        (ck / file).write_bytes(bytes(raw))
        load_checkpoint(ck, limits.count(CFG)[1])


DESCRS = ["<f4", "<f8", "<f2", ">f4", "<i8", "|b1", "<c8", "|O", "<U3", "|V8", "<f16",
          "[('a', '<f4')]", "x"]


@pytest.mark.filterwarnings("ignore:Duplicate name")  # zipfile's: a member twice
@SETTINGS
@given(file=st.sampled_from(["model.npz", "optimizer.npz"]),
       name=st.sampled_from(["tok_emb.weight", "ln_f.bias", "t", "m/ln_f.weight", "zeros",
                             "../evil", ""]),
       shape=st.lists(st.integers(0, 2**45) | st.sampled_from([0, 1, 16, 20, 750_000_000]),
                      max_size=3),
       descr=st.sampled_from(DESCRS), body=st.integers(0, 2048),
       replace=st.booleans(), deflate=st.booleans())
def test_npz_forged_members(good_checkpoint, file, name, shape, descr, body, replace,
                            deflate):
    with copy_of(good_checkpoint) as ck:
        with np.load(ck / file) as z:
            drop = [name] if replace and name in z.files else []
        compression = zipfile.ZIP_DEFLATED if deflate else zipfile.ZIP_STORED
        rewrite_npz(ck / file, drop=drop, compression=compression,
                    raw={name + ".npy": npy_bytes(shape, descr, b"\1" * body)})
        load_checkpoint(ck, limits.count(CFG)[1])


@SETTINGS
@given(key=st.sampled_from(["step", "tokens_seen", "best_val_loss", "elapsed_s", "rng",
                            "last_eval", "config", "format", "version"]),
       value=st.one_of(json_values, st.sampled_from([
           {"batches": {"bit_generator": "PCG64", "state": {"state": -1, "inc": 2**200}}},
           {"dropout": [{"bit_generator": "MT19937", "state": {"key": [1] * 3, "pos": 9}}]},
           {"bit_generator": "Philox", "state": None}])))
def test_trainer_json_mutations(good_checkpoint, key, value):
    with copy_of(good_checkpoint) as ck:
        edit_json(ck / "trainer.json", lambda s: s.update({key: value}))
        load_checkpoint(ck, limits.count(CFG)[1])


merge_lists = st.lists(st.lists(st.integers(-2, 600) | st.sampled_from([2**24, 10**18]),
                                min_size=2, max_size=5), max_size=40)


def doubling_chain(n: int) -> list:
    """Merges each of which doubles the previous token: 2**(n+1) bytes in n+1 merges."""
    return [[97, 97, 256]] + [[255 + i, 255 + i, 256 + i] for i in range(1, n + 1)]


@SETTINGS
@given(key=st.sampled_from(["merges", "special_tokens", "byte_ids", "pattern", "type",
                            "version", "chain", "truncate"]),
       value=st.one_of(json_values, merge_lists,
                       st.sampled_from([None, "gpt2", BACKTRACKING, "(a+)+$", "[", 5])),
       chain=st.integers(0, 45), cut=st.integers(0, 10**6))
def test_tokenizer_mutations(good_tokenizer, key, value, chain, cut):
    with copy_of(good_tokenizer) as path:
        text = path.read_text()
        doc = json.loads(text)
        if key == "truncate":
            text = text[: cut % len(text)]
        else:
            # "chain": the merges replaced by one token doubled `chain` times
            doc.update({key: value} if key != "chain" else {"merges": doubling_chain(chain)})
            text = json.dumps(doc)
        path.write_text(text)
        size = path.stat().st_size
        budget = 50 * size + 4 * limits.vocab_bytes_allowed(size) + BASELINE
        tok = load_safely(lambda: load_tokenizer(path), names=[path], budget=budget)
        if not isinstance(tok, Exception):
            with time_limit(5):  # whatever loaded, encodes without a hang
                tok.encode("a" * 40 + "d" + " hello, world\n" * 20, allowed_special="none")


st_dtypes = st.sampled_from(["F32", "F16", "BF16", "F64", "I64", "BOOL", "Q4", "", 3, None])
st_entries = st.fixed_dictionaries({
    "dtype": st_dtypes,
    "shape": st.one_of(st.lists(st.integers(-1, 2**41), max_size=4), json_values),
    "data_offsets": st.one_of(st.lists(st.integers(-1, 2**64), min_size=2, max_size=2),
                              json_values),
})


@SETTINGS
@given(entries=st.dictionaries(st.text(max_size=8), st_entries | json_values, max_size=4),
       data=st.binary(max_size=256),
       length_delta=st.sampled_from([0, 0, 0, 0, 0, -3, -1, 1, 3, 2**63]))
def test_safetensors_header_mutations(tmp_path_factory, entries, data, length_delta):
    path = tmp_path_factory.mktemp("st") / "x.safetensors"
    header = json.dumps(entries).encode()
    length = max(0, min(len(header) + length_delta, 2**64 - 1))
    path.write_bytes(struct.pack("<Q", length) + header + data)
    tensors = load_safely(lambda: load_file(path), names=[path],
                          budget=50 * path.stat().st_size + BASELINE)
    if not isinstance(tensors, Exception):  # (BF16 is widened to float32: twice the bytes)
        assert sum(a.nbytes for a in tensors.values()) <= 2 * len(data)


@SETTINGS
@given(kind=st.sampled_from(["hf_gpt2", "hf_llama"]),
       key=st.sampled_from(["n_layer", "n_embd", "n_head", "vocab_size", "n_positions",
                            "n_inner", "layer_norm_epsilon", "num_hidden_layers",
                            "hidden_size", "intermediate_size", "num_key_value_heads",
                            "rope_theta", "rms_norm_eps", "head_dim", "rope_scaling",
                            "model_type", "tie_word_embeddings", "max_position_embeddings"]),
       value=st.one_of(odd_numbers, json_values))
def test_hugging_face_config_mutations(tmp_path_factory, kind, key, value):
    directory = tmp_path_factory.mktemp("hf") / kind
    shutil.copytree(FIXTURES / kind, directory)
    edit_json(directory / "config.json", lambda c: c.update({key: value}))
    load = from_hf_gpt2 if kind == "hf_gpt2" else from_hf_llama
    model = load_safely(lambda: load(directory), names=[directory],
                        budget=50 * size_of(directory) + BASELINE)
    assert isinstance(model, (GPT, HFCheckpointError, FileFormatError))


def test_a_tampered_safetensors_weight_file(tmp_path):
    """Bytes of a real weights file flipped: refused or loaded, never anything else."""
    directory = tmp_path / "hf_gpt2"
    shutil.copytree(FIXTURES / "hf_gpt2", directory)
    raw = (directory / "model.safetensors").read_bytes()
    rng = np.random.default_rng(0)
    for _ in range(30):
        mutated = bytearray(raw)
        for at in rng.integers(0, 600, size=3):  # inside the header, mostly
            mutated[at] ^= int(rng.integers(1, 256))
        (directory / "model.safetensors").write_bytes(bytes(mutated))
        load_safely(lambda: from_hf_gpt2(directory), names=[directory],
                    budget=50 * size_of(directory) + BASELINE)
