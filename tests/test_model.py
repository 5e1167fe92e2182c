"""The GPT model: config validation, names, seeds, dtypes, bad input, and learning."""

from __future__ import annotations

import numpy as np
import pytest

from tinylm import GPT, GPTConfig
from tinylm.backend import get_xp, to_device, to_numpy
from tinylm.nn import SoftmaxCrossEntropy
from tinylm.optim import AdamW, clip_grad_norm

SMALL = dict(vocab_size=17, context_length=8, d_model=12, n_layers=2, n_heads=3)


def expected_names(L, bias=True, tied=True):
    names = ["tok_emb.weight", "pos_emb.weight"]
    for i in range(L):
        for layer in ["ln1", "attn.qkv", "attn.proj", "ln2", "mlp.fc", "mlp.proj"]:
            names.append(f"blocks.{i}.{layer}.weight")
            if bias:
                names.append(f"blocks.{i}.{layer}.bias")
    names += ["ln_f.weight"] + (["ln_f.bias"] if bias else [])
    return names + ([] if tied else ["head.weight"])


@pytest.mark.parametrize("bias, tied", [(True, True), (False, False), (True, False)])
def test_state_dict_names_and_shapes(bias, tied):
    model = GPT(GPTConfig(**SMALL, bias=bias, tie_weights=tied))
    state = model.state_dict()
    assert sorted(state) == sorted(expected_names(2, bias, tied))
    assert [n for n, _, _ in model.parameters()] == list(state)
    d, V = 12, 17
    assert state["tok_emb.weight"].shape == (V, d)
    assert state["pos_emb.weight"].shape == (8, d)
    assert state["blocks.1.attn.qkv.weight"].shape == (d, 3 * d)
    assert state["blocks.0.mlp.fc.weight"].shape == (d, 4 * d)
    assert state["blocks.0.mlp.proj.weight"].shape == (4 * d, d)
    if not tied:
        assert state["head.weight"].shape == (d, V)


def test_gpt2_initialisation():
    cfg = GPTConfig(vocab_size=512, context_length=64, d_model=64, n_layers=4, n_heads=4)
    state = GPT(cfg, seed=1).state_dict()
    assert state["tok_emb.weight"].std() == pytest.approx(0.02, rel=0.05)
    assert state["blocks.0.attn.qkv.weight"].std() == pytest.approx(0.02, rel=0.05)
    proj_std = 0.02 / np.sqrt(2 * 4)
    assert state["blocks.2.attn.proj.weight"].std() == pytest.approx(proj_std, rel=0.1)
    assert state["blocks.3.mlp.proj.weight"].std() == pytest.approx(proj_std, rel=0.1)
    assert np.all(state["blocks.0.attn.qkv.bias"] == 0)
    assert np.all(state["blocks.0.ln1.weight"] == 1) and np.all(state["ln_f.bias"] == 0)


def test_same_seed_same_weights_on_every_backend(fake_cuda):
    a = GPT(GPTConfig(**SMALL), seed=7).state_dict()
    b = GPT(GPTConfig(**SMALL), seed=7, device="cuda").state_dict()  # the CuPy double
    c = GPT(GPTConfig(**SMALL), seed=8).state_dict()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])
    assert not np.array_equal(a["tok_emb.weight"], c["tok_emb.weight"])


def test_float64_model_keeps_float64(device):
    xp = get_xp(device)
    model = GPT(GPTConfig(**SMALL), dtype="float64", device=device)
    logits = model.forward(to_device(np.zeros((1, 4), dtype=np.int64), xp))
    assert logits.dtype == np.float64 and logits.shape == (1, 4, 17)
    assert all(p.dtype == np.float64 for _, p, _ in model.parameters())


@pytest.mark.parametrize("kwargs, match", [
    (dict(d_model=10, n_heads=3), r"d_model \(10\) must be divisible by GPTConfig.n_heads \(3\)"),
    (dict(vocab_size=0), "vocab_size must be >= 1"),
    (dict(n_layers=2.0), "n_layers must be an int"),
    (dict(dropout=1.0), r"dropout must be in \[0, 1\)"),
    (dict(bias="yes"), "bias must be True or False"),
])
def test_config_errors_name_the_fields(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        GPTConfig(**{**SMALL, **kwargs})


def test_config_round_trip_and_unknown_fields():
    cfg = GPTConfig(**SMALL, dropout=0.1)
    assert GPTConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown GPTConfig fields.*'n_embd'"):
        GPTConfig.from_dict({**SMALL, "n_embd": 12})


def test_forward_input_errors():
    model = GPT(GPTConfig(**SMALL))
    with pytest.raises(ValueError, match="token id 17 at position .* outside the vocabulary"):
        model.forward(np.array([[1, 17, 2]]))
    with pytest.raises(ValueError, match="token id -1"):
        model.forward(np.array([[-1, 2]]))
    with pytest.raises(ValueError, match="sequence length 9 exceeds context_length 8"):
        model.forward(np.zeros((1, 9), dtype=np.int64))
    with pytest.raises(TypeError, match="integer token ids"):
        model.forward(np.zeros((1, 3), dtype=np.float32))
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        model.forward(np.zeros(3, dtype=np.int64))


def test_load_state_dict_errors():
    model = GPT(GPTConfig(**SMALL))
    state = model.state_dict()
    bad_shape = dict(state, **{"ln_f.weight": np.ones(5)})
    with pytest.raises(ValueError, match=r"shape mismatch for ln_f.weight.*\(5,\).*\(12,\)"):
        model.load_state_dict(bad_shape)
    missing = {k: v for k, v in state.items() if k != "pos_emb.weight"}
    with pytest.raises(ValueError, match=r"missing \['pos_emb.weight'\]"):
        model.load_state_dict(missing)
    with pytest.raises(ValueError, match=r"unexpected \['head.weight'\]"):
        model.load_state_dict(dict(state, **{"head.weight": np.zeros((12, 17))}))


def test_load_state_dict_keeps_array_identity():
    """Optimizers hold references to parameter arrays: loading must copy in place."""
    model = GPT(GPTConfig(**SMALL))
    before = [id(p) for _, p, _ in model.parameters()]
    other = GPT(GPTConfig(**SMALL), seed=5).state_dict()
    model.load_state_dict(other)
    assert [id(p) for _, p, _ in model.parameters()] == before
    np.testing.assert_array_equal(model.state_dict()["tok_emb.weight"], other["tok_emb.weight"])


def test_dropout_only_in_train_mode():
    model = GPT(GPTConfig(**SMALL, dropout=0.5), seed=0)
    idx = np.arange(8)[None] % 17
    model.eval()
    a, b = model.forward(idx), model.forward(idx)
    np.testing.assert_array_equal(a, b)
    model.train()
    c = model.forward(idx)
    assert not np.allclose(a, c)


def test_overfit_one_batch(device):
    """A tiny model memorises one batch: the loss goes close to zero."""
    xp = get_xp(device)
    model = GPT(GPTConfig(vocab_size=32, context_length=16, d_model=32, n_layers=2, n_heads=4),
                seed=0, device=device)
    rng = np.random.default_rng(0)
    idx = to_device(rng.integers(0, 32, (4, 16)), xp)
    targets = to_device(rng.integers(0, 32, (4, 16)), xp)  # random: only memorisation helps
    loss_fn = SoftmaxCrossEntropy()
    opt = AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    first = None
    for _ in range(150):
        model.zero_grad()
        loss = loss_fn.forward(model.forward(idx), targets)
        first = loss if first is None else first
        model.backward(loss_fn.backward())
        clip_grad_norm(model.parameters(), 1.0)
        opt.step()
    assert first > 3.0  # ~ln(32) at the start
    assert loss < 0.05, f"did not overfit: loss {loss}"


def test_training_step_identical_on_numpy_and_cupy_double(fake_cuda):
    """The cuda code path computes the same numbers as the CPU path."""
    rng = np.random.default_rng(0)
    idx, targets = rng.integers(0, 17, (3, 8)), rng.integers(0, 17, (3, 8))
    states = []
    for device in ("cpu", "cuda"):
        xp = get_xp(device)
        model = GPT(GPTConfig(**SMALL, dropout=0.1), seed=0, device=device, dtype="float64")
        loss_fn = SoftmaxCrossEntropy(label_smoothing=0.1)
        opt = AdamW(model.parameters(), lr=1e-2)
        for _ in range(3):
            model.zero_grad()
            loss_fn.forward(model.forward(to_device(idx, xp)), to_device(targets, xp))
            model.backward(loss_fn.backward())
            clip_grad_norm(model.parameters(), 0.5)
            opt.step()
        states.append(model.state_dict())
    for name in states[0]:
        # (summation order differs: reduceat on NumPy, add.at on CuPy -> rounding-level gaps)
        np.testing.assert_allclose(states[1][name], states[0][name], rtol=1e-10, atol=1e-13)
    assert isinstance(to_numpy(states[1]["tok_emb.weight"]), np.ndarray)


def test_repr_shows_the_tree():
    text = repr(GPT(GPTConfig(**SMALL)))
    assert text.startswith("GPT(")
    assert "(blocks.1): Block(" in text
    assert "(qkv): Linear(in=12, out=36, bias=True)" in text
    assert "(tok_emb): Embedding(num=17, dim=12)" in text
