"""LoRA (tinylm/lora.py): the LoRALinear layer against PyTorch, add_lora / merge_lora on a
whole GPT, freezing, the optimizer, and adapter checkpoints, on every backend."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tinylm import GPT, GPTConfig, lora
from tinylm.backend import to_device, to_numpy
from tinylm.fileio import FileFormatError
from tinylm.gradcheck import check_layer, randomize_params
from tinylm.lora import LoRALinear, add_lora, merge_lora
from tinylm.nn import KVCache, Linear, SoftmaxCrossEntropy
from tinylm.optim import AdamW, clip_grad_norm

FIXTURE = Path(__file__).parent / "fixtures" / "finetune_reference.npz"
RTOL, ATOL = 1e-10, 1e-12
SMALL = dict(vocab_size=11, context_length=8, d_model=8, n_layers=2, n_heads=2)


@pytest.fixture(scope="module")
def ref() -> dict[str, np.ndarray]:
    with np.load(FIXTURE, allow_pickle=False) as f:
        return {k[len("lora/"):]: f[k] for k in f.files if k.startswith("lora/")}


def small_gpt(device="cpu", dtype="float64", seed=0, **kw) -> GPT:
    return GPT(GPTConfig(**{**SMALL, **kw}), seed=seed, device=device, dtype=dtype)


def batch(model, B=3, T=6, seed=1):
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, model.config.vocab_size, (B, T))
    targets = rng.integers(0, model.config.vocab_size, (B, T))
    return to_device(idx, model.xp), to_device(targets, model.xp)


def nudge_adapters(model, seed=5, scale=0.3):
    """Adapters away from B = 0, as after some training."""
    randomize_params(model, np.random.default_rng(seed), scale=scale)


def logits_of(model, idx) -> np.ndarray:
    return to_numpy(model.forward(idx))


# -- the layer ------------------------------------------------------------------------


def test_lora_linear_matches_pytorch(ref, device):
    """Forward and every gradient (x, A, B) against autograd
    (scripts/make_finetune_reference.py)."""
    base = Linear(5, 7).to(device, "float64")
    xp = base.xp
    base.params["weight"][...] = to_device(ref["weight"], xp)
    base.params["bias"][...] = to_device(ref["bias"], xp)
    layer = LoRALinear(base, rank=int(ref["rank"]), alpha=float(ref["alpha"]))
    layer.params["lora_A"][...] = to_device(ref["A"], xp)
    layer.params["lora_B"][...] = to_device(ref["B"], xp)
    y = layer.forward(to_device(ref["x"], xp))
    np.testing.assert_allclose(to_numpy(y), ref["y"], rtol=RTOL, atol=ATOL)
    dx = layer.backward(to_device(ref["dy"], xp))
    np.testing.assert_allclose(to_numpy(dx), ref["grad/x"], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(to_numpy(layer.grads["lora_A"]), ref["grad/A"], rtol=RTOL,
                               atol=ATOL)
    np.testing.assert_allclose(to_numpy(layer.grads["lora_B"]), ref["grad/B"], rtol=RTOL,
                               atol=ATOL)


def test_base_weights_are_buffers_without_gradients(device):
    base = Linear(4, 6).to(device)
    weight = base.params["weight"]
    layer = LoRALinear(base, rank=2, alpha=4.0)
    assert set(layer.params) == set(layer.grads) == {"lora_A", "lora_B"}
    assert layer.buffers["weight"] is weight  # taken over, not copied
    assert layer.params["lora_A"].shape == (4, 2) and layer.params["lora_B"].shape == (2, 6)
    assert layer.params["lora_A"].dtype == np.float32 and layer.xp is base.xp
    assert float(abs(layer.params["lora_B"]).max()) == 0.0
    bound = 1 / np.sqrt(4)  # Kaiming-uniform(a=sqrt(5)) on fan-in 4
    A = to_numpy(layer.params["lora_A"])
    assert A.min() >= -bound and A.max() <= bound and A.std() > 0.1 * bound
    layer.to(dtype="float64")
    assert layer.buffers["weight"].dtype == np.float64 == layer.params["lora_A"].dtype


def test_checker_catches_a_wrong_lora_backward():
    class Broken(LoRALinear):
        def backward(self, dout):
            dx = super().backward(dout)
            self.grads["lora_A"] /= self.scale  # forgot alpha / rank once
            return dx

    base = Linear(5, 4).to(dtype="float64")
    layer = Broken(base, rank=2, alpha=8.0)
    randomize_params(layer, np.random.default_rng(0))
    results = {r.name: r for r in check_layer(layer, np.random.default_rng(1).random((3, 5)))}
    assert results["input"].passed and results["lora_B"].passed
    assert not results["lora_A"].passed


# -- add_lora ---------------------------------------------------------------------------


def test_add_lora_starts_unchanged(device):
    model = small_gpt(device)
    idx, _ = batch(model)
    before = logits_of(model, idx)
    assert add_lora(model) is model
    np.testing.assert_array_equal(logits_of(model, idx), before)  # B = 0: exactly unchanged


def test_parameters_are_only_the_adapters():
    model = add_lora(small_gpt(), rank=4)
    names = [name for name, _, _ in model.parameters()]
    assert names == [f"blocks.{i}.attn.{m}.lora_{ab}"
                     for i in range(2) for m in ("qkv", "proj") for ab in "AB"]
    shapes = {name: p.shape for name, p, _ in model.parameters()}
    assert shapes["blocks.0.attn.qkv.lora_A"] == (8, 4)
    assert shapes["blocks.0.attn.qkv.lora_B"] == (4, 24)
    assert set(model.state_dict()) == set(names)  # state_dict follows parameters()
    assert model.num_parameters() == 2 * (8 * 4 + 4 * 24 + 8 * 4 + 4 * 8)
    assert "LoRALinear(in=8, out=24, bias=True, rank=4, alpha=16)" in repr(model)


def test_targets_patterns_and_errors():
    names = lambda m: sorted(lora.lora_layers(m))  # noqa: E731
    assert names(add_lora(small_gpt(), targets="blocks.1.mlp.*")) == [
        "blocks.1.mlp.fc", "blocks.1.mlp.proj"]
    assert names(add_lora(small_gpt(), targets=["blocks.0.attn.qkv"])) == ["blocks.0.attn.qkv"]
    every = names(add_lora(small_gpt(tie_weights=False), targets="all-linear"))
    assert len(every) == 8 and "head" not in every  # the output head is not a block layer
    assert names(add_lora(small_gpt(tie_weights=False), targets="head")) == ["head"]
    with pytest.raises(ValueError, match="'attn.qvk' matches no Linear.*blocks.0.attn.qkv"):
        add_lora(small_gpt(), targets=("attn.qkv", "attn.qvk"))
    model = add_lora(small_gpt())
    with pytest.raises(ValueError, match="already has an adapter"):
        add_lora(model, targets="attn.proj")
    add_lora(model, targets="mlp.fc")  # other layers may get theirs later
    assert len(lora.lora_layers(model)) == 6
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="rank"):
            add_lora(small_gpt(), rank=bad)
    with pytest.raises(ValueError, match="alpha"):
        add_lora(small_gpt(), alpha=0.0)


def test_seed_gives_the_same_adapters_on_every_device(device):
    a = lora.lora_state_dict(add_lora(small_gpt(device), seed=3))
    b = lora.lora_state_dict(add_lora(small_gpt("cpu"), seed=3))
    c = lora.lora_state_dict(add_lora(small_gpt("cpu"), seed=4))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(a["blocks.0.attn.qkv.lora_A"], c["blocks.0.attn.qkv.lora_A"])


def test_adamw_and_clipping_step_only_the_adapters(device):
    model = small_gpt(device, dtype="float32")
    add_lora(model, rank=2)
    base_before = {k: v for k, v in lora.full_state_dict(model).items() if "lora" not in k}
    adapters_before = lora.lora_state_dict(model)
    opt = AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    assert sorted(opt.m) == sorted(adapters_before)  # moments for the adapters alone
    loss_fn = SoftmaxCrossEntropy()
    idx, targets = batch(model)
    losses = []
    for _ in range(5):
        model.zero_grad()
        losses.append(loss_fn.forward(model.forward(idx), targets))
        model.backward(loss_fn.backward())
        clip_grad_norm(model.parameters(), 1.0)
        opt.step()
    after = lora.full_state_dict(model)
    for k, v in base_before.items():
        np.testing.assert_array_equal(after[k], v, err_msg=k)  # frozen, bit for bit
    for k, v in adapters_before.items():
        assert np.abs(after[k] - v).max() > 1e-4, k  # trained (A too, once B != 0)
    assert losses[-1] < losses[0]


def test_kv_cache_generation_sees_the_adapters(device):
    model = add_lora(small_gpt(device))
    nudge_adapters(model)
    model.eval()
    idx, _ = batch(model, B=2, T=5)
    full = logits_of(model, idx)
    cache = KVCache.for_model(model, 2)
    cached = to_numpy(model.forward_cached(idx, cache, all_logits=True))
    np.testing.assert_allclose(cached, full, atol=1e-12)


def test_adapters_disabled_runs_the_base(device):
    """DPO's reference without a second model: the adapted model with its adapters off."""
    model = small_gpt(device)
    idx, targets = batch(model)
    base = logits_of(model, idx)
    add_lora(model)
    nudge_adapters(model)
    adapted = logits_of(model, idx)
    assert np.abs(adapted - base).max() > 1e-3
    with lora.adapters_disabled(model):
        np.testing.assert_array_equal(logits_of(model, idx), base)
        loss_fn = SoftmaxCrossEntropy()
        loss_fn.forward(model.forward(idx), targets)
        model.zero_grad()
        model.backward(loss_fn.backward())  # through the base alone: no adapter gradient
        assert all(float(abs(g).max()) == 0.0 for _, _, g in model.parameters())
    with pytest.raises(KeyError), lora.adapters_disabled(model):
        raise KeyError("an error inside")
    np.testing.assert_array_equal(logits_of(model, idx), adapted)  # back on, error or not


# -- merge_lora, state ---------------------------------------------------------------


@pytest.mark.parametrize("variant", [{}, dict(pos="rope", norm="rmsnorm", mlp="swiglu",
                                              bias=False, tie_weights=False)])
def test_merge_lora_keeps_the_logits(device, variant):
    model = small_gpt(device, **variant)
    base_names = list(model.state_dict())
    add_lora(model, rank=3, alpha=5.0, targets="all-linear")
    nudge_adapters(model)
    idx, _ = batch(model)
    adapted = logits_of(model, idx)
    assert merge_lora(model) is model
    np.testing.assert_allclose(logits_of(model, idx), adapted, rtol=0, atol=1e-12)
    assert list(model.state_dict()) == base_names  # every base parameter trains again
    assert not any("lora" in name for name, _, _ in model.parameters())
    assert not lora.lora_layers(model) and not any(lora.is_frozen(m) for m in model.modules())
    assert all(type(m) is not LoRALinear for m in model.modules())


def test_full_state_dict_holds_base_and_adapters():
    model = small_gpt()
    base = model.state_dict()
    add_lora(model)
    full = lora.full_state_dict(model)
    adapters = lora.lora_state_dict(model)
    assert set(full) == set(base) | set(adapters)
    for k, v in base.items():
        np.testing.assert_array_equal(full[k], v)
    assert all(k.endswith((".lora_A", ".lora_B")) for k in adapters)


def test_load_lora_checks_names_and_shapes():
    model = add_lora(small_gpt())
    state = lora.lora_state_dict(model)
    state["blocks.0.attn.qkv.lora_B"] = state["blocks.0.attn.qkv.lora_B"] + 1.0
    lora.load_lora(model, state)
    np.testing.assert_array_equal(lora.lora_state_dict(model)["blocks.0.attn.qkv.lora_B"],
                                  state["blocks.0.attn.qkv.lora_B"])
    with pytest.raises(ValueError, match="missing"):
        lora.load_lora(model, {k: v for k, v in state.items() if "proj" not in k})
    state["blocks.0.attn.qkv.lora_A"] = np.zeros((8, 3))
    with pytest.raises(ValueError, match="shape mismatch"):
        lora.load_lora(model, state)


# -- adapter checkpoints -----------------------------------------------------------------


def test_adapter_round_trip(tmp_path, device):
    model = add_lora(small_gpt(device), rank=2, alpha=4.0)
    nudge_adapters(model)
    idx, _ = batch(model)
    expected = logits_of(model, idx)
    path = lora.save_adapter(tmp_path / "adapter", model)
    assert sorted(p.name for p in path.iterdir()) == ["adapter.json", "adapter.npz"]
    meta = json.loads((path / "adapter.json").read_text())
    assert (meta["format"], meta["version"], meta["rank"], meta["alpha"]) == (
        "tinylm-lora-adapter", 1, 2, 4.0)
    base = small_gpt(device)  # the same base, rebuilt
    assert lora.load_adapter(path, base) is base
    np.testing.assert_array_equal(logits_of(base, idx), expected)
    lora.load_adapter(path, base)  # again, onto the same adapters: allowed
    other_dtype = small_gpt("cpu", dtype="float32")  # the same base in float32 loads too
    lora.load_adapter(path, other_dtype)
    np.testing.assert_allclose(logits_of(other_dtype, to_numpy(idx)), expected, atol=1e-5)


def test_adapter_refuses_another_base(tmp_path):
    model = add_lora(small_gpt(), rank=2)
    nudge_adapters(model)
    path = lora.save_adapter(tmp_path / "a", model)
    with pytest.raises(ValueError, match="another base model: the weights differ"):
        lora.load_adapter(path, small_gpt(seed=1))
    with pytest.raises(ValueError, match=r"config differs in \['n_layers'\]"):
        lora.load_adapter(path, small_gpt(n_layers=3))
    with pytest.raises(ValueError, match="weights differ"):  # adapters already folded in
        lora.load_adapter(path, merge_lora(model))
    with pytest.raises(ValueError, match="other LoRA adapters"):
        lora.load_adapter(path, add_lora(small_gpt(), rank=3))
    with pytest.raises(ValueError, match="no LoRA adapters"):
        lora.save_adapter(tmp_path / "b", small_gpt())


def test_adapter_file_damage_is_refused(tmp_path):
    path = lora.save_adapter(tmp_path / "a", add_lora(small_gpt()))
    npz = path / "adapter.npz"
    data = bytearray(npz.read_bytes())
    data[len(data) // 2] ^= 0xFF
    npz.write_bytes(bytes(data))
    with pytest.raises(FileFormatError, match="sha256 differs"):
        lora.load_adapter(path, small_gpt())
    meta = json.loads((path / "adapter.json").read_text())
    (path / "adapter.json").write_text(json.dumps({**meta, "version": 2}))
    with pytest.raises(FileFormatError, match="version 2 is not supported"):
        lora.read_adapter(path)
    (path / "adapter.json").write_text(json.dumps({**meta, "format": "tinylm-checkpoint"}))
    with pytest.raises(FileFormatError, match="not a tinylm-lora-adapter"):
        lora.read_adapter(path)
    with pytest.raises(FileNotFoundError):
        lora.read_adapter(tmp_path / "nowhere")


def test_adapter_of_the_default_preset_is_small(tmp_path):
    """Rank 8 on the CPU preset's shape: ~100 KB, against ~3 MB for the whole model."""
    from tinylm.training.presets import PRESETS  # (tinylm.train.PRESETS, without the trainer)

    model = GPT(PRESETS["shakespeare-char-cpu"].gpt_config(65), seed=0)
    add_lora(model, rank=8)
    path = lora.save_adapter(tmp_path / "a", model)
    size = sum(p.stat().st_size for p in path.iterdir())
    assert model.num_parameters() == 4 * (128 * 8 + 8 * 384 + 128 * 8 + 8 * 128)
    assert size < 200_000
