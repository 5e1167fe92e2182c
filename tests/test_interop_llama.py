"""tinylm.interop.llama: Hugging Face Llama and Mistral checkpoints, in and out.

The references are tests/fixtures/hf_llama/ and hf_mistral/: tiny random models that
`transformers` saved itself, with transformers' float32 logits and a float64 reference
(logits, the cross-entropy loss and PyTorch autograd's gradient of every parameter,
already in tinylm's names and layouts) for fixed inputs. scripts/make_hf_llama_fixture.py
wrote them (see its docstring, also for how the float64 reference is kept in float64).
Only NumPy is needed here: no PyTorch, no transformers.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tinylm import GPT, GPTConfig
from tinylm.backend import to_device, to_numpy
from tinylm.interop import (
    HFCheckpointError,
    config_from_hf_llama,
    from_hf_llama,
    load_file,
    read_header,
    save_file,
    to_hf_llama,
)
from tinylm.nn import SoftmaxCrossEntropy
from tinylm.nn.kv_cache import KVCache
from tinylm.sampling import generate

FIXTURES = Path(__file__).parent / "fixtures"
LLAMA, MISTRAL = FIXTURES / "hf_llama", FIXTURES / "hf_mistral"
RTOL, ATOL = 1e-5, 1e-5  # float32 against float32, as for GPT-2
RTOL64 = 1e-10  # float64 against float64: the two differ by summation order only


def read_expected(directory: Path) -> dict:
    with np.load(directory / "expected.npz", allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def expected() -> dict:
    return read_expected(LLAMA)


@pytest.fixture(scope="module")
def expected_mistral() -> dict:
    return read_expected(MISTRAL)


@pytest.fixture
def ckpt(tmp_path) -> Path:
    """A writable copy of the Llama fixture checkpoint (config.json + model.safetensors)."""
    out = tmp_path / "ckpt"
    out.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(LLAMA / name, out / name)
    return out


def fixture_tensors() -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in load_file(LLAMA / "model.safetensors").items()}


def edit_config(directory: Path, drop=(), **changes) -> None:
    path = directory / "config.json"
    config = {**json.loads(path.read_text()), **changes}
    for key in drop:
        config.pop(key, None)
    path.write_text(json.dumps(config))


def rewrite(ckpt: Path, change) -> None:
    tensors = fixture_tensors()
    change(tensors)
    save_file(tensors, ckpt / "model.safetensors")


def close64(a, b):
    a, b = to_numpy(a), np.asarray(b)
    np.testing.assert_allclose(a, b, rtol=RTOL64, atol=RTOL64 * np.abs(b).max())


# ---------------------------------------------------------------------------
# Hugging Face Llama -> tinylm, against transformers and PyTorch autograd
# ---------------------------------------------------------------------------


def test_config_from_the_fixture():
    cfg = from_hf_llama(LLAMA).config
    assert cfg == GPTConfig(vocab_size=61, context_length=32, d_model=32, n_layers=2, n_heads=4,
                            n_kv_heads=2, bias=False, tie_weights=False, pos="rope",
                            rope_theta=100.0, norm="rmsnorm", norm_eps=1e-6, mlp="swiglu",
                            mlp_hidden=40)


def test_float32_logits_match_transformers(expected, device):
    model = from_hf_llama(LLAMA, device=device)
    assert not model.training and model.dtype == np.float32
    logits = to_numpy(model.forward(expected["idx"]))
    assert logits.dtype == np.float32
    np.testing.assert_allclose(logits, expected["logits"], rtol=RTOL, atol=ATOL)


def test_float64_logits_loss_and_every_gradient_match_pytorch(expected, device):
    """tinylm's hand-written backward against PyTorch autograd through transformers'
    LlamaForCausalLM, parameter by parameter, in float64."""
    model = from_hf_llama(LLAMA, device=device, dtype="float64")
    loss_fn = SoftmaxCrossEntropy()
    logits = model.forward(expected["idx"])  # (B, T, V)
    close64(logits, expected["logits64"])
    loss = loss_fn.forward(logits, to_device(expected["targets"], model.xp))
    np.testing.assert_allclose(loss, expected["loss64"], rtol=RTOL64)

    model.zero_grad()
    model.backward(loss_fn.backward())
    grads = {name: to_numpy(g) for name, _, g in model.parameters()}
    reference = {k.removeprefix("grad."): v for k, v in expected.items() if k.startswith("grad.")}
    assert grads.keys() == reference.keys()  # every parameter is compared
    for name, ref in reference.items():
        assert np.abs(ref).max() > 1e-6, name  # the fixture makes every gradient count
        np.testing.assert_allclose(grads[name], ref, rtol=RTOL64,
                                   atol=RTOL64 * np.abs(ref).max(), err_msg=name)


def test_the_rotation_and_the_norm_weights_matter(ckpt, expected):
    """The fixture's RoPE turns visibly over its 12 positions (rope_theta 100): with
    Llama's default base of 10000 the logits move far beyond the tolerance."""
    edit_config(ckpt, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    assert np.abs(from_hf_llama(ckpt).forward(expected["idx"]) - expected["logits"]).max() > 1e-2
    # and every RMSNorm weight is away from 1, so a norm weight that is not applied shows
    tensors = fixture_tensors()
    norms = [v for k, v in tensors.items() if "norm" in k]
    assert len(norms) == 5 and all(np.abs(v - 1).max() > 0.3 for v in norms)


def test_kv_cache_generation_gives_the_uncached_logits(expected, device):
    model = from_hf_llama(LLAMA, device=device, dtype="float64")
    idx = expected["idx"]  # (2, 12)
    full = to_numpy(model.forward(idx))  # (B, T, V)
    cache = KVCache.for_model(model, batch_size=2)
    close64(model.forward_cached(idx[:, :5], cache, all_logits=True), full[:, :5])  # prefill
    for t in range(5, idx.shape[1]):  # one token at a time
        close64(model.forward_cached(idx[:, t:t + 1], cache), full[:, t])
    greedy = [generate(model, idx[:, :4], 12, temperature=0, use_cache=c) for c in (True, False)]
    np.testing.assert_array_equal(to_numpy(greedy[0]), to_numpy(greedy[1]))


# ---------------------------------------------------------------------------
# Mistral: the sliding window
# ---------------------------------------------------------------------------


def test_mistral_sliding_window_matches_transformers(expected_mistral, device):
    """transformers' window (key j visible from query i iff i - W < j <= i) is tinylm's:
    the fixture has sliding_window 5 and 12 positions."""
    model = from_hf_llama(MISTRAL, device=device, dtype="float64")
    assert model.config.sliding_window == 5 and model.config.n_layers == 1
    close64(model.forward(expected_mistral["idx"]), expected_mistral["logits64"])
    model32 = from_hf_llama(MISTRAL, device=device)
    np.testing.assert_allclose(to_numpy(model32.forward(expected_mistral["idx"])),
                               expected_mistral["logits"], rtol=RTOL, atol=ATOL)


def test_mistral_window_matters_and_the_cache_slides(tmp_path, expected_mistral):
    idx = expected_mistral["idx"]
    model = from_hf_llama(MISTRAL, dtype="float64")
    cache = KVCache.for_model(model, batch_size=2)
    assert cache.slots == 5
    full = model.forward(idx)  # (B, 12, V)
    close64(model.forward_cached(idx[:, :3], cache, all_logits=True), full[:, :3])
    for t in range(3, idx.shape[1]):  # past the window: the cache drops the oldest keys
        close64(model.forward_cached(idx[:, t:t + 1], cache), full[:, t])

    # without the window (sliding_window null: Mistral v0.2 and later) the logits change
    out = tmp_path / "nowindow"
    shutil.copytree(MISTRAL, out)
    edit_config(out, sliding_window=None)
    unwindowed = from_hf_llama(out, dtype="float64")
    assert unwindowed.config.sliding_window is None
    assert np.abs(unwindowed.forward(idx) - expected_mistral["logits64"]).max() > 1e-2


# ---------------------------------------------------------------------------
# tinylm -> Hugging Face Llama, and back
# ---------------------------------------------------------------------------


def test_export_matches_the_fixture_and_reads_back(tmp_path, expected):
    """to_hf_llama of the loaded fixture writes what LlamaForCausalLM.save_pretrained
    wrote: the same tensor names, shapes and dtypes, metadata and architecture keys."""
    model = from_hf_llama(LLAMA)
    out = tmp_path / "out"
    to_hf_llama(model, out)
    ours, metadata, _ = read_header(out / "model.safetensors")
    theirs, reference_metadata, _ = read_header(LLAMA / "model.safetensors")
    assert {k: (i.dtype, i.shape) for k, i in ours.items()} == \
           {k: (i.dtype, i.shape) for k, i in theirs.items()}
    assert metadata == reference_metadata == {"format": "pt"}
    written = load_file(out / "model.safetensors")
    for name, array in load_file(LLAMA / "model.safetensors").items():
        np.testing.assert_array_equal(written[name], array, err_msg=name)

    config = json.loads((out / "config.json").read_text())
    reference = json.loads((LLAMA / "config.json").read_text())
    architecture = ["architectures", "model_type", "vocab_size", "max_position_embeddings",
                    "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act",
                    "rms_norm_eps", "rope_parameters", "tie_word_embeddings", "attention_bias",
                    "mlp_bias"]
    assert {k: config[k] for k in architecture} == {k: reference[k] for k in architecture}
    # nothing transformers does not know; rope_theta is for transformers < 5
    assert set(config) <= set(reference) | {"rope_theta"}

    back = from_hf_llama(out)
    assert back.config == model.config
    np.testing.assert_array_equal(back.forward(expected["idx"]), model.forward(expected["idx"]))


@pytest.mark.parametrize("variant", [dict(tie_weights=False), dict(tie_weights=True),
                                     dict(tie_weights=False, sliding_window=3),
                                     dict(tie_weights=True, n_kv_heads=1)])
def test_export_then_import_is_identical(tmp_path, variant, device):
    cfg = GPTConfig(vocab_size=50, context_length=16, d_model=16, n_layers=2, n_heads=4,
                    **{"n_kv_heads": 2, **variant}, pos="rope", rope_theta=321.0,
                    norm="rmsnorm", norm_eps=1e-5, mlp="swiglu", mlp_hidden=24, bias=False)
    model = GPT(cfg, seed=3, device=device)
    to_hf_llama(model, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == ("mistral" if cfg.sliding_window else "llama")
    names = set(read_header(tmp_path / "out" / "model.safetensors")[0])
    assert ("lm_head.weight" in names) == (not cfg.tie_weights)
    back = from_hf_llama(tmp_path / "out", device=device)
    assert back.config == cfg
    before, after = model.state_dict(), back.state_dict()
    assert before.keys() == after.keys()
    for name in before:
        np.testing.assert_array_equal(after[name], before[name], err_msg=name)


def test_export_spells_out_the_default_widths(tmp_path):
    """n_kv_heads=None and mlp_hidden=None become the numbers they stand for: the
    same network, and the re-imported config says so explicitly."""
    cfg = GPTConfig(vocab_size=50, context_length=16, d_model=24, n_layers=1, n_heads=3,
                    pos="rope", norm="rmsnorm", mlp="swiglu", bias=False, tie_weights=False)
    model = GPT(cfg, seed=5)
    to_hf_llama(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert (config["num_key_value_heads"], config["intermediate_size"]) == (3, 64)
    back = from_hf_llama(tmp_path)
    assert back.config == dataclasses.replace(cfg, n_kv_heads=3, mlp_hidden=64)
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(back.state_dict()[name], value, err_msg=name)


def test_export_refuses_models_that_are_not_llamas(tmp_path):
    gpt2 = GPTConfig(vocab_size=50, context_length=16, d_model=16, n_layers=1, n_heads=2)
    with pytest.raises(HFCheckpointError, match="GPTConfig.pos is 'learned'; a Llama needs "
                                                "pos='rope'"):
        to_hf_llama(GPT(gpt2), tmp_path)
    moe = GPTConfig(vocab_size=50, context_length=16, d_model=16, n_layers=1, n_heads=2,
                    pos="rope", norm="rmsnorm", mlp="swiglu", bias=False, n_experts=2)
    with pytest.raises(HFCheckpointError, match="GPTConfig.n_experts is 2"):
        to_hf_llama(GPT(moe), tmp_path)
    assert not (tmp_path / "config.json").exists()


# ---------------------------------------------------------------------------
# config.json: what is accepted, what is refused
# ---------------------------------------------------------------------------


def test_missing_keys_take_transformers_defaults():
    shape = dict(vocab_size=10, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                 num_attention_heads=4)
    llama = config_from_hf_llama({"model_type": "llama", **shape})
    assert (llama.n_kv_heads, llama.norm_eps, llama.rope_theta, llama.context_length,
            llama.tie_weights, llama.sliding_window) == (4, 1e-6, 10000.0, 2048, False, None)
    mistral = config_from_hf_llama({"model_type": "mistral", **shape, "num_attention_heads": 8})
    assert (mistral.n_kv_heads, mistral.sliding_window, mistral.context_length) == \
           (8, 4096, 131072)
    # a Llama config's sliding_window is not used by LlamaForCausalLM, so not by tinylm
    assert config_from_hf_llama({**shape, "sliding_window": 4}).sliding_window is None


def test_supported_config_variants(ckpt, expected):
    # transformers 4's spelling: rope_theta at the top level, rope_scaling null;
    # "swish" is transformers' other name for SiLU
    edit_config(ckpt, drop=["rope_parameters", "head_dim"], rope_theta=100, rope_scaling=None,
                hidden_act="swish", pretraining_tp=1)
    model = from_hf_llama(ckpt)
    assert model.config.rope_theta == 100.0
    np.testing.assert_allclose(model.forward(expected["idx"]), expected["logits"],
                               rtol=RTOL, atol=ATOL)
    edit_config(ckpt, rope_scaling={"type": "default"})
    assert from_hf_llama(ckpt).config.rope_theta == 100.0


@pytest.mark.parametrize("changes, message", [
    ({"hidden_act": "gelu"}, "hidden_act is 'gelu'; tinylm's SwiGLU gates with SiLU"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 100.0, "factor": 8.0}},
     "rope_parameters has rope_type 'llama3'; tinylm computes plain RoPE only"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling has rope_type 'linear'"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 0}}, "rope_theta is 0"),
    ({"rope_parameters": [100.0]}, "rope_parameters is [100.0]; expected a JSON object"),
    ({"attention_bias": True}, "attention_bias is True; tinylm's Llama has no biases"),
    ({"mlp_bias": True}, "mlp_bias is True"),
    ({"head_dim": 16}, "head_dim is 16; tinylm's heads are hidden_size / num_attention_heads "
                       "= 32 / 4 wide"),
    ({"model_type": "gpt2"}, "model_type is 'gpt2'; only Llama ('llama') and Mistral"),
    ({"model_type": "qwen2"}, "model_type is 'qwen2'"),
    ({"rms_norm_eps": "1e-6"}, "rms_norm_eps is '1e-6'; expected a finite number > 0"),
    ({"tie_word_embeddings": "yes"}, "tie_word_embeddings must be true or false, got 'yes'"),
    ({"num_key_value_heads": 3},
     "n_heads (4) must be a multiple of GPTConfig.n_kv_heads (3)"),
    ({"num_attention_heads": 5, "head_dim": None},
     "d_model (32) must be divisible by GPTConfig.n_heads (5)"),
    ({"num_hidden_layers": 0}, "not a valid model shape: GPTConfig.n_layers must be >= 1"),
    ({"intermediate_size": None}, "intermediate_size is None; expected an int"),
])
def test_unsupported_config(ckpt, changes, message):
    edit_config(ckpt, **changes)
    with pytest.raises(HFCheckpointError, match="config.json") as info:
        from_hf_llama(ckpt)
    assert message in str(info.value)


def test_config_without_shape_keys(ckpt):
    edit_config(ckpt, drop=["hidden_size"])
    with pytest.raises(HFCheckpointError, match=r"config.json: missing \['hidden_size'\]"):
        from_hf_llama(ckpt)


# ---------------------------------------------------------------------------
# The weights: layouts that load, and clear errors
# ---------------------------------------------------------------------------


def test_names_without_prefix_and_old_rope_buffers_load(ckpt, expected):
    tensors = {k.removeprefix("model."): v for k, v in fixture_tensors().items()}
    for i in range(2):  # transformers < 4.31 saved RoPE's inverse frequencies
        tensors[f"layers.{i}.self_attn.rotary_emb.inv_freq"] = np.ones(4, np.float32)
    save_file(tensors, ckpt / "model.safetensors")
    np.testing.assert_allclose(from_hf_llama(ckpt).forward(expected["idx"]), expected["logits"],
                               rtol=RTOL, atol=ATOL)
    tensors["model.norm.weight"] = tensors["norm.weight"]
    save_file(tensors, ckpt / "model.safetensors")
    with pytest.raises(HFCheckpointError, match="'norm.weight' is stored twice"):
        from_hf_llama(ckpt)


def test_tied_checkpoints(ckpt):
    edit_config(ckpt, tie_word_embeddings=True)
    with pytest.raises(HFCheckpointError, match="lm_head.weight differs from "
                                                "embed_tokens.weight"):
        from_hf_llama(ckpt)
    rewrite(ckpt, lambda t: t.pop("lm_head.weight"))  # what save_pretrained writes when tied
    model = from_hf_llama(ckpt)
    assert model.config.tie_weights and "head.weight" not in model.state_dict()


def test_sharded_and_half_precision_checkpoints(ckpt, expected):
    tensors = fixture_tensors()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[:9],
              "model-00002-of-00002.safetensors": names[9:]}
    for shard, shard_names in shards.items():
        save_file({k: tensors[k] for k in shard_names}, ckpt / shard)
    (ckpt / "model.safetensors").unlink()
    weight_map = {k: shard for shard, shard_names in shards.items() for k in shard_names}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    np.testing.assert_allclose(from_hf_llama(ckpt).forward(expected["idx"]), expected["logits"],
                               rtol=RTOL, atol=ATOL)

    half = {k: v.astype(np.float16) for k, v in tensors.items()}
    save_file(half, ckpt / "model-00001-of-00002.safetensors")  # the index still points here
    weight_map = dict.fromkeys(half, "model-00001-of-00002.safetensors")
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    state = from_hf_llama(ckpt).state_dict()
    assert state["tok_emb.weight"].dtype == np.float32
    np.testing.assert_array_equal(state["blocks.1.mlp.down.weight"],
                                  half["model.layers.1.mlp.down_proj.weight"].T.astype(np.float32))


def test_missing_tensor(ckpt):
    rewrite(ckpt, lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(HFCheckpointError,
                       match=r"model.safetensors: missing tensors layers.1.self_attn.k_proj.weight "
                             "for a Llama with num_hidden_layers=2"):
        from_hf_llama(ckpt)


def test_untied_checkpoint_needs_lm_head(ckpt):
    rewrite(ckpt, lambda t: t.pop("lm_head.weight"))
    with pytest.raises(HFCheckpointError, match="missing tensors lm_head.weight"):
        from_hf_llama(ckpt)


def test_unexpected_tensors(ckpt):
    rewrite(ckpt, lambda t: t.update({"model.layers.2.input_layernorm.weight": np.ones(32, "f4"),
                                      "model.layers.0.self_attn.q_proj.bias": np.ones(32, "f4")}))
    with pytest.raises(HFCheckpointError,
                       match=r"model.safetensors: unexpected tensors "
                             r"layers.0.self_attn.q_proj.bias, layers.2.input_layernorm.weight"):
        from_hf_llama(ckpt)


def test_wrong_shape(ckpt):
    rewrite(ckpt, lambda t: t.update(
        {"model.layers.0.self_attn.k_proj.weight": np.zeros((32, 16), np.float32)}))  # transposed
    with pytest.raises(HFCheckpointError,
                       match=r"model.safetensors: layers.0.self_attn.k_proj.weight has shape "
                             r"\(32, 16\), expected \(16, 32\) from config.json .*"
                             r"num_key_value_heads=2"):
        from_hf_llama(ckpt)


def test_integer_weights(ckpt):
    rewrite(ckpt, lambda t: t.update({"model.norm.weight": np.ones(32, np.int32)}))
    with pytest.raises(HFCheckpointError, match="norm.weight has dtype int32"):
        from_hf_llama(ckpt)


def test_pickled_weights_and_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory .* Hugging Face Llama"):
        from_hf_llama(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="no config.json .*a Hugging Face Llama directory"):
        from_hf_llama(tmp_path)
    shutil.copy(LLAMA / "config.json", tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        from_hf_llama(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x02 not to be unpickled")
    with pytest.raises(HFCheckpointError, match="pytorch_model.bin, a pickled PyTorch") as info:
        from_hf_llama(tmp_path)
    assert "never unpickles" in str(info.value)
    assert "LlamaForCausalLM.from_pretrained" in str(info.value)
