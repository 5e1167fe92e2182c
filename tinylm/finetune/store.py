"""What a LoRA run saves beside its checkpoints, so that it resumes exactly.

A LoRA model's `state_dict()` holds only what it trains (the adapters, and the token
embedding when new tokens were added), so a tinylm checkpoint of it could not be
loaded as a model. A LoRA run therefore saves two things at each checkpoint:

    out_dir/last/, best/          ordinary checkpoints of the MERGED model (W + scale A B):
                                  `tinylm generate`, `tinylm dpo` and `checkpoint.load`
                                  read them like any other
    out_dir/adapters/step-N/      the trained arrays and AdamW's state for them, exactly:
        trained.npz               {name: array} as model.state_dict() (lora_A, lora_B, ...)
        optimizer.npz             "t", "lr", "betas", "eps", "weight_decay", "m/<name>", "v/<name>"
        state.json                written last: the LoRA settings, the step, and the
                                  sha256 of the frozen arrays and of both .npz files

Resuming rebuilds the model as the run built it (base checkpoint, chat tokens, LoRA)
and loads step-N, refusing it when the frozen arrays are not those it was trained on.
step-N is complete before the checkpoint that names it is written (a directory
renamed into place), and an old one is deleted only when neither last/ nor best/ names
it, so a crash at any moment leaves a checkpoint whose arrays are there.
"""

from __future__ import annotations

import hashlib
import io
import shutil
from pathlib import Path

import numpy as np

from tinylm import limits
from tinylm.backend import device_of, to_numpy
from tinylm.fileio import (
    FileFormatError,
    atomic_write,
    fsync_dir,
    npz_members,
    read_json,
    read_npz,
    write_json,
)
from tinylm.lora import full_state_dict, lora_layers
from tinylm.model import GPT

STORE_FORMAT = "tinylm-finetune-trained"
STORE_VERSION = 1


def step_dir(out_dir, step: int) -> Path:
    return Path(out_dir) / "adapters" / f"step-{step:08d}"


def frozen_sha256(model) -> str:
    """sha256 of every array the run does not train (names, shapes, float32 values)."""
    trained = {name for name, _, _ in model.parameters()}
    h = hashlib.sha256()
    state = full_state_dict(model)
    for name in sorted(set(state) - trained):
        a = np.ascontiguousarray(state[name], dtype="<f4")
        h.update(f"{name}{a.shape}\n".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _npz_bytes(arrays: dict) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def save_trained(out_dir, step: int, model, optimizer, lora: dict) -> Path:
    """Write adapters/step-<step>/ (see the module docstring); returns its path.
    A directory already there for this step (best/ and last/ of one step) is kept."""
    final = step_dir(out_dir, step)
    if (final / "state.json").is_file():
        return final
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    opt = optimizer.state_dict()
    flat = {"t": np.asarray(opt["t"], dtype=np.int64), "lr": np.asarray(opt["lr"]),
            "betas": np.asarray(opt["betas"]), "eps": np.asarray(opt["eps"]),
            "weight_decay": np.asarray(opt["weight_decay"])}
    for key in ("m", "v"):
        flat.update({f"{key}/{name}": a for name, a in opt[key].items()})
    sums = {}
    for file, arrays in (("trained.npz", model.state_dict()), ("optimizer.npz", flat)):
        data = _npz_bytes(arrays)
        with atomic_write(tmp / file) as f:
            f.write(data)
        sums[file] = hashlib.sha256(data).hexdigest()
    write_json(tmp / "state.json", {
        "format": STORE_FORMAT, "version": STORE_VERSION, "step": step, "lora": lora,
        "frozen_sha256": frozen_sha256(model), "sha256": sums})
    fsync_dir(tmp)
    shutil.rmtree(final, ignore_errors=True)  # a leftover without state.json: incomplete
    tmp.rename(final)
    fsync_dir(final.parent)
    return final


def load_trained(out_dir, step: int, model, lora: dict) -> dict:
    """Load adapters/step-<step>/ into `model` (built as the run built it, adapters
    added); returns AdamW's state_dict for `optimizer.load_state_dict`."""
    path = step_dir(out_dir, step)
    meta = read_json(path / "state.json", what="fine-tuning state")
    where = path / "state.json"
    if meta.get("format") != STORE_FORMAT or meta.get("version") != STORE_VERSION:
        raise FileFormatError(f"{where}: not a version-{STORE_VERSION} {STORE_FORMAT} file")
    if meta.get("step") != step or meta.get("lora") != lora:
        raise FileFormatError(f"{where}: holds step {meta.get('step')!r} with LoRA "
                              f"{meta.get('lora')!r}, not step {step} with {lora}")
    if meta.get("frozen_sha256") != frozen_sha256(model):
        raise ValueError(f"{where}: the frozen weights differ from those this run trained "
                         "on (was the base checkpoint replaced?)")
    expected = {name: tuple(p.shape) for name, p, _ in model.parameters()}
    trained = _read(path / "trained.npz", meta, expected)
    moments = {f"{k}/{n}": s for n, s in expected.items() for k in ("m", "v")}
    scalars = {"t": (), "lr": (), "betas": (2,), "eps": (), "weight_decay": ()}
    flat = _read(path / "optimizer.npz", meta, {**moments, **scalars})
    model.load_state_dict(trained)
    return {"t": int(flat["t"]), "lr": float(flat["lr"]),
            "betas": [float(b) for b in flat["betas"]], "eps": float(flat["eps"]),
            "weight_decay": float(flat["weight_decay"]),
            "m": {n: flat[f"m/{n}"] for n in expected}, "v": {n: flat[f"v/{n}"] for n in expected}}


def _read(file: Path, meta: dict, shapes: dict) -> dict:
    """The arrays of `file`, once its sha256, names and shapes are the expected ones."""
    if not file.is_file():
        raise FileNotFoundError(f"{file}: missing")
    with open(file, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    if digest != meta.get("sha256", {}).get(file.name):
        raise FileFormatError(f"{file}: its sha256 differs from the one state.json records")
    members = npz_members(file, max_expansion=limits.MAX_EXPANSION)
    got = {name: m.shape for name, m in members.items()}
    if got != shapes:
        raise FileFormatError(f"{file}: arrays do not match the model's trained parameters "
                              f"(missing {sorted(set(shapes) - set(got))[:4]}, other "
                              f"{sorted(n for n in got if got[n] != shapes.get(n))[:4]})")
    arrays = read_npz(file, members)
    for name, a in arrays.items():
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            raise FileFormatError(f"{file}: array {name} holds NaN or infinity")
    return arrays


def prune(out_dir, keep: set[int]) -> None:
    """Delete adapters/step-N/ for every N not in `keep` (the steps last/ and best/ hold)."""
    root = Path(out_dir) / "adapters"
    if not root.is_dir():
        return
    for entry in root.iterdir():
        name = entry.name.removesuffix(".tmp")
        if name.startswith("step-") and name[5:].isdigit() and (
                int(name[5:]) not in keep or entry.name.endswith(".tmp")):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)


def merged_model(model) -> GPT:
    """A plain GPT computing what `model` (with LoRA adapters) computes: each adapted
    weight W + scale A @ B, everything else copied. `model` is unchanged."""
    state = full_state_dict(model)
    for name, layer in lora_layers(model).items():
        state[f"{name}.weight"] = state[f"{name}.weight"] + to_numpy(layer.delta_weight())
        del state[f"{name}.lora_A"], state[f"{name}.lora_B"]
    merged = GPT(model.config, device=device_of(model.tok_emb.params["weight"]),
                 dtype=model.dtype)
    merged.load_state_dict(state)
    return merged.eval()
