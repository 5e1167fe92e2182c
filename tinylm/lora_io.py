"""LoRA adapters as arrays and as files: state dicts, and the adapter checkpoint.

    full_state_dict(model)         base + adapters under the original names (save it whole)
    lora_state_dict(model)         the adapters alone; load_lora(model, state) copies them in
    save_adapter(path, model)      the adapter directory below; read_adapter checks one
    load_adapter(path, base)       adds the adapters to `base` and loads them (same base only)

The layers themselves (LoRALinear, add_lora, merge_lora, freezing) are in
tinylm/lora.py, which re-exports every name here: `from tinylm.lora import
save_adapter` and `lora.load_adapter(...)` work as before. This file is separate
so that each stays short, and so that what an adapter file holds, and what is
refused when it is read, can be read in one place.

Adapter checkpoints (`save_adapter` / `load_adapter`), a directory:

    adapter.json   {"format": "tinylm-lora-adapter", "version": 1, "rank", "alpha",
                    "layers": [qualified names], "dtype", "arrays_sha256",
                    "base": {"config": GPTConfig dict or null, "weights_sha256": ...}}
    adapter.npz    {"<layer>.lora_A": (in, rank), "<layer>.lora_B": (rank, out)}

`weights_sha256` hashes every base array (names, shapes and values rounded to
float32, so the same base in float32 or float64 gives the same hash); loading onto
a model whose config or weights differ is refused, as is loading onto a merged
model (its weights have changed). `arrays_sha256` is the hash of adapter.npz: a
file replaced or damaged after adapter.json was written is refused too.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np

from tinylm.backend import to_device, to_numpy, xp_of
from tinylm.fileio import FileFormatError, atomic_write, read_json, write_json
from tinylm.nn.module import Module

# LoRALinear, add_lora, lora_layers and named_modules come from tinylm.lora, imported
# at the end of this file (the two modules import each other: see there).

FORMAT = "tinylm-lora-adapter"
VERSION = 1
ADAPTER_JSON = "adapter.json"
ADAPTER_NPZ = "adapter.npz"


# ---------------------------------------------------------------------------
# State dicts
# ---------------------------------------------------------------------------


def full_state_dict(model: Module) -> dict[str, np.ndarray]:
    """{name: NumPy copy} of every array a GPT.state_dict would hold, frozen or not,
    plus the adapters: the base under its original names, so that a model with
    adapters can still be saved whole (its `state_dict()` holds the adapters alone)."""
    state = {}
    for name, m in named_modules(model):
        prefix = name + "." if name else ""
        arrays = dict(m.params)
        if isinstance(m, LoRALinear):
            arrays = {**{k: v for k, v in m.buffers.items()}, **arrays}
        for key, a in arrays.items():
            state[prefix + key] = to_numpy(a).copy()
    return state


def lora_state_dict(model: Module) -> dict[str, np.ndarray]:
    """{"<layer>.lora_A": (in, rank), "<layer>.lora_B": (rank, out)} as NumPy copies."""
    return {f"{name}.{key}": to_numpy(a).copy()
            for name, m in lora_layers(model).items() for key, a in m.params.items()}


def load_lora(model: Module, state: dict) -> None:
    """Copy adapter values in place; the model must have exactly these adapters."""
    own = {f"{name}.{key}": a for name, m in lora_layers(model).items()
           for key, a in m.params.items()}
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(f"LoRA state does not match the model's adapters: missing {missing}, "
                         f"unexpected {unexpected}")
    for name, a in own.items():
        if tuple(state[name].shape) != tuple(a.shape):
            raise ValueError(f"shape mismatch for {name}: state has {tuple(state[name].shape)}, "
                             f"the model expects {tuple(a.shape)}")
    for name, a in own.items():
        a[...] = to_device(to_numpy(state[name]).astype(a.dtype), xp_of(a))


# ---------------------------------------------------------------------------
# Adapter checkpoints
# ---------------------------------------------------------------------------


def base_weights_sha256(model: Module) -> str:
    """sha256 of the base model's arrays (adapters excluded): each name, shape and
    float32 little-endian value bytes, in name order. Rounding to float32 makes a base
    loaded in float64 from a float32 checkpoint hash as the original does."""
    h = hashlib.sha256()
    state = {k: v for k, v in full_state_dict(model).items() if not _is_adapter(k)}
    for name in sorted(state):
        a = np.ascontiguousarray(state[name], dtype="<f4")
        h.update(f"{name}{a.shape}\n".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _is_adapter(name: str) -> bool:
    return name.endswith((".lora_A", ".lora_B"))


def _config_dict(model: Module) -> dict | None:
    config = getattr(model, "config", None)
    return config.to_dict() if config is not None else None


def save_adapter(path, model: Module) -> Path:
    """Write the model's adapters and its base fingerprint into directory `path`
    (created if needed); each file is written atomically, adapter.json last."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA adapters to save (call add_lora first)")
    ranks = {(m.rank, m.alpha) for m in layers.values()}
    if len(ranks) != 1:
        raise ValueError(f"save_adapter needs one rank and alpha for all layers, got {ranks}")
    (rank, alpha), = ranks
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    np.savez(buf, **lora_state_dict(model))
    data = buf.getvalue()
    with atomic_write(path / ADAPTER_NPZ) as f:
        f.write(data)
    write_json(path / ADAPTER_JSON, {
        "format": FORMAT, "version": VERSION, "rank": rank, "alpha": alpha,
        "layers": list(layers), "dtype": np.dtype(model.dtype).name,
        "arrays_sha256": hashlib.sha256(data).hexdigest(),
        "base": {"config": _config_dict(model), "weights_sha256": base_weights_sha256(model)},
    })
    return path


def read_adapter(path) -> tuple[dict, dict[str, np.ndarray]]:
    """(adapter.json's contents, {name: array}) of an adapter directory, checked for
    format, version and integrity (not yet against a model)."""
    path = Path(path)
    meta = read_json(path / ADAPTER_JSON, what="LoRA adapter file")
    where = path / ADAPTER_JSON
    if meta.get("format") != FORMAT:
        raise FileFormatError(f"{where}: not a {FORMAT} file (format {meta.get('format')!r})")
    if meta.get("version") != VERSION:
        raise FileFormatError(f"{where}: {FORMAT} version {meta.get('version')!r} is not "
                              f"supported (this tinylm reads version {VERSION})")
    for key in ("rank", "alpha", "layers", "arrays_sha256", "base"):
        if key not in meta:
            raise FileFormatError(f"{where}: missing field {key!r}")
    layers, base = meta["layers"], meta["base"]
    if (not isinstance(layers, list) or not all(isinstance(x, str) for x in layers)
            or not isinstance(base, dict)):
        raise FileFormatError(f"{where}: 'layers' must be a list of layer names and 'base' "
                              "an object")
    npz = path / ADAPTER_NPZ
    if not npz.is_file():
        raise FileNotFoundError(f"{npz}: LoRA adapter arrays not found")
    data = npz.read_bytes()
    if hashlib.sha256(data).hexdigest() != meta["arrays_sha256"]:
        raise FileFormatError(f"{npz}: its sha256 differs from the one adapter.json records "
                              "(damaged, or replaced after adapter.json was written)")
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        arrays = {name: z[name] for name in z.files}
    expected = {f"{layer}.{k}" for layer in meta["layers"] for k in ("lora_A", "lora_B")}
    if set(arrays) != expected:
        raise FileFormatError(f"{npz}: arrays {sorted(arrays)} do not match the layers "
                              f"adapter.json lists")
    return meta, arrays


def load_adapter(path, model: Module) -> Module:
    """Load the adapter directory `path` onto `model`, in place; returns the model.

    `model` is the base the adapter was trained on (plain, or with the same adapters
    already added); a base of another config or other weights is refused with a
    ValueError that says which."""
    meta, arrays = read_adapter(path)
    base = meta["base"]
    own_config = _config_dict(model)
    if base.get("config") != own_config:
        stored = base.get("config") or {}
        differ = sorted(k for k in set(stored) | set(own_config or {})
                        if stored.get(k) != (own_config or {}).get(k))
        raise ValueError(f"{path}: this adapter was trained on another base model "
                         f"(config differs in {differ or 'kind'})")
    if base.get("weights_sha256") != base_weights_sha256(model):
        raise ValueError(f"{path}: this adapter was trained on another base model: the "
                         "weights differ (another checkpoint, or adapters already merged)")
    existing = lora_layers(model)
    if existing:
        if list(existing) != list(meta["layers"]) or any(
                (m.rank, m.alpha) != (meta["rank"], meta["alpha"]) for m in existing.values()):
            raise ValueError(f"{path}: the model already has other LoRA adapters "
                             "(layers, rank or alpha differ)")
    else:
        add_lora(model, rank=int(meta["rank"]), alpha=float(meta["alpha"]),
                 targets=tuple(meta["layers"]))
    load_lora(model, arrays)
    return model


# The layers, from tinylm/lora.py. Imported last: lora.py re-exports this module's
# names from its own last line, so whichever of the two is imported first, the other
# finds every name it needs already defined.
from tinylm.lora import LoRALinear, add_lora, lora_layers, named_modules  # noqa: E402
