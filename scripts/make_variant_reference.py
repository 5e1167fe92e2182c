"""Write tests/fixtures/variant_reference.npz: Hugging Face's numbers for tinylm's Mixtral
and Mistral variants, in float64.

tinylm's GPTConfig(pos="rope", norm="rmsnorm", mlp="swiglu", n_kv_heads=Hkv, bias=False,
tie_weights=False, sliding_window=W, n_experts=E, experts_per_token=k) is meant to compute
exactly what transformers' MixtralForCausalLM computes (Mistral's sliding-window GQA
attention with RoPE, then a top-k mixture of SwiGLU experts whose gate weights are the
router's softmax probabilities renormalised over the top k), and without experts what
MistralForCausalLM computes. This script runs those two Hugging Face models, an
implementation written independently of tinylm, and `tests/test_reference_variants.py`
compares tinylm with what it wrote. The script does not import tinylm; the test needs
neither PyTorch nor transformers. Regenerate by hand with

    /work/refvenv/bin/python scripts/make_variant_reference.py
    # any Python with torch (2.13.0, CPU build) and transformers (5.24) installed

The output is deterministic (seeded NumPy draws, one PyTorch thread, fixed zip
timestamps), so re-running it gives the same bytes with the same library builds.

What it holds, for two models, "mixtral" (2 layers, 4 experts, top-2, window 4) and
"mistral" (dense SwiGLU, multi-query attention, window 3), each with T = 10 > W so the
window really cuts:

    {name}/config          JSON (0-d unicode array): the tinylm GPTConfig fields, exactly
    {name}/hf_config       JSON: "model", the transformers config it was run with; the
                           weight seed; with experts the minimum router probability gap
                           (see "Ties" below), the tokens per expert of each layer, and
                           HF's pooled aux loss; the finite-difference relative error
    {name}/idx, /targets   (B, T) int64 batch; targets are next-token ids already (no shift)
    {name}/param/{tinylm name}   starting parameters, tinylm names and layout
    {name}/logits          (B, T, V)
    {name}/loss            mean cross-entropy F.cross_entropy(logits, targets)
    {name}/aux             (n_layers,) each MoE layer's load-balancing loss, times the
                           coefficient (zeros for the dense model)
    {name}/grad/{tinylm name}    gradient of  loss + sum(aux)  by autograd, tinylm layout
    meta                   JSON: library versions, generator

Name and layout map (tinylm Linear weights are (in, out), PyTorch's are (out, in)):

    tok_emb.weight                      model.embed_tokens.weight
    blocks.{i}.ln1.weight               model.layers.{i}.input_layernorm.weight
    blocks.{i}.attn.qkv.weight          cat([q_proj, k_proj, v_proj].weight, dim 0)^T: [q | k | v]
    blocks.{i}.attn.proj.weight         o_proj.weight^T
    blocks.{i}.ln2.weight               post_attention_layernorm.weight
    blocks.{i}.mlp.router.weight        mlp.gate.weight^T                       (C, E)
    blocks.{i}.mlp.experts.{e}.gate.weight   mlp.experts.gate_up_proj[e, :h]^T    (C, h)
    blocks.{i}.mlp.experts.{e}.up.weight     mlp.experts.gate_up_proj[e, h:]^T    (C, h)
    blocks.{i}.mlp.experts.{e}.down.weight   mlp.experts.down_proj[e]^T           (h, C)
    blocks.{i}.mlp.{gate,up,down}.weight     mlp.{gate,up,down}_proj.weight^T (Mistral)
    ln_f.weight                         model.norm.weight
    head.weight                         lm_head.weight^T

transformers 5 stores Mixtral's experts fused: `gate_up_proj` (E, 2h, C), whose output
`MixtralExperts.forward` splits with `.chunk(2, dim=-1)` into [gate | up], and
`down_proj` (E, C, h).

Where this deliberately departs from calling the models as they are:

1. float64 throughout. Hugging Face's Mixtral/Mistral code computes some pieces in
   float32 whatever the model's dtype: the RoPE frequencies and cos/sin
   (`compute_default_rope_parameters`, `RotaryEmbedding.forward`), RMSNorm
   (`hidden_states.to(torch.float32)`), the attention softmax (`dtype=torch.float32`),
   the router softmax (`router_logits.float()`), and the accumulators of
   `load_balancing_loss_func`. For a float64 model those are downcasts that would
   limit the agreement to ~1e-7. `float64_patch` recompiles exactly those functions
   from their installed source with float32 replaced by float64 (and nothing else
   changed), and `Float64Guard` then checks that no operation of the forward or
   backward pass produces a float32/float16/bfloat16 tensor.
2. The cross-entropy is F.cross_entropy on the logits and tinylm-style targets
   (already shifted), not the model's `labels=` loss, which shifts the labels itself
   and upcasts to float32.
3. The load-balancing loss per layer. tinylm's `GPT.aux_loss` is the SUM over MoE layers
   of coef * E * sum_e f_e P_e, each layer with its own f and P. HF's
   `load_balancing_loss_func(router_logits_of_all_layers, ...)` instead pools the
   layers (f and P averaged over all layers' tokens together, then one product), which
   differs as soon as there is more than one layer. So the script calls HF's function
   on each layer's router logits alone, `(logits_l,)`, multiplies by the coefficient
   and sums over layers; the pooled value is printed for comparison only.

Ties: the top-k choice is a step function of the router probabilities; if the k-th
and (k+1)-th probabilities of some token were close, rounding could pick different
experts in tinylm and here. The script draws weights from successive seeds (starting at
the configured one) until every token of every layer has a gap of at least MIN_GAP
between them and every expert of every layer gets at least one token and misses at
least one, and checks that the finite-difference steps below choose the same experts.

Before writing, the gradient is checked against a central finite difference of the
same objective along a random direction (float64), which also validates the patched
code paths.
"""

from __future__ import annotations

import inspect
import json
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from transformers import MistralConfig, MistralForCausalLM, MixtralConfig, MixtralForCausalLM
from transformers.models.mistral import modeling_mistral
from transformers.models.mixtral import modeling_mixtral

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "fixtures" / "variant_reference.npz"
FORMAT_VERSION = 1
B, T = 2, 10
MIN_GAP = 1e-3  # smallest allowed gap between the k-th and (k+1)-th router probability
QUANTUM = 2.0 ** -6  # weights are multiples of this: exact in float64, and they compress

# The tinylm GPTConfig fields of each model; the transformers config is derived from them.
COMMON = dict(dropout=0.0, bias=False, tie_weights=False, pos="rope", norm="rmsnorm",
              norm_eps=1e-6, norm_placement="pre", mlp="swiglu", rope_theta=10000.0)
CONFIGS = {
    "mixtral": dict(
        tinylm=dict(vocab_size=37, context_length=12, d_model=16, n_layers=2, n_heads=4,
                    n_kv_heads=2, mlp_hidden=24, sliding_window=4, n_experts=4,
                    experts_per_token=2, moe_aux_loss_coef=0.02, **COMMON),
        seed=2024,
    ),
    "mistral": dict(
        tinylm=dict(vocab_size=29, context_length=12, d_model=16, n_layers=2, n_heads=4,
                    n_kv_heads=1, mlp_hidden=20, sliding_window=3, n_experts=0,
                    experts_per_token=2, moe_aux_loss_coef=0.01, **COMMON),
        seed=4048,
    ),
}


# ---------------------------------------------------------------- float64 throughout


# (old, new) source replacements: every float32 spelling used in those functions
FLOAT64_EDITS = (("torch.float32", "torch.float64"), ("dtype=torch.float)", "dtype=torch.float64)"),
                 (".float()", ".double()"))


def float64_patch(module, owner_name: str | None, name: str) -> None:
    """Recompile `module.owner_name.name` (or the module function `name`) from its
    installed source with every float32 cast turned into float64, and install it.

    Only the dtype spellings of FLOAT64_EDITS change; the function is otherwise
    Hugging Face's own code, run with the module's globals (decorators included)."""
    owner = getattr(module, owner_name) if owner_name else module
    source = textwrap.dedent(inspect.getsource(getattr(owner, name)))
    patched = source
    for old, new in FLOAT64_EDITS:
        patched = patched.replace(old, new)
    assert patched != source, f"{owner_name}.{name}: no float32 cast found to patch"
    for old, _ in FLOAT64_EDITS:
        assert old not in patched, (owner_name, name, old)
    namespace = dict(vars(module))
    exec(compile(patched, f"<float64 {module.__name__}.{name}>", "exec"), namespace)
    setattr(owner, name, namespace[name])


def patch_transformers_to_float64() -> None:
    for module, prefix in ((modeling_mixtral, "Mixtral"), (modeling_mistral, "Mistral")):
        float64_patch(module, f"{prefix}RMSNorm", "forward")
        float64_patch(module, f"{prefix}RotaryEmbedding", "compute_default_rope_parameters")
        float64_patch(module, f"{prefix}RotaryEmbedding", "forward")
        float64_patch(module, None, "eager_attention_forward")  # looked up at call time
    float64_patch(modeling_mixtral, "MixtralTopKRouter", "forward")
    float64_patch(modeling_mixtral, None, "load_balancing_loss_func")


class Float64Guard(TorchDispatchMode):
    """Fails on any operation that produces a low-precision floating-point tensor.

    (TorchDispatchMode sees every ATen op, forward and autograd backward; it and
    tree_leaves live in torch.utils' private modules, fine for a script run by hand.)"""

    LOW = (torch.float32, torch.float16, torch.bfloat16)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.dtype in self.LOW:
                raise AssertionError(f"{func} produced a {t.dtype} tensor")
        return out


# ------------------------------------------------------------------------ the models


def hf_config(m: dict):
    """The transformers config of the tinylm fields `m`."""
    kw = dict(vocab_size=m["vocab_size"], hidden_size=m["d_model"],
              intermediate_size=m["mlp_hidden"], num_hidden_layers=m["n_layers"],
              num_attention_heads=m["n_heads"], num_key_value_heads=m["n_kv_heads"],
              head_dim=m["d_model"] // m["n_heads"], hidden_act="silu",
              max_position_embeddings=m["context_length"], rms_norm_eps=m["norm_eps"],
              sliding_window=m["sliding_window"], attention_dropout=0.0,
              tie_word_embeddings=False, pad_token_id=None, use_cache=False,
              rope_parameters={"rope_type": "default", "rope_theta": m["rope_theta"]},
              attn_implementation="eager")
    if m["n_experts"] == 0:
        return MistralForCausalLM, MistralConfig(**kw)
    return MixtralForCausalLM, MixtralConfig(
        **kw, num_local_experts=m["n_experts"], num_experts_per_tok=m["experts_per_token"],
        router_aux_loss_coef=m["moe_aux_loss_coef"], router_jitter_noise=0.0,
        output_router_logits=True, experts_implementation="eager")


def build_model(m: dict):
    cls, config = hf_config(m)
    model = cls(config).double().eval()  # eval: no dropout and no router jitter anyway
    assert model.config._attn_implementation == "eager"
    inv_freq = model.model.rotary_emb.inv_freq
    assert inv_freq.dtype == torch.float64
    hs = m["d_model"] // m["n_heads"]
    expected = 1.0 / m["rope_theta"] ** (np.arange(0, hs, 2) / hs)
    assert np.allclose(inv_freq.numpy(), expected, rtol=1e-15, atol=0), "RoPE not float64"
    return model


def make_params(rng: np.random.Generator, model) -> dict[str, np.ndarray]:
    """Random starting weights in Hugging Face's names and layout, multiples of QUANTUM.

    Larger than a trained model's init so every gradient is sizeable; norm weights
    perturbed from 1; the router a little larger so routing is decisive."""
    params = {}
    for name, value in model.state_dict().items():
        shape = tuple(value.shape)
        if name.endswith("norm.weight"):  # input_layernorm, post_attention_layernorm, norm
            x = 1.0 + 0.1 * rng.standard_normal(shape)
        elif name.endswith("mlp.gate.weight"):  # Mixtral's router
            x = 0.6 * rng.standard_normal(shape)
        elif name.endswith("embed_tokens.weight"):
            x = rng.standard_normal(shape)
        else:
            x = 0.3 * rng.standard_normal(shape)
        params[name] = np.round(x / QUANTUM) * QUANTUM
    return params


def load(model, params: dict[str, np.ndarray]) -> None:
    model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in params.items()}, strict=True)


def to_tinylm(hf: dict[str, np.ndarray], m: dict) -> dict[str, np.ndarray]:
    """Hugging Face names and layout -> tinylm's (the module docstring has the map).

    Linear in its arguments, so it maps gradients as it maps weights."""
    used = set()

    def get(name):
        used.add(name)
        return hf[name]

    h, E = m["mlp_hidden"], m["n_experts"]
    out = {"tok_emb.weight": get("model.embed_tokens.weight")}
    for i in range(m["n_layers"]):
        a, b = f"model.layers.{i}.", f"blocks.{i}."
        out[b + "ln1.weight"] = get(a + "input_layernorm.weight")
        out[b + "attn.qkv.weight"] = np.concatenate(
            [get(a + f"self_attn.{p}_proj.weight") for p in "qkv"], axis=0).T  # (C, [q | k | v])
        out[b + "attn.proj.weight"] = get(a + "self_attn.o_proj.weight").T
        out[b + "ln2.weight"] = get(a + "post_attention_layernorm.weight")
        if E:
            out[b + "mlp.router.weight"] = get(a + "mlp.gate.weight").T  # (C, E)
            gate_up = get(a + "mlp.experts.gate_up_proj")  # (E, 2h, C): output [gate | up]
            down = get(a + "mlp.experts.down_proj")  # (E, C, h)
            assert gate_up.shape == (E, 2 * h, m["d_model"]) and down.shape == (E, m["d_model"], h)
            for e in range(E):
                out[b + f"mlp.experts.{e}.gate.weight"] = gate_up[e, :h].T  # (C, h)
                out[b + f"mlp.experts.{e}.up.weight"] = gate_up[e, h:].T  # (C, h)
                out[b + f"mlp.experts.{e}.down.weight"] = down[e].T  # (h, C)
        else:
            for p in ("gate", "up", "down"):
                out[b + f"mlp.{p}.weight"] = get(a + f"mlp.{p}_proj.weight").T
    out["ln_f.weight"] = get("model.norm.weight")
    out["head.weight"] = get("lm_head.weight").T  # (C, V)
    assert used == set(hf), f"unmapped: {sorted(set(hf) - used)}"
    return {k: np.ascontiguousarray(v, dtype=np.float64) for k, v in out.items()}


# ---------------------------------------------------------------------- the objective


def objective(model, m: dict, idx: np.ndarray, targets: np.ndarray) -> dict:
    """logits, ce, aux (per layer, 0-d tensors), router_logits (per layer, (B*T, E)) and
    pooled_aux (HF's own value pooled over the layers, for comparison only)."""
    out = model(input_ids=torch.from_numpy(idx))
    logits = out.logits  # (B, T, V)
    ce = F.cross_entropy(logits.reshape(-1, m["vocab_size"]), torch.from_numpy(targets).reshape(-1))
    res = dict(logits=logits, ce=ce, aux=[], router_logits=[], pooled_aux=None)
    if m["n_experts"]:
        router_logits = list(out.router_logits)  # one (B*T, E) per layer, rows in (b, t) order
        assert len(router_logits) == m["n_layers"]
        coef, E, k = m["moe_aux_loss_coef"], m["n_experts"], m["experts_per_token"]
        # tinylm's aux loss: HF's function on each layer alone, summed over the layers
        res["aux"] = [coef * modeling_mixtral.load_balancing_loss_func((r,), E, k)
                      for r in router_logits]
        res["router_logits"] = router_logits
        res["pooled_aux"] = coef * float(out.aux_loss.detach())  # differs for > 1 layer
    return res


def routing(router_logits: list, m: dict):
    """Per layer: the top-k expert sets (N, k) sorted, the smallest k-th/(k+1)-th gap,
    and how many tokens chose each expert."""
    k, sets, gaps, counts = m["experts_per_token"], [], [], []
    for r in router_logits:
        p = torch.softmax(r.detach(), dim=-1).numpy()  # (N, E)
        order = np.argsort(-p, axis=-1, kind="stable")
        ps = np.take_along_axis(p, order, axis=-1)
        gaps.append(float((ps[:, k - 1] - ps[:, k]).min()))
        top = np.sort(order[:, :k], axis=-1)
        sets.append(top)
        counts.append(np.bincount(top.reshape(-1), minlength=m["n_experts"]))
    return sets, gaps, counts


def make_batch(rng: np.random.Generator, V: int):
    """(B, T) ids with repeats inside each row (the embedding gradient must accumulate)."""
    idx = rng.integers(0, V, size=(B, T))
    for b in range(B):
        idx[b, 5] = idx[b, 1]
        idx[b, 8] = idx[b, 1]
        idx[b, 9] = idx[b, 3]
    targets = rng.integers(0, V, size=(B, T))
    return idx.astype(np.int64), targets.astype(np.int64)


def reference(name: str, spec: dict) -> dict:
    m = spec["tinylm"]
    model = build_model(m)
    for seed in range(spec["seed"], spec["seed"] + 200):
        rng = np.random.default_rng(seed)
        idx, targets = make_batch(rng, m["vocab_size"])
        params = make_params(rng, model)
        load(model, params)
        if m["n_experts"] == 0:
            break
        with torch.no_grad():
            _, gaps, counts = routing(objective(model, m, idx, targets)["router_logits"], m)
        N = B * T
        if min(gaps) >= MIN_GAP and all(((c > 0) & (c < N)).all() for c in counts):
            break
    else:
        raise RuntimeError(f"{name}: no seed gave unambiguous routing")

    model.zero_grad(set_to_none=True)
    with Float64Guard():  # forward and backward: nothing below float64
        res = objective(model, m, idx, targets)
        (res["ce"] + sum(res["aux"])).backward()
    hf_grads = {}
    for k, p in model.named_parameters():
        assert p.grad is not None, f"{name}: {k} has no gradient"
        hf_grads[k] = p.grad.numpy().copy()
    grads = to_tinylm(hf_grads, m)
    for k, g in grads.items():
        assert np.abs(g).max() > 1e-4, f"{name}: gradient of {k} is ~0"

    info = {"seed": seed}
    if m["n_experts"]:
        sets, gaps, counts = routing(res["router_logits"], m)
        info.update(min_router_gap=min(gaps), tokens_per_expert=[c.tolist() for c in counts],
                    pooled_hf_aux=res["pooled_aux"])
        info["fd_rel_err"] = fd_check(name, model, m, params, idx, targets, hf_grads, seed, sets)
    else:
        info["fd_rel_err"] = fd_check(name, model, m, params, idx, targets, hf_grads, seed)
    aux = [a.item() for a in res["aux"]] if res["aux"] else [0.0] * m["n_layers"]
    return dict(
        idx=idx, targets=targets, params=to_tinylm(params, m), grads=grads, info=info,
        logits=res["logits"].detach().numpy().copy(), loss=np.array(res["ce"].item()),
        aux=np.array(aux), hf_config=json.loads(model.config.to_json_string(use_diff=False)),
    )


def fd_check(name, model, m, params, idx, targets, hf_grads, seed, sets=None) -> float:
    """Fourth-order central difference of CE + sum(aux) along a random direction vs
    <grad, direction>; with experts, also checks that no step changes the chosen experts."""
    rng = np.random.default_rng(seed + 1)
    direction = {k: rng.standard_normal(v.shape) for k, v in params.items()}
    h = 1e-4

    def at(step):
        load(model, {k: params[k] + step * direction[k] for k in params})
        with torch.no_grad():
            res = objective(model, m, idx, targets)
        if sets is not None:
            for a, b in zip(sets, routing(res["router_logits"], m)[0], strict=True):
                assert (a == b).all(), f"{name}: a finite-difference step changed the routing"
        return float(res["ce"] + sum(res["aux"]))

    f1, f2 = at(h) - at(-h), at(2 * h) - at(-2 * h)
    load(model, params)
    numeric = (8 * f1 - f2) / (12 * h)  # error O(h^4)
    analytic = sum(float((hf_grads[k] * direction[k]).sum()) for k in params)
    rel = abs(numeric - analytic) / abs(analytic)
    assert rel < 1e-8, f"{name}: finite-difference check failed, rel err {rel:.2e}"
    return rel


# --------------------------------------------------------------------------- writing


def write_npz(path: Path, arrays: dict[str, object]) -> None:
    """np.savez_compressed, but with fixed zip timestamps so the bytes are reproducible."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for key, value in arrays.items():
            arr = np.asarray(value)
            if arr.dtype == object:
                raise TypeError(f"{key}: object arrays would need pickle")
            info = zipfile.ZipInfo(key + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            with zf.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, arr, allow_pickle=False)
    tmp.replace(path)


def main() -> int:
    torch.set_num_threads(1)  # one thread: reproducible reductions
    torch.use_deterministic_algorithms(True)
    patch_transformers_to_float64()
    arrays: dict[str, object] = {}
    for name, spec in CONFIGS.items():
        torch.manual_seed(0)  # the models' own init is overwritten by load(); fixed anyway
        r = reference(name, spec)
        m = spec["tinylm"]
        arrays[f"{name}/config"] = json.dumps(m, sort_keys=True)
        arrays[f"{name}/hf_config"] = json.dumps({"model": r["hf_config"], **r["info"]},
                                                 sort_keys=True)
        arrays[f"{name}/idx"] = r["idx"]
        arrays[f"{name}/targets"] = r["targets"]
        for k, v in r["params"].items():
            arrays[f"{name}/param/{k}"] = v
        arrays[f"{name}/logits"] = r["logits"]
        arrays[f"{name}/loss"] = r["loss"]
        arrays[f"{name}/aux"] = r["aux"]
        for k, v in r["grads"].items():
            arrays[f"{name}/grad/{k}"] = v
        extra = ""
        if m["n_experts"]:
            extra = (f", aux per layer {np.round(r['aux'], 6).tolist()} (sum {r['aux'].sum():.6f}; "
                     f"HF pooled over layers {r['info']['pooled_hf_aux']:.6f}), "
                     f"min router gap {r['info']['min_router_gap']:.2e}")
        print(f"{name}: seed {r['info']['seed']}, loss {float(r['loss']):.6f}{extra}, "
              f"finite-difference rel err {r['info']['fd_rel_err']:.1e}, "
              f"{len(r['params'])} parameters")
    arrays["meta"] = json.dumps({
        "format_version": FORMAT_VERSION,
        "generator": "scripts/make_variant_reference.py",
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "numpy_version": np.__version__,
        "dtype": "float64",
    }, sort_keys=True)
    for k, v in arrays.items():
        a = np.asarray(v)
        assert a.dtype.kind in "fiU", (k, a.dtype)
        assert a.dtype.kind != "f" or a.dtype == np.float64, (k, a.dtype)
    write_npz(OUT, arrays)
    size_kib = OUT.stat().st_size / 1024
    assert size_kib < 200, f"fixture is {size_kib:.0f} KiB"
    print(f"wrote {OUT.relative_to(ROOT)} ({size_kib:.0f} KiB, {len(arrays)} arrays)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
