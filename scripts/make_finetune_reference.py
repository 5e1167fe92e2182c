"""Write tests/fixtures/finetune_reference.npz: PyTorch's numbers for tinylm's LoRA linear
layer, SequenceLogProb and DPOLoss, in float64.

The formulas are written here in PyTorch's own conventions, independently of tinylm, and
differentiated by autograd; tests/test_lora.py and tests/test_dpo.py compare tinylm's
hand-written forward and backward passes with what this script wrote. The script does not
import tinylm; the tests need only NumPy. Regenerate by hand with

    python3 -m venv /work/torchvenv && /work/torchvenv/bin/pip install torch==2.13.0 numpy
    /work/torchvenv/bin/python scripts/make_finetune_reference.py

The output is deterministic (seeded NumPy draws, one PyTorch thread, fixed zip
timestamps), so re-running it gives the same bytes with the same library builds.

What it holds (tinylm layouts: a Linear weight is (in, out), PyTorch's is (out, in)):

    lora/x (2, 3, 5), lora/weight (5, 7), lora/bias (7,)   the frozen base and its input
    lora/A (5, 3), lora/B (3, 7), lora/rank, lora/alpha    the adapters (B nonzero)
    lora/dy (2, 3, 7)                                      the upstream gradient
    lora/y                                                 F.linear(x, W, b) + alpha/rank *
                                                           F.linear(F.linear(x, A), B), as peft
    lora/grad/{x,A,B}                                      autograd of sum(y * dy)

    seq/logits (3, 5, 6), seq/targets (3, 5), seq/mask (3, 5) (0 = prompt, not counted;
                                           targets there are -100), seq/d (3,)
    seq/logp (3,)                          sum_t mask * log_softmax(logits).gather(targets)
    seq/grad/logits                        autograd of sum(logp * d)

    dpo/logits (6, 5, 6), dpo/targets, dpo/mask   rows 0-2 chosen, 3-5 rejected
    dpo/ref (6,), dpo/beta                        the reference's log-probs (constants)
    dpo/policy_chosen, dpo/policy_rejected (3,)   the sequence log-probs of the logits
    dpo/loss                                      -F.logsigmoid(beta * ((pc - rc) - (pr - rr)))
                                                  .mean()
    dpo/chosen_rewards, dpo/rejected_rewards      beta * (pc - rc), beta * (pr - rr)
    dpo/grad/policy_chosen, /policy_rejected      autograd of the loss (pc, pr as leaves)
    dpo/grad/logits (6, 5, 6)                     autograd of the loss through the log-probs

    dpo_extreme/{policy_chosen, policy_rejected, ref_chosen, ref_rejected} (5,), /beta
                  margins beta * (...) = -1e4, -40, 0, 40, 1e4: the loss and its gradients
    dpo_extreme/loss, /grad/policy_chosen, /grad/policy_rejected
    meta          JSON: library versions, generator
"""

from __future__ import annotations

import json
import platform
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "finetune_reference.npz"


def t(a) -> torch.Tensor:
    return torch.tensor(np.asarray(a), dtype=torch.float64)


def leaf(a) -> torch.Tensor:
    return t(a).requires_grad_(True)


def lora_reference(rng: np.random.Generator) -> dict:
    n_in, n_out, rank, alpha = 5, 7, 3, 6.0
    x = rng.standard_normal((2, 3, n_in))
    weight = rng.standard_normal((n_in, n_out)) * 0.5
    bias = rng.standard_normal(n_out) * 0.1
    A = rng.standard_normal((n_in, rank)) * 0.5
    B = rng.standard_normal((rank, n_out)) * 0.5  # nonzero, so A's gradient is too
    dy = rng.standard_normal((2, 3, n_out))
    xt, At, Bt = leaf(x), leaf(A.T), leaf(B.T)  # PyTorch layouts: lora_A (r, in), lora_B (out, r)
    y = F.linear(xt, t(weight.T), t(bias)) + (alpha / rank) * F.linear(F.linear(xt, At), Bt)
    (y * t(dy)).sum().backward()
    return {"x": x, "weight": weight, "bias": bias, "A": A, "B": B, "rank": rank,
            "alpha": alpha, "dy": dy, "y": y.detach().numpy(), "grad/x": xt.grad.numpy(),
            "grad/A": At.grad.numpy().T, "grad/B": Bt.grad.numpy().T}


def prompt_mask(rng: np.random.Generator, B: int, T: int) -> np.ndarray:
    mask = np.ones((B, T))
    for row, start in enumerate(rng.integers(0, T - 1, B)):
        mask[row, :start] = 0.0  # the prompt: not counted
    return mask


def seq_logp(logits: torch.Tensor, targets: np.ndarray, mask: np.ndarray) -> torch.Tensor:
    safe = torch.tensor(np.where(mask > 0, targets, 0))  # -100 would not index
    logp = F.log_softmax(logits, dim=-1).gather(-1, safe[..., None]).squeeze(-1)  # (B, T)
    return (logp * t(mask)).sum(dim=1)  # (B,)


def seq_reference(rng: np.random.Generator) -> dict:
    B, T, V = 3, 5, 6
    logits = rng.standard_normal((B, T, V)) * 2.0
    mask = prompt_mask(rng, B, T)
    targets = np.where(mask > 0, rng.integers(0, V, (B, T)), -100)
    d = rng.standard_normal(B)
    lt = leaf(logits)
    logp = seq_logp(lt, targets, mask)
    (logp * t(d)).sum().backward()
    return {"logits": logits, "targets": targets, "mask": mask, "d": d,
            "logp": logp.detach().numpy(), "grad/logits": lt.grad.numpy()}


def dpo(pc, pr, rc, rr, beta):
    return -F.logsigmoid(beta * ((pc - rc) - (pr - rr))).mean()


def dpo_reference(rng: np.random.Generator) -> dict:
    B, T, V, beta = 3, 5, 6, 0.1
    logits = rng.standard_normal((2 * B, T, V)) * 2.0
    mask = prompt_mask(rng, 2 * B, T)
    targets = np.where(mask > 0, rng.integers(0, V, (2 * B, T)), -100)
    ref = seq_logp(t(logits + rng.standard_normal(logits.shape)), targets, mask).numpy()
    rc, rr = t(ref[:B]), t(ref[B:])
    # the gradients to the log-probs, with the log-probs as leaves
    logp = seq_logp(t(logits), targets, mask).numpy()
    pc, pr = leaf(logp[:B]), leaf(logp[B:])
    loss = dpo(pc, pr, rc, rr, beta)
    loss.backward()
    # ...and on through the log-probs to the logits
    lt = leaf(logits)
    logp_t = seq_logp(lt, targets, mask)
    dpo(logp_t[:B], logp_t[B:], rc, rr, beta).backward()
    return {"logits": logits, "targets": targets, "mask": mask, "ref": ref, "beta": beta,
            "policy_chosen": logp[:B], "policy_rejected": logp[B:],
            "loss": loss.detach().numpy(),
            "chosen_rewards": (beta * (logp[:B] - ref[:B])),
            "rejected_rewards": (beta * (logp[B:] - ref[B:])),
            "grad/policy_chosen": pc.grad.numpy(), "grad/policy_rejected": pr.grad.numpy(),
            "grad/logits": lt.grad.numpy()}


def dpo_extreme_reference(rng: np.random.Generator) -> dict:
    beta = 0.5
    z = np.array([-1e4, -40.0, 0.0, 40.0, 1e4])  # beta * margin: far past exp's range
    rc, rr = -rng.random(5) * 20, -rng.random(5) * 20
    pr = -rng.random(5) * 20
    pc = rc + (pr - rr) + z / beta  # so that beta * ((pc - rc) - (pr - rr)) = z
    pct, prt = leaf(pc), leaf(pr)
    loss = dpo(pct, prt, t(rc), t(rr), beta)
    loss.backward()
    return {"policy_chosen": pc, "policy_rejected": pr, "ref_chosen": rc, "ref_rejected": rr,
            "beta": beta, "loss": loss.detach().numpy(),
            "grad/policy_chosen": pct.grad.numpy(), "grad/policy_rejected": prt.grad.numpy()}


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
    rng = np.random.default_rng(0)
    arrays: dict[str, object] = {}
    for section, make in [("lora", lora_reference), ("seq", seq_reference),
                          ("dpo", dpo_reference), ("dpo_extreme", dpo_extreme_reference)]:
        for key, value in make(rng).items():
            arrays[f"{section}/{key}"] = value
    arrays["meta"] = json.dumps({
        "generator": "scripts/make_finetune_reference.py", "torch": torch.__version__,
        "numpy": np.__version__, "python": platform.python_version()}, sort_keys=True)
    write_npz(OUT, arrays)
    print(f"wrote {OUT} ({OUT.stat().st_size:,} bytes, {len(arrays)} arrays)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
