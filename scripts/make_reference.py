"""Write tests/fixtures/gpt_reference.npz: PyTorch's numbers for tinylm's GPT, in float64.

The fixture is what `tests/test_reference.py` compares tinylm against (llm.c ships
PyTorch's activations and gradients for its tests in the same spirit). PyTorch is
needed only here, never by tinylm or its test suite. Regenerate by hand with

    pip install torch==2.13.0          # the CPU build; any machine, no GPU
    python scripts/make_reference.py   # rewrites tests/fixtures/gpt_reference.npz

The output is deterministic (seeded NumPy draws, one PyTorch thread, fixed zip
timestamps), so re-running it gives the same bytes with the same PyTorch build.

What it holds, for two models ("tied": biases, tied head, label smoothing 0.1 and three
ignored targets; "untied": no biases, separate head, no smoothing):

    {cfg}/config               JSON (0-d unicode array): architecture, loss and optimiser settings
    {cfg}/idx, {cfg}/targets   (B, T) int64 batch, T shorter than the context
    {cfg}/param/{name}         starting parameters, tinylm names and layout
    {cfg}/logits, {cfg}/loss   forward pass; loss = F.cross_entropy(logits, targets,
                               label_smoothing=..., ignore_index=-100)
    {cfg}/grad/{name}          every parameter gradient of that loss, tinylm layout
    {cfg}/step_losses          (3,) loss of each training step
    {cfg}/step_norms           (3,) total gradient norm before clipping (above max_norm each step)
    {cfg}/after/{name}         parameters after 3 steps of zero_grad, forward, backward,
                               clip_grad_norm_(0.5), AdamW(decay on ndim >= 2 only)
    ce/{config,logits,targets,loss,dlogits}   SoftmaxCrossEntropy alone, (N=7, V=5)
    meta                       JSON: torch and numpy versions, generator

Before writing, every number is checked against a second, deliberately literal
formulation written here from the maths (per-head loops, LayerNorm/GELU/softmax/
cross-entropy from their formulas, clipping and AdamW by hand), and the model's
gradient against central finite differences along a random direction.
"""

from __future__ import annotations

import json
import math
import sys
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from torch_gpt import (  # noqa: E402
    TorchGPT,
    adamw_param_groups,
    load_tinylm_state,
    tinylm_grads,
    tinylm_params,
)

OUT = ROOT / "tests" / "fixtures" / "gpt_reference.npz"
FORMAT_VERSION = 1
IGNORE_INDEX = -100
B, T = 3, 9

CONFIGS = {
    "tied": dict(
        model=dict(vocab_size=37, context_length=16, d_model=24, n_layers=2, n_heads=3,
                   dropout=0.0, bias=True, tie_weights=True),
        label_smoothing=0.1, n_ignored=3, seed=1234,
    ),
    "untied": dict(
        model=dict(vocab_size=29, context_length=12, d_model=16, n_layers=2, n_heads=4,
                   dropout=0.0, bias=False, tie_weights=False),
        label_smoothing=0.0, n_ignored=0, seed=5678,
    ),
}
OPTIM = dict(lr=1e-2, betas=[0.9, 0.95], eps=1e-8, weight_decay=0.1, decay="ndim>=2",
             max_norm=0.5, steps=3)


# ------------------------------------------------------------------------------ inputs


def make_batch(rng: np.random.Generator, V: int, n_ignored: int):
    """(B, T) ids with repeated ids inside every row, and targets with some ignored."""
    idx = rng.integers(0, V, size=(B, T))
    for b in range(B):  # repeats inside a row: the embedding gradient must accumulate
        idx[b, 4] = idx[b, 1]
        idx[b, 7] = idx[b, 1]
        idx[b, 8] = idx[b, 3]
    targets = rng.integers(0, V, size=(B, T))
    ignored = [(0, 0), (1, 5), (2, 8)][:n_ignored]  # first, middle and last positions
    for b, t in ignored:
        targets[b, t] = IGNORE_INDEX
    return idx.astype(np.int64), targets.astype(np.int64)


def make_params(rng: np.random.Generator, names_shapes: dict[str, tuple]) -> dict[str, np.ndarray]:
    """Random starting point, larger than GPT-2's init so every gradient is sizeable."""
    params = {}
    for name, shape in names_shapes.items():
        is_norm = ".ln" in f".{name}" and name.endswith("weight")  # ln1/ln2/ln_f weights
        if len(shape) >= 2:
            params[name] = rng.normal(0.0, 0.2, size=shape)
        elif is_norm:
            params[name] = 1.0 + 0.1 * rng.normal(size=shape)
        else:  # Linear and LayerNorm biases
            params[name] = 0.1 * rng.normal(size=shape)
    return params


# ------------------------------------------------------------------ the reference run


def torch_reference(cfg: dict, params: dict, idx: np.ndarray, targets: np.ndarray) -> dict:
    """Forward, gradients and three AdamW steps with TorchGPT and torch.optim, float64."""
    m = cfg["model"]
    model = TorchGPT(m["vocab_size"], m["context_length"], m["d_model"], m["n_layers"],
                     m["n_heads"], bias=m["bias"], tie_weights=m["tie_weights"],
                     attention="explicit").double()
    load_tinylm_state(model, params)
    V = m["vocab_size"]
    idx_t, tgt_t = torch.from_numpy(idx), torch.from_numpy(targets)

    def loss_of(logits):
        return F.cross_entropy(logits.view(-1, V), tgt_t.view(-1),
                               label_smoothing=cfg["label_smoothing"], ignore_index=IGNORE_INDEX)

    out = {}
    model.zero_grad(set_to_none=True)
    logits = model(idx_t)
    loss = loss_of(logits)
    loss.backward()
    out["logits"] = logits.detach().numpy().copy()
    out["loss"] = np.array(loss.item())
    out["grad"] = tinylm_grads(model)

    # The SDPA path (what the timing benchmark runs) must be the same maths.
    sdpa = TorchGPT(m["vocab_size"], m["context_length"], m["d_model"], m["n_layers"],
                    m["n_heads"], bias=m["bias"], tie_weights=m["tie_weights"],
                    attention="sdpa").double()
    load_tinylm_state(sdpa, params)
    check_close("sdpa logits", sdpa(idx_t).detach().numpy(), out["logits"], 1e-12)

    opt = torch.optim.AdamW(adamw_param_groups(model, OPTIM["weight_decay"]), lr=OPTIM["lr"],
                            betas=tuple(OPTIM["betas"]), eps=OPTIM["eps"])
    losses, norms = [], []
    for _ in range(OPTIM["steps"]):
        opt.zero_grad(set_to_none=True)
        loss = loss_of(model(idx_t))
        loss.backward()
        total_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), OPTIM["max_norm"])
        opt.step()
        losses.append(loss.item())
        norms.append(total_norm.item())
    out["step_losses"] = np.array(losses)
    out["step_norms"] = np.array(norms)
    out["after"] = tinylm_params(model)
    return out


# ------------------------------------------- a second, literal formulation to check it


def literal_logits(cfg: dict, P: dict[str, torch.Tensor], idx: np.ndarray) -> torch.Tensor:
    """GPT-2 forward written from the formulas, in tinylm's layout (y = x @ W + b)."""
    m = cfg["model"]
    C, H, L = m["d_model"], m["n_heads"], m["n_layers"]
    hs = C // H
    Bn, Tn = idx.shape

    def linear(x, name):
        y = x @ P[name + ".weight"]
        return y + P[name + ".bias"] if name + ".bias" in P else y

    def layernorm(x, name):
        mu = x.sum(-1, keepdim=True) / C
        var = ((x - mu) ** 2).sum(-1, keepdim=True) / C  # biased variance, as GPT-2
        y = (x - mu) / torch.sqrt(var + 1e-5) * P[name + ".weight"]
        return y + P[name + ".bias"] if name + ".bias" in P else y

    def gelu(x):  # GPT-2's tanh approximation
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))

    rows = []
    for b in range(Bn):  # one sequence at a time
        x = torch.stack([P["tok_emb.weight"][int(i)] for i in idx[b]]) + P["pos_emb.weight"][:Tn]
        for layer in range(L):
            pre = f"blocks.{layer}."
            qkv = linear(layernorm(x, pre + "ln1"), pre + "attn.qkv")  # (T, 3C)
            heads = []
            for h in range(H):
                q = qkv[:, h * hs:(h + 1) * hs]
                k = qkv[:, C + h * hs:C + (h + 1) * hs]
                v = qkv[:, 2 * C + h * hs:2 * C + (h + 1) * hs]
                outs = []
                for t in range(Tn):  # query t sees keys 0..t only
                    s = (k[:t + 1] @ q[t]) / math.sqrt(hs)
                    e = torch.exp(s - s.max())
                    outs.append((e / e.sum()) @ v[:t + 1])
                heads.append(torch.stack(outs))
            x = x + linear(torch.cat(heads, dim=1), pre + "attn.proj")
            hid = gelu(linear(layernorm(x, pre + "ln2"), pre + "mlp.fc"))
            x = x + linear(hid, pre + "mlp.proj")
        hf = layernorm(x, "ln_f")
        W = P["tok_emb.weight"].T if m["tie_weights"] else P["head.weight"]
        rows.append(hf @ W)
    return torch.stack(rows)


def literal_cross_entropy(logits2d: torch.Tensor, targets1d: np.ndarray, eps: float):
    """(1-eps) * NLL + eps * mean over V of -log p, averaged over non-ignored rows."""
    terms = []
    for n, y in enumerate(targets1d):
        if y == IGNORE_INDEX:
            continue
        z = logits2d[n]
        logp = z - z.max() - torch.log(torch.exp(z - z.max()).sum())
        terms.append((1.0 - eps) * -logp[int(y)] + eps * -logp.mean())
    return torch.stack(terms).sum() / len(terms)


def literal_run(cfg: dict, params: dict, idx: np.ndarray, targets: np.ndarray) -> dict:
    """Same quantities as torch_reference, with hand-written clipping and AdamW."""
    V = cfg["model"]["vocab_size"]
    P = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in params.items()}

    def loss_and_grads():
        logits = literal_logits(cfg, P, idx)
        loss = literal_cross_entropy(logits.reshape(-1, V), targets.reshape(-1),
                                     cfg["label_smoothing"])
        grads = torch.autograd.grad(loss, list(P.values()), allow_unused=True)
        grads = {k: (g if g is not None else torch.zeros_like(P[k])).detach()
                 for k, g in zip(P, grads, strict=True)}
        return logits.detach(), loss.detach(), grads

    out = {}
    logits, loss, grads = loss_and_grads()
    out["logits"], out["loss"] = logits.numpy(), np.array(loss.item())
    out["grad"] = {k: g.numpy() for k, g in grads.items()}

    lr, (b1, b2), eps, wd = OPTIM["lr"], OPTIM["betas"], OPTIM["eps"], OPTIM["weight_decay"]
    mom = {k: torch.zeros_like(p) for k, p in P.items()}
    vel = {k: torch.zeros_like(p) for k, p in P.items()}
    losses, norms = [], []
    for step in range(1, OPTIM["steps"] + 1):
        _, loss, grads = loss_and_grads()
        norm = math.sqrt(sum(float((g * g).sum()) for g in grads.values()))
        scale = min(1.0, OPTIM["max_norm"] / (norm + 1e-6))
        with torch.no_grad():
            for k, p in P.items():
                g = grads[k] * scale
                if p.ndim >= 2:  # decoupled weight decay (Loshchilov & Hutter), matrices only
                    p -= lr * wd * p
                mom[k] = b1 * mom[k] + (1 - b1) * g
                vel[k] = b2 * vel[k] + (1 - b2) * g * g
                m_hat = mom[k] / (1 - b1 ** step)
                v_hat = vel[k] / (1 - b2 ** step)
                p -= lr * m_hat / (torch.sqrt(v_hat) + eps)
        losses.append(loss.item())
        norms.append(norm)
    out["step_losses"], out["step_norms"] = np.array(losses), np.array(norms)
    out["after"] = {k: p.detach().numpy().copy() for k, p in P.items()}
    return out


def directional_fd_check(cfg: dict, params: dict, idx, targets, grads: dict, seed: int) -> float:
    """Central difference of the reference loss along a random direction vs <grad, dir>."""
    m = cfg["model"]
    V = m["vocab_size"]
    model = TorchGPT(m["vocab_size"], m["context_length"], m["d_model"], m["n_layers"],
                     m["n_heads"], bias=m["bias"], tie_weights=m["tie_weights"],
                     attention="explicit").double()
    rng = np.random.default_rng(seed)
    direction = {k: rng.normal(size=v.shape) for k, v in params.items()}

    def loss_at(h):
        load_tinylm_state(model, {k: params[k] + h * direction[k] for k in params})
        with torch.no_grad():
            logits = model(torch.from_numpy(idx))
            return F.cross_entropy(logits.view(-1, V), torch.from_numpy(targets).view(-1),
                                   label_smoothing=cfg["label_smoothing"],
                                   ignore_index=IGNORE_INDEX).item()

    h = 1e-5
    numeric = (loss_at(h) - loss_at(-h)) / (2 * h)
    analytic = sum(float((grads[k] * direction[k]).sum()) for k in params)
    return abs(numeric - analytic) / abs(analytic)


def check_close(what: str, actual, expected, rtol: float) -> None:
    """Elementwise relative check (absolute floor scaled to the array's size)."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    scale = max(float(np.abs(expected).max()), 1e-300)
    err = np.abs(actual - expected)
    ok = err <= rtol * np.abs(expected) + rtol * 1e-2 * scale
    if not ok.all():
        i = np.unravel_index(np.argmax(err - rtol * np.abs(expected)), err.shape)
        raise AssertionError(f"self-check failed for {what}: max abs err {err.max():.3e} "
                             f"(scale {scale:.3e}) at {i}: {actual[i]!r} vs {expected[i]!r}")


def check_against_literal(name: str, cfg: dict, params: dict, ref: dict, lit: dict) -> None:
    check_close(f"{name}/logits", lit["logits"], ref["logits"], 1e-12)
    check_close(f"{name}/loss", lit["loss"], ref["loss"], 1e-13)
    for k in ref["grad"]:
        check_close(f"{name}/grad/{k}", lit["grad"][k], ref["grad"][k], 1e-10)
    check_close(f"{name}/step_losses", lit["step_losses"], ref["step_losses"], 1e-12)
    check_close(f"{name}/step_norms", lit["step_norms"], ref["step_norms"], 1e-12)
    C = cfg["model"]["d_model"]
    for k in ref["after"]:
        r, l = ref["after"][k].copy(), lit["after"][k].copy()
        if k.endswith("attn.qkv.bias"):
            # subtle: the key bias adds q.b to every score of a row, which the softmax
            # ignores, so its gradient is exactly 0 in exact arithmetic and rounding
            # noise (~1e-17) in practice. AdamW divides that noise by sqrt(v) + eps,
            # so it stays put only up to ~lr * noise / eps: compare it with its start.
            for a in (r, l):
                assert np.abs(a[C:2 * C] - params[k][C:2 * C]).max() < 1e-9, (name, k)
                a[C:2 * C] = params[k][C:2 * C]
        check_close(f"{name}/after/{k}", l, r, 1e-11)


# ------------------------------------------------------------- SoftmaxCrossEntropy alone


def cross_entropy_case() -> dict:
    N, V, eps = 7, 5, 0.2
    rng = np.random.default_rng(99)
    logits = rng.normal(0.0, 2.0, size=(N, V))
    targets = rng.integers(0, V, size=N).astype(np.int64)
    targets[[2, 5]] = IGNORE_INDEX
    z = torch.tensor(logits, requires_grad=True)
    loss = F.cross_entropy(z, torch.from_numpy(targets), label_smoothing=eps,
                           ignore_index=IGNORE_INDEX)
    loss.backward()
    # Self-check with the literal formula and its own autograd graph.
    z2 = torch.tensor(logits, requires_grad=True)
    loss2 = literal_cross_entropy(z2, targets, eps)
    loss2.backward()
    check_close("ce/loss", loss2.item(), loss.item(), 1e-14)
    check_close("ce/dlogits", z2.grad.numpy(), z.grad.numpy(), 1e-13)
    assert np.all(z.grad.numpy()[[2, 5]] == 0.0)
    return {
        "ce/config": json.dumps({"N": N, "V": V, "label_smoothing": eps,
                                 "ignore_index": IGNORE_INDEX,
                                 "reduction": "mean over non-ignored rows"}),
        "ce/logits": logits,
        "ce/targets": targets,
        "ce/loss": np.array(loss.item()),
        "ce/dlogits": z.grad.numpy().copy(),
    }


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
    arrays: dict[str, object] = {}
    for name, cfg in CONFIGS.items():
        m = cfg["model"]
        rng = np.random.default_rng(cfg["seed"])
        idx, targets = make_batch(rng, m["vocab_size"], cfg["n_ignored"])
        shapes_model = TorchGPT(m["vocab_size"], m["context_length"], m["d_model"], m["n_layers"],
                                m["n_heads"], bias=m["bias"], tie_weights=m["tie_weights"])
        shapes = {k: v.shape for k, v in tinylm_params(shapes_model).items()}
        params = make_params(rng, shapes)

        ref = torch_reference(cfg, params, idx, targets)
        lit = literal_run(cfg, params, idx, targets)
        check_against_literal(name, cfg, params, ref, lit)
        fd = directional_fd_check(cfg, params, idx, targets, ref["grad"], cfg["seed"] + 1)
        assert fd < 1e-7, f"{name}: finite-difference check failed, rel err {fd:.2e}"
        assert min(ref["step_norms"]) > OPTIM["max_norm"], f"{name}: clipping never triggered"
        for k, g in ref["grad"].items():
            assert np.abs(g).max() > 1e-4, f"{name}: gradient of {k} is ~0"

        config = {
            "name": name,
            "model": m,
            "batch": {"B": B, "T": T, "ignore_index": IGNORE_INDEX,
                      "n_ignored": int((targets == IGNORE_INDEX).sum())},
            "label_smoothing": cfg["label_smoothing"],
            "optim": OPTIM,
            "seed": cfg["seed"],
            "torch_version": torch.__version__,
        }
        arrays[f"{name}/config"] = json.dumps(config, sort_keys=True)
        arrays[f"{name}/idx"] = idx
        arrays[f"{name}/targets"] = targets
        for k, v in params.items():
            arrays[f"{name}/param/{k}"] = v
        arrays[f"{name}/logits"] = ref["logits"]
        arrays[f"{name}/loss"] = ref["loss"]
        for k, v in ref["grad"].items():
            arrays[f"{name}/grad/{k}"] = v
        arrays[f"{name}/step_losses"] = ref["step_losses"]
        arrays[f"{name}/step_norms"] = ref["step_norms"]
        for k, v in ref["after"].items():
            arrays[f"{name}/after/{k}"] = v
        norms = np.round(ref["step_norms"], 4).tolist()
        print(f"{name}: loss {ref['loss']:.6f}, step norms {norms}, "
              f"finite-difference rel err {fd:.1e}, {len(params)} parameters")

    arrays.update(cross_entropy_case())
    arrays["meta"] = json.dumps({
        "format_version": FORMAT_VERSION,
        "generator": "scripts/make_reference.py",
        "torch_version": torch.__version__,
        "numpy_version": np.__version__,
        "dtype": "float64",
    }, sort_keys=True)
    for k, v in arrays.items():
        a = np.asarray(v)
        assert a.dtype.kind in "fiU", (k, a.dtype)
        assert a.dtype.kind != "f" or a.dtype == np.float64, (k, a.dtype)
    write_npz(OUT, arrays)
    size_kib = OUT.stat().st_size / 1024
    print(f"wrote {OUT.relative_to(ROOT)} ({size_kib:.0f} KiB, {len(arrays)} arrays)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
