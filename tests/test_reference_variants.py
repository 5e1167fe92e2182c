"""tinylm's Mixtral and Mistral variants against Hugging Face transformers, in float64.

The expected numbers come from transformers' MixtralForCausalLM (sliding-window
grouped-query attention with RoPE, RMSNorm, a top-2 mixture of 4 SwiGLU experts with
renormalised gate weights and the load-balancing loss) and MistralForCausalLM (the same
without experts, multi-query attention), run in float64 by
scripts/make_variant_reference.py, which wrote tests/fixtures/variant_reference.npz (see
its docstring for what it patched and why, and to regenerate). This test reads only that
file, with NumPy: neither PyTorch nor transformers is needed.

Both sequences are longer than the window (T = 10, W = 4 and 3), so the band of the mask
is exercised, and the router probabilities of every token are at least 1e-3 away from a
tie between the k-th and (k+1)-th expert, so both engines pick the same experts.

Agreement is to rounding (measured: ~1e-15 of each array's largest entry, ~1e-4 of the
tolerance below); any real mistake is off by far more. In particular the gradient
comparison fails if the aux loss's gradient were missing or wrong (it reaches the
routers' weights and, through them, every earlier layer: `test_the_aux_gradient_is_visible`
shows that leaving it out moves the router gradients by ~1e9 times the tolerance), if
the gate weights were not renormalised over the top k, in forward (the experts' outputs
would be scaled by sum(p_top) < 1: the logits differ) or in backward (the router's
gradient would miss the renormalisation's Jacobian), or if the window were off by one
(the logits differ).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tinylm import GPT, GPTConfig
from tinylm.backend import get_xp, to_device, to_numpy
from tinylm.nn import SoftmaxCrossEntropy

FIXTURE = Path(__file__).parent / "fixtures" / "variant_reference.npz"
NAMES = ["mixtral", "mistral"]
RTOL, ATOL = 1e-10, 1e-12


@pytest.fixture(scope="module")
def ref() -> dict[str, np.ndarray]:
    with np.load(FIXTURE, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def section(ref: dict, prefix: str) -> dict[str, np.ndarray]:
    """{'mixtral/grad/head.weight': a, ...} -> {'head.weight': a, ...} for one prefix."""
    return {k[len(prefix):]: v for k, v in ref.items() if k.startswith(prefix)}


def worst_error(actual, expected, rtol: float = RTOL, atol: float = ATOL):
    """(tolerance ratio (> 1 fails), index, max abs err, max rel err) of one array."""
    act, exp = np.asarray(actual, dtype=np.float64), np.asarray(expected)
    assert act.shape == exp.shape, f"shape {act.shape}, expected {exp.shape}"
    err = np.abs(act - exp)
    ratio = err / (atol + rtol * np.abs(exp))
    i = np.unravel_index(np.argmax(ratio), ratio.shape)
    rel = err / np.maximum(np.abs(exp), 1e-300)
    return float(ratio[i]), i, float(err.max()), float(rel.max())


def assert_close(actual: dict, expected: dict, what: str) -> None:
    """Every array of `expected` within tolerance, naming the worst offender."""
    failing = []
    for name, exp in expected.items():
        ratio, i, max_abs, max_rel = worst_error(actual[name], exp)
        if ratio > 1:
            failing.append((ratio, name, i, max_abs, max_rel))
    if failing:
        ratio, name, i, max_abs, max_rel = max(failing, key=lambda f: f[0])
        raise AssertionError(
            f"{what}: {len(failing)} of {len(expected)} differ from Hugging Face "
            f"(rtol={RTOL}, atol={ATOL}): {sorted(f[1] for f in failing)}\n"
            f"worst: {name} at {tuple(int(j) for j in i)}: got {np.asarray(actual[name])[i]!r}, "
            f"expected {expected[name][i]!r} (max abs err {max_abs:.2e}, max rel err {max_rel:.2e})"
        )


def build(ref: dict, name: str, device: str = "cpu") -> GPT:
    """A float64 tinylm GPT with the fixture's config and starting weights."""
    config = GPTConfig(**json.loads(str(ref[f"{name}/config"])))
    model = GPT(config, seed=0, device=device, dtype="float64")
    model.load_state_dict(section(ref, f"{name}/param/"))
    return model


def run(ref: dict, name: str, device: str = "cpu", daux: float = 1.0):
    """Forward, CE loss, aux loss and backward of CE + daux * aux: host arrays."""
    model = build(ref, name, device)
    xp = get_xp(device)
    loss_fn = SoftmaxCrossEntropy()
    model.zero_grad()
    logits = model.forward(to_device(ref[f"{name}/idx"], xp))
    loss = loss_fn.forward(logits, to_device(ref[f"{name}/targets"], xp))
    aux = model.aux_loss
    model.backward(loss_fn.backward(), daux=daux)
    grads = {n: to_numpy(g) for n, _, g in model.parameters()}
    per_layer = np.array([sum(m.aux_loss for m in block.aux_layers()) for block in model.blocks])
    return model, to_numpy(logits), float(loss), float(aux), per_layer, grads


def test_fixture_is_plain_float64(ref):
    meta = json.loads(str(ref["meta"]))
    assert meta["dtype"] == "float64" and meta["torch_version"] and meta["transformers_version"]
    for key, value in ref.items():
        assert value.dtype.kind in "fiU", key
        assert value.dtype.kind != "f" or value.dtype == np.float64, key


@pytest.mark.parametrize("name", NAMES)
def test_the_configs_are_the_variants_under_test(ref, name):
    config = GPTConfig(**json.loads(str(ref[f"{name}/config"])))
    T = ref[f"{name}/idx"].shape[1]
    assert (config.pos, config.norm, config.mlp, config.bias, config.tie_weights) == (
        "rope", "rmsnorm", "swiglu", False, False)
    assert config.kv_heads < config.n_heads  # grouped-query (or multi-query) attention
    assert config.sliding_window < T  # the window cuts
    info = json.loads(str(ref[f"{name}/hf_config"]))
    assert info["model"]["sliding_window"] == config.sliding_window
    if name == "mixtral":
        assert config.n_experts == 4 and config.experts_per_token == 2
        assert info["min_router_gap"] >= 1e-3  # no near-ties in the top-k choice
        for counts in info["tokens_per_expert"]:  # every expert used by some, not all, tokens
            assert 0 < min(counts) and max(counts) < ref[f"{name}/idx"].size


@pytest.mark.parametrize("name", NAMES)
def test_parameter_names_and_shapes(ref, name):
    model = build(ref, name)
    expected = section(ref, f"{name}/param/")
    state = model.state_dict()
    assert sorted(state) == sorted(expected) == sorted(section(ref, f"{name}/grad/"))
    for k, v in expected.items():
        np.testing.assert_array_equal(state[k], v, err_msg=f"{name}: {k} after load_state_dict")


@pytest.mark.parametrize("name", NAMES)
def test_logits_loss_aux_and_gradients(ref, name, device):
    # The gradients are of CE + model.aux_loss (daux=1.0), as the reference's are of
    # CE + sum over layers of the aux loss: a missing or wrong aux gradient, or gate
    # weights not renormalised over the top k, make the router's gradients differ.
    _, logits, loss, aux, per_layer, grads = run(ref, name, device)
    assert logits.dtype == np.float64
    assert_close({"logits": logits}, {"logits": ref[f"{name}/logits"]}, f"{name}: logits")
    assert_close({"loss": np.array(loss)}, {"loss": ref[f"{name}/loss"]}, f"{name}: loss")
    assert_close({"aux": per_layer}, {"aux": ref[f"{name}/aux"]}, f"{name}: aux loss per layer")
    assert_close({"aux": np.array(aux)}, {"aux": ref[f"{name}/aux"].sum()}, f"{name}: aux_loss")
    if name == "mistral":
        assert aux == 0.0
    assert_close(grads, section(ref, f"{name}/grad/"), f"{name}: gradients")


def test_the_aux_gradient_is_visible(ref):
    """Leaving the aux loss out of backward (daux=0) moves the router's gradients far
    outside the tolerance: the comparison above really checks the aux gradient."""
    *_, grads = run(ref, "mixtral", daux=0.0)
    expected = section(ref, "mixtral/grad/")
    for layer in range(2):
        name = f"blocks.{layer}.mlp.router.weight"
        ratio, *_ = worst_error(grads[name], expected[name])
        assert ratio > 1e6, f"{name}: the aux gradient is too small to be checked ({ratio:.1e})"
