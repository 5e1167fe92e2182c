"""tinylm.interop: safetensors files and Hugging Face GPT-2 checkpoints, in and out.

The reference is tests/fixtures/hf_gpt2/: a tiny random GPT-2 that `transformers`
saved itself, with transformers' logits for fixed inputs (scripts/make_hf_gpt2_fixture.py
wrote it; see its docstring). Only NumPy is needed here: no PyTorch, no transformers,
no safetensors package. The reverse direction (a tinylm export loaded by transformers)
needs transformers and is checked by that script when it is run by hand.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tinylm import GPT, GPTConfig
from tinylm.backend import to_numpy
from tinylm.interop import (
    HFCheckpointError,
    SafetensorsError,
    from_hf_gpt2,
    load_file,
    load_hf_gpt2,
    read_header,
    safetensors,
    save_file,
    to_hf_gpt2,
)

FIXTURE = Path(__file__).parent / "fixtures" / "hf_gpt2"
RTOL, ATOL = 1e-5, 1e-5  # float32 against float32


@pytest.fixture(scope="module")
def expected() -> dict:
    with np.load(FIXTURE / "expected.npz", allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


@pytest.fixture
def ckpt(tmp_path) -> Path:
    """A writable copy of the fixture checkpoint (config.json + model.safetensors)."""
    out = tmp_path / "ckpt"
    out.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(FIXTURE / name, out / name)
    return out


def fixture_tensors() -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in load_file(FIXTURE / "model.safetensors").items()}


def edit_config(directory: Path, **changes) -> None:
    path = directory / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


# ---------------------------------------------------------------------------
# The safetensors format
# ---------------------------------------------------------------------------


def test_safetensors_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {
        "f32": rng.standard_normal((3, 4)).astype(np.float32),
        "f64": rng.standard_normal(5),
        "f16": rng.standard_normal((2, 2)).astype(np.float16),
        "i64": np.arange(6, dtype=np.int64).reshape(2, 3),
        "mask": np.array([True, False, True]),
        "scalar": np.array(2.5, dtype=np.float32),
        "empty": np.zeros((0, 3), dtype=np.float32),
        "big_endian": np.arange(4, dtype=">f4"),
    }
    path = tmp_path / "t.safetensors"
    save_file(tensors, path, metadata={"format": "pt", "note": "hi"})
    infos, metadata, data_start = read_header(path)
    assert metadata == {"format": "pt", "note": "hi"}
    assert data_start % 8 == 0  # the header is padded so the data is aligned
    assert {k: i.dtype for k, i in infos.items()} == {
        "f32": "F32", "f64": "F64", "f16": "F16", "i64": "I64", "mask": "BOOL",
        "scalar": "F32", "empty": "F32", "big_endian": "F32"}
    loaded = load_file(path)
    assert loaded.keys() == tensors.keys()
    for name, value in tensors.items():
        assert loaded[name].shape == value.shape
        assert loaded[name].dtype == value.dtype.newbyteorder("<")
        np.testing.assert_array_equal(loaded[name], value)
    assert list(load_file(path, ["f64"])) == ["f64"]


def hand_written_file(path: Path, header: dict, data: bytes) -> None:
    """A safetensors file built byte by byte from the spec, not by tinylm's writer."""
    raw = json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)


def test_reads_a_file_written_from_the_spec_including_bf16(tmp_path):
    f32 = np.array([[1.5, -2.0], [0.25, 3.0]], dtype="<f4").tobytes()  # 16 bytes
    # bfloat16 of 1.0, -2.0, 0.5: the top 16 bits of the float32s
    bf16 = bytes.fromhex("803f") + bytes.fromhex("00c0") + bytes.fromhex("003f")
    path = tmp_path / "spec.safetensors"
    hand_written_file(path, {
        "a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
        "b": {"dtype": "BF16", "shape": [3], "data_offsets": [16, 22]},
        "__metadata__": {"format": "pt"},
    }, f32 + bf16)
    tensors = load_file(path)
    np.testing.assert_array_equal(tensors["a"], [[1.5, -2.0], [0.25, 3.0]])
    assert tensors["b"].dtype == np.float32
    np.testing.assert_array_equal(tensors["b"], [1.0, -2.0, 0.5])


@pytest.mark.parametrize("header, data, message", [
    ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 12,
     "tensor 'w': its data ends at byte 16 of the data section, which has only 12 bytes"),
    ({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 16]}}, b"\0" * 16,
     "tensor 'w': F32 [3] needs 12 bytes but data_offsets [0, 16] hold 16"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12,
     "tensors 'a' and 'b' overlap"),
    ({"w": {"dtype": "Q4", "shape": [1], "data_offsets": [0, 1]}}, b"\0",
     "tensor 'w': unsupported dtype 'Q4'"),
    ({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4,
     "shape must be a list of at most 32 non-negative ints"),
    ({"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}, b"\0" * 4,
     "data_offsets must be [begin, end]"),
    ({"w": {"dtype": "F32", "shape": [1]}}, b"\0" * 4, "needs dtype, shape and data_offsets"),
    ([1, 2], b"", "the header must be a JSON object"),
])
def test_malformed_files_give_clear_errors(tmp_path, header, data, message):
    path = tmp_path / "bad.safetensors"
    hand_written_file(path, header, data)
    with pytest.raises(SafetensorsError, match="bad.safetensors") as info:
        load_file(path)
    assert message in str(info.value)


def test_truncated_or_garbage_files(tmp_path):
    good = tmp_path / "good.safetensors"
    save_file({"w": np.ones((8, 8), dtype=np.float32)}, good)
    raw = good.read_bytes()
    cases = {
        "cut_data.safetensors": (raw[:-10], "tensor 'w': its data ends at byte 256"),
        "cut_header.safetensors": (raw[:20], "the header length says"),
        "tiny.safetensors": (raw[:5], "too short to be a safetensors file"),
        "text.safetensors": (b"\x05\0\0\0\0\0\0\0{oops", "the header is not UTF-8 JSON"),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(SafetensorsError, match=name) as info:
            load_file(tmp_path / name)
        assert message in str(info.value)


def test_writes_are_atomic(tmp_path, monkeypatch):
    path = tmp_path / "w.safetensors"
    save_file({"w": np.zeros(3, dtype=np.float32)}, path)
    before = path.read_bytes()

    def crash(f, header, arrays):
        f.write(header)  # half a file
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(safetensors, "_write", crash)
    with pytest.raises(RuntimeError, match="disk on fire"):
        save_file({"w": np.ones(3, dtype=np.float32)}, path)
    monkeypatch.undo()
    assert path.read_bytes() == before  # the old file is intact
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]  # no temporary left over
    with pytest.raises(TypeError, match="cannot write dtype"):
        save_file({"w": np.array(["text"])}, path)
    assert path.read_bytes() == before


# ---------------------------------------------------------------------------
# Hugging Face GPT-2 -> tinylm
# ---------------------------------------------------------------------------


def test_logits_match_transformers(expected, device):
    model = from_hf_gpt2(FIXTURE, device=device)
    assert model.config == GPTConfig(vocab_size=320, context_length=32, d_model=32,
                                     n_layers=2, n_heads=4)
    assert not model.training  # eval mode, as from_pretrained
    for idx, logits in (("idx", "logits"), ("idx_short", "logits_short")):
        ours = to_numpy(model.forward(expected[idx]))
        assert ours.dtype == np.float32
        np.testing.assert_allclose(ours, expected[logits], rtol=RTOL, atol=ATOL)


def test_logits_match_transformers_in_float64(expected):
    model = from_hf_gpt2(FIXTURE, dtype="float64")
    np.testing.assert_allclose(model.forward(expected["idx_short"]), expected["logits_short64"],
                               rtol=1e-10, atol=1e-10)


def test_load_hf_gpt2_reads_the_tokenizer(expected):
    model, tokenizer = load_hf_gpt2(FIXTURE)
    text = str(expected["text"])
    assert tokenizer.encode(text) == expected["text_ids"].tolist()  # the ids `tokenizers` gave
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.vocab_size == model.config.vocab_size


def test_load_hf_gpt2_without_tokenizer_files(ckpt):
    model, tokenizer = load_hf_gpt2(ckpt)
    assert tokenizer is None and isinstance(model, GPT)
    (ckpt / "vocab.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="has vocab.json but not merges.txt"):
        load_hf_gpt2(ckpt)


def test_old_style_checkpoint(ckpt, expected):
    """No "transformer." prefix, attention-mask buffers, lm_head stored next to wte:
    the layout of the original OpenAI conversions."""
    tensors = {k.removeprefix("transformer."): v for k, v in fixture_tensors().items()}
    T = 32
    for i in range(2):
        tensors[f"h.{i}.attn.bias"] = np.tril(np.ones((T, T), dtype=np.float32))[None, None]
        tensors[f"h.{i}.attn.masked_bias"] = np.array(-1e4, dtype=np.float32)
    tensors["lm_head.weight"] = tensors["wte.weight"]
    save_file(tensors, ckpt / "model.safetensors")
    model = from_hf_gpt2(ckpt)
    np.testing.assert_allclose(model.forward(expected["idx"]), expected["logits"],
                               rtol=RTOL, atol=ATOL)

    tensors["lm_head.weight"] = tensors["wte.weight"] + 1
    save_file(tensors, ckpt / "model.safetensors")
    with pytest.raises(HFCheckpointError, match="lm_head.weight differs from wte.weight"):
        from_hf_gpt2(ckpt)


def test_sharded_checkpoint(ckpt, expected):
    tensors = fixture_tensors()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[:10],
              "model-00002-of-00002.safetensors": names[10:]}
    for shard, shard_names in shards.items():
        save_file({k: tensors[k] for k in shard_names}, ckpt / shard)
    (ckpt / "model.safetensors").unlink()
    weight_map = {k: shard for shard, shard_names in shards.items() for k in shard_names}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    model = from_hf_gpt2(ckpt)
    np.testing.assert_allclose(model.forward(expected["idx"]), expected["logits"],
                               rtol=RTOL, atol=ATOL)


def shard_everything_into(ckpt: Path, shard: str) -> None:
    """An index that puts every tensor into the one file `shard` (written by the caller)."""
    (ckpt / "model.safetensors").unlink(missing_ok=True)
    weight_map = {k: shard for k in fixture_tensors()}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


@pytest.mark.parametrize("shard", ["../outside.safetensors", "sub/../../outside.safetensors",
                                   "..\\outside.safetensors", "ABSOLUTE", "C:\\x.safetensors"])
def test_shards_outside_the_directory_are_refused(ckpt, shard):
    """Regression: a downloaded index must not make tinylm read a file it does not own."""
    outside = ckpt.parent / "outside.safetensors"
    shutil.copy(ckpt / "model.safetensors", outside)
    shard = str(outside) if shard == "ABSOLUTE" else shard
    shard_everything_into(ckpt, shard)
    with pytest.raises(HFCheckpointError, match="is not a file in .*ckpt") as info:
        from_hf_gpt2(ckpt)
    assert "model.safetensors.index.json" in str(info.value)


def test_symlinked_shards_are_fine_and_damaged_json_names_the_file(ckpt, expected):
    """The Hugging Face cache links a model directory's files to blobs elsewhere: allowed
    (only the name in the index is checked). A damaged config.json or index is an
    HFCheckpointError naming the file (read with tinylm.fileio.read_json)."""
    blob = ckpt.parent / "blobs" / "1234abcd"
    blob.parent.mkdir()
    (ckpt / "model.safetensors").rename(blob)
    (ckpt / "model-00001-of-00001.safetensors").symlink_to(blob)
    shard_everything_into(ckpt, "model-00001-of-00001.safetensors")
    np.testing.assert_allclose(from_hf_gpt2(ckpt).forward(expected["idx"]), expected["logits"],
                               rtol=RTOL, atol=ATOL)

    index = ckpt / "model.safetensors.index.json"
    for content, message in (('{"weight_map": {"a": "x", "a": "y"}}', "duplicate key 'a'"),
                             ('{"weight_map": ["x"]}', "not a safetensors index"),
                             ("[]", "safetensors index must hold a JSON .*object")):
        index.write_text(content)
        with pytest.raises(HFCheckpointError, match="model.safetensors.index.json: .*" + message):
            from_hf_gpt2(ckpt)
    (ckpt / "config.json").write_text('{"n_embd": 32,')
    with pytest.raises(HFCheckpointError, match="config.json: GPT-2 config is not valid JSON"):
        from_hf_gpt2(ckpt)


def test_half_precision_weights_are_converted(ckpt, expected):
    tensors = {k: v.astype(np.float16) for k, v in fixture_tensors().items()}
    save_file(tensors, ckpt / "model.safetensors")
    state = from_hf_gpt2(ckpt).state_dict()
    assert state["tok_emb.weight"].dtype == np.float32
    np.testing.assert_array_equal(state["blocks.1.mlp.fc.weight"],
                                  tensors["transformer.h.1.mlp.c_fc.weight"].astype(np.float32))


# ---------------------------------------------------------------------------
# tinylm -> Hugging Face GPT-2, and back
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("tie_weights", [True, False])
def test_export_then_import_is_identical(tmp_path, tie_weights, device):
    cfg = GPTConfig(vocab_size=50, context_length=16, d_model=16, n_layers=3, n_heads=2,
                    tie_weights=tie_weights)
    model = GPT(cfg, seed=3, device=device)
    to_hf_gpt2(model, tmp_path / "out", eos_token_id=0)
    back = from_hf_gpt2(tmp_path / "out", device=device)
    assert back.config == cfg
    before, after = model.state_dict(), back.state_dict()
    assert before.keys() == after.keys()
    for name in before:
        np.testing.assert_array_equal(after[name], before[name], err_msg=name)


def test_export_has_transformers_names_shapes_and_config(tmp_path):
    """What GPT2LMHeadModel.save_pretrained writes for the same shape: the fixture."""
    ours_dir = tmp_path / "out"
    to_hf_gpt2(from_hf_gpt2(FIXTURE), ours_dir, eos_token_id=0)
    ours, _, _ = read_header(ours_dir / "model.safetensors")
    theirs, metadata, _ = read_header(FIXTURE / "model.safetensors")
    assert {k: (i.dtype, i.shape) for k, i in ours.items()} == \
           {k: (i.dtype, i.shape) for k, i in theirs.items()}
    assert read_header(ours_dir / "model.safetensors")[1] == metadata == {"format": "pt"}
    config = json.loads((ours_dir / "config.json").read_text())
    reference = json.loads((FIXTURE / "config.json").read_text())
    architecture = ["model_type", "architectures", "vocab_size", "n_positions", "n_embd",
                    "n_layer", "n_head", "n_inner", "activation_function", "layer_norm_epsilon",
                    "scale_attn_weights", "scale_attn_by_inverse_layer_idx",
                    "reorder_and_upcast_attn", "tie_word_embeddings", "bos_token_id",
                    "eos_token_id"]
    assert {k: config[k] for k in architecture} == {k: reference[k] for k in architecture}
    assert set(config) <= set(reference)  # nothing transformers does not know


def test_untied_export_stores_lm_head(tmp_path):
    cfg = GPTConfig(vocab_size=50, context_length=16, d_model=16, n_layers=1, n_heads=2,
                    tie_weights=False)
    model = GPT(cfg, seed=1)
    to_hf_gpt2(model, tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    np.testing.assert_array_equal(tensors["lm_head.weight"], model.state_dict()["head.weight"].T)
    assert json.loads((tmp_path / "config.json").read_text())["tie_word_embeddings"] is False


def test_export_refuses_models_without_biases(tmp_path):
    cfg = GPTConfig(vocab_size=50, context_length=16, d_model=16, n_layers=1, n_heads=2,
                    bias=False)
    with pytest.raises(HFCheckpointError, match="bias=False has no GPT-2 equivalent"):
        to_hf_gpt2(GPT(cfg), tmp_path)


@pytest.mark.parametrize("variant", [dict(pos="rope"), dict(norm="rmsnorm"), dict(mlp="relu"),
                                     dict(n_kv_heads=1), dict(sliding_window=4),
                                     dict(n_experts=2)])
def test_export_refuses_the_modern_variants(tmp_path, variant):
    cfg = GPTConfig(vocab_size=50, context_length=16, d_model=16, n_layers=1, n_heads=2,
                    **variant)
    name = next(iter(variant))
    with pytest.raises(HFCheckpointError, match=f"variant settings {name}=.*to_hf_llama"):
        to_hf_gpt2(GPT(cfg), tmp_path)
    assert not (tmp_path / "model.safetensors").exists()


# ---------------------------------------------------------------------------
# Clear errors
# ---------------------------------------------------------------------------


def rewrite(ckpt: Path, change) -> None:
    tensors = fixture_tensors()
    change(tensors)
    save_file(tensors, ckpt / "model.safetensors")


def test_missing_tensor(ckpt):
    rewrite(ckpt, lambda t: t.pop("transformer.h.1.mlp.c_fc.bias"))
    with pytest.raises(HFCheckpointError,
                       match=r"model.safetensors: missing tensors h.1.mlp.c_fc.bias for a GPT-2 "
                             "with n_layer=2"):
        from_hf_gpt2(ckpt)


def test_unexpected_tensor(ckpt):
    rewrite(ckpt, lambda t: t.update({"transformer.h.2.ln_1.weight": np.ones(32, np.float32)}))
    with pytest.raises(HFCheckpointError, match=r"unexpected tensors h.2.ln_1.weight"):
        from_hf_gpt2(ckpt)


def test_wrong_shape(ckpt):
    rewrite(ckpt, lambda t: t.update(
        {"transformer.h.0.attn.c_attn.weight": np.zeros((96, 32), np.float32)}))  # transposed
    with pytest.raises(HFCheckpointError,
                       match=r"h.0.attn.c_attn.weight has shape \(96, 32\), expected \(32, 96\)"):
        from_hf_gpt2(ckpt)


def test_untied_checkpoint_needs_lm_head(ckpt):
    edit_config(ckpt, tie_word_embeddings=False)
    with pytest.raises(HFCheckpointError, match="missing tensors lm_head.weight"):
        from_hf_gpt2(ckpt)


@pytest.mark.parametrize("changes, message", [
    ({"activation_function": "relu"}, "activation_function is 'relu'"),
    ({"activation_function": "gelu"}, "tinylm's GELU is the tanh approximation"),
    ({"n_inner": 100}, "n_inner is 100; tinylm's MLP has 4 * n_embd = 128"),
    ({"layer_norm_epsilon": 1e-6}, "layer_norm_epsilon is 1e-06; tinylm's LayerNorm uses 1e-05"),
    ({"scale_attn_weights": False}, "scale_attn_weights = true"),
    ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx = false"),
    ({"model_type": "gpt_neo"}, "only GPT-2 ('gpt2') checkpoints"),
    ({"n_head": 5}, "d_model (32) must be divisible by GPTConfig.n_heads (5)"),
    ({"n_embd": None}, "n_embd is None; expected an int"),
])
def test_unsupported_config(ckpt, changes, message):
    edit_config(ckpt, **changes)
    with pytest.raises(HFCheckpointError, match="config.json") as info:
        from_hf_gpt2(ckpt)
    assert message in str(info.value)


def test_supported_config_variants(ckpt, expected):
    # gelu_pytorch_tanh is the same function; n_inner = 4 * n_embd is the default spelled out
    edit_config(ckpt, activation_function="gelu_pytorch_tanh", n_inner=128,
                reorder_and_upcast_attn=True)
    np.testing.assert_allclose(from_hf_gpt2(ckpt).forward(expected["idx"]), expected["logits"],
                               rtol=RTOL, atol=ATOL)


def test_pickled_weights_are_refused(tmp_path):
    shutil.copy(FIXTURE / "config.json", tmp_path / "config.json")
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x02 not to be unpickled")
    with pytest.raises(HFCheckpointError, match="pytorch_model.bin, a pickled PyTorch") as info:
        from_hf_gpt2(tmp_path)
    assert "never unpickles" in str(info.value) and "save_pretrained" in str(info.value)


def test_truncated_weights(ckpt):
    path = ckpt / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(SafetensorsError, match=r"model.safetensors: tensor "
                                               r"'transformer.wte.weight'.*truncated"):
        from_hf_gpt2(ckpt)


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        from_hf_gpt2(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        from_hf_gpt2(tmp_path)
    shutil.copy(FIXTURE / "config.json", tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        from_hf_gpt2(tmp_path)
