"""Checkpoints: a directory of plain files, written atomically, read without pickle.

    ckpt/
      config.json      format name + version, the GPTConfig, dtype, which files follow
      model.npz        {parameter name: array}, names as GPT.state_dict()
      tokenizer.json   the tokenizer's own versioned JSON (optional)
      optimizer.npz    AdamW: "m/<name>", "v/<name>", "t", "lr", "betas", ... (optional)
      trainer.json     step, RNG states, best validation loss, ... (optional, any JSON)

    save("runs/x/last", model, optimizer, tokenizer, trainer_state)
    ckpt = load("runs/x/last")            # ckpt.model, .tokenizer, .optimizer_state, ...

Arrays are stored as NumPy arrays on the host (`GPT.state_dict()` copies them off
the GPU), so a checkpoint trained with CuPy loads on a machine without it. Every
`.npz` is read with `allow_pickle=False`: loading a checkpoint never runs code.

Atomic save (a crash at any moment leaves a complete checkpoint, old or new):

    1. write every file into the sibling "<name>.tmp/", fsync each file and the directory
       (each file with `tinylm.fileio`, as every file tinylm writes)
    2. rename "<name>"      -> "<name>.old"      (the previous checkpoint, if any)
    3. rename "<name>.tmp"  -> "<name>"          (the new one, complete)
    4. delete "<name>.old"

Between 2 and 3 only "<name>.old" is there; `load` falls back to it, and the next
`save` keeps it until the new checkpoint is in place.
"""

from __future__ import annotations

import os
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tinylm.fileio import atomic_write, fsync_dir, read_json, write_json, write_text
from tinylm.model import GPT, GPTConfig

FORMAT = "tinylm-checkpoint"
VERSION = 1


@dataclass
class Checkpoint:
    """What `load` returns. Optional parts are None when they were not saved."""

    path: Path  # the directory it was read from
    config: GPTConfig  # the model's shape
    model: GPT  # built on the requested device, weights loaded
    tokenizer: object | None  # BPETokenizer or CharTokenizer
    optimizer_state: dict | None  # as AdamW.state_dict(): t, lr, betas, eps, weight_decay, m, v
    trainer_state: dict | None  # whatever the trainer saved (JSON)
    meta: dict  # config.json as read


# ---------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------


def save(path, model, optimizer=None, tokenizer=None, trainer_state=None) -> Path:
    """Write a checkpoint directory at `path` atomically, replacing any previous one.

    `optimizer`: an AdamW (or its `state_dict()`); `tokenizer`: anything with
    `to_dict()`; `trainer_state`: a JSON-serialisable dict (no NaN or infinity).
    """
    path = Path(path)
    _check_replaceable(path)
    tmp, old = _sibling(path, "tmp"), _sibling(path, "old")
    if tmp.exists():  # left by a save that crashed before step 3: incomplete
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)

    files = ["model.npz"]
    _write_npz(tmp / "model.npz", model.state_dict())
    if tokenizer is not None:
        from tinylm.tokenizer.fileformat import dumps  # the tokenizer's own JSON layout

        write_text(tmp / "tokenizer.json", dumps(tokenizer.to_dict()) + "\n")
        files.append("tokenizer.json")
    if optimizer is not None:
        state = optimizer.state_dict() if hasattr(optimizer, "state_dict") else optimizer
        _write_npz(tmp / "optimizer.npz", _flatten_optimizer(state))
        files.append("optimizer.npz")
    if trainer_state is not None:
        try:  # write_json checks the value before it opens the file
            write_json(tmp / "trainer.json", trainer_state)
        except (TypeError, ValueError) as exc:
            shutil.rmtree(tmp)
            raise ValueError(f"trainer_state cannot be saved as JSON: {exc}") from None
        files.append("trainer.json")
    meta = {
        "format": FORMAT, "version": VERSION,
        "model": model.config.to_dict(), "dtype": np.dtype(model.dtype).name,
        "files": files,
    }
    # config.json last: a directory with a config.json listing its files is complete.
    write_json(tmp / "config.json", meta)
    fsync_dir(tmp)

    if path.exists():
        if old.exists():  # a previous save finished step 3 but not step 4
            shutil.rmtree(old)
        os.replace(path, old)  # 2.
    os.replace(tmp, path)  # 3.
    fsync_dir(path.parent)
    if old.exists():
        shutil.rmtree(old)  # 4.
    return path


def _sibling(path: Path, suffix: str) -> Path:
    return path.with_name(f"{path.name}.{suffix}")


def _check_replaceable(path: Path) -> None:
    """Refuse to replace anything that is not a checkpoint (a typo must not delete data)."""
    if path.exists() and not (path.is_dir() and
                              ((path / "config.json").is_file() or not any(path.iterdir()))):
        raise ValueError(f"refusing to overwrite {path}: it exists and is not a tinylm checkpoint")


def _write_npz(file: Path, arrays: dict) -> None:
    with atomic_write(file) as f:
        np.savez(f, **arrays)


def _flatten_optimizer(state: dict) -> dict:
    """AdamW.state_dict() -> flat {key: array} for an .npz (exact float64 scalars)."""
    flat = {
        "t": np.asarray(state["t"], dtype=np.int64),
        "lr": np.asarray(state["lr"], dtype=np.float64),
        "betas": np.asarray(state["betas"], dtype=np.float64),
        "eps": np.asarray(state["eps"], dtype=np.float64),
        "weight_decay": np.asarray(state["weight_decay"], dtype=np.float64),
    }
    for key in ("m", "v"):
        for name, arr in state[key].items():
            flat[f"{key}/{name}"] = np.asarray(arr)
    return flat


# ---------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------


def load(path, device: str = "cpu") -> Checkpoint:
    """Read a checkpoint directory; the model is built on `device` ("cpu", "cuda", "auto").

    Every problem (missing or damaged file, unknown version, mismatched shapes)
    raises FileNotFoundError or ValueError naming the file.
    """
    path = resolve(path)
    meta = _read_config(path / "config.json")
    files = meta["files"]
    for name in files:
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path / name}: missing (config.json lists it)")

    config_file = path / "config.json"
    try:
        config = GPTConfig.from_dict(meta["model"])
        model = GPT(config, device=device, dtype=meta.get("dtype", "float32"))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{config_file}: bad model configuration: {exc}") from None

    model_file = path / "model.npz"
    try:
        model.load_state_dict(_read_npz(model_file))
    except ValueError as exc:
        raise ValueError(f"{model_file}: {exc}") from None

    tokenizer = None
    if "tokenizer.json" in files:
        from tinylm.tokenizer import load as load_tokenizer

        tok_file = path / "tokenizer.json"
        tokenizer = load_tokenizer(tok_file)
        if tokenizer.vocab_size > config.vocab_size:
            raise ValueError(
                f"{tok_file}: the tokenizer has {tokenizer.vocab_size} ids but the model "
                f"({config_file}) only {config.vocab_size}: they do not belong together"
            )

    optimizer_state = None
    if "optimizer.npz" in files:
        optimizer_state = _read_optimizer(path / "optimizer.npz", model)

    trainer_state = None
    if "trainer.json" in files:
        trainer_state = _read_trainer_json(path / "trainer.json")
    return Checkpoint(path, config, model, tokenizer, optimizer_state, trainer_state, meta)


def resolve(path) -> Path:
    """The checkpoint directory to read: `path`, or "<path>.old" when a save was cut
    off between its two renames (see the module docstring)."""
    path = Path(path)
    if not path.exists():
        old = _sibling(path, "old")
        if (old / "config.json").is_file():
            return old
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if not path.is_dir():
        raise ValueError(f"{path}: a checkpoint is a directory, this is a file")
    return path


def is_checkpoint(path) -> bool:
    """True when `path` (or its ".old" fallback) looks like a checkpoint directory."""
    try:
        return (resolve(path) / "config.json").is_file()
    except (FileNotFoundError, ValueError):
        return False


def read_meta(path) -> dict:
    """config.json of a checkpoint, checked (cheap: no arrays are read)."""
    return _read_config(resolve(path) / "config.json")


def read_trainer_state(path) -> dict | None:
    """trainer.json of a checkpoint, or None when it has none (cheap: no arrays)."""
    path = resolve(path)
    meta = _read_config(path / "config.json")
    return _read_trainer_json(path / "trainer.json") if "trainer.json" in meta["files"] else None


def _read_config(file: Path) -> dict:
    if not file.is_file():
        raise FileNotFoundError(f"{file}: missing (is {file.parent} a tinylm checkpoint?)")
    meta = read_json(file, what="checkpoint config", expect=None)  # not a dict: next line
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f'{file}: not a tinylm checkpoint config (no "format": "{FORMAT}")')
    if meta.get("version") != VERSION:
        raise ValueError(f"{file}: checkpoint format version {meta.get('version')!r} is not "
                         f"supported (this tinylm reads version {VERSION})")
    if not isinstance(meta.get("model"), dict) or not isinstance(meta.get("files"), list):
        raise ValueError(f'{file}: damaged checkpoint config ("model" or "files" missing)')
    if "model.npz" not in meta["files"]:
        raise ValueError(f"{file}: damaged checkpoint config (model.npz is not listed)")
    return meta


def _read_trainer_json(file: Path):
    # any JSON value: `save` accepts whatever the trainer hands it
    return read_json(file, what="trainer state", expect=None)


def _read_npz(file: Path) -> dict[str, np.ndarray]:
    """Every array of an .npz, read eagerly (so a bad CRC shows up here), no pickle."""
    if not file.is_file():
        raise FileNotFoundError(f"{file}: missing")
    try:
        with open(file, "rb") as f:
            if f.read(4) != b"PK\x03\x04":
                raise ValueError("not an .npz (zip) file")
        with np.load(file, allow_pickle=False) as z:
            return {name: z[name] for name in z.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as exc:
        raise ValueError(f"{file}: damaged or truncated ({exc})") from None


def _read_optimizer(file: Path, model: GPT) -> dict:
    flat = _read_npz(file)
    try:
        state = {
            "t": int(flat["t"]), "lr": float(flat["lr"]),
            "betas": [float(b) for b in flat["betas"]],
            "eps": float(flat["eps"]), "weight_decay": float(flat["weight_decay"]),
            "m": {}, "v": {},
        }
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{file}: damaged optimizer state (missing or bad {exc})") from None
    for key, arr in flat.items():
        if "/" in key:
            kind, name = key.split("/", 1)
            if kind in ("m", "v"):
                state[kind][name] = arr
    shapes = {name: tuple(p.shape) for name, p, _ in model.parameters()}
    for kind in ("m", "v"):
        got = {name: tuple(a.shape) for name, a in state[kind].items()}
        if got != shapes:
            missing = sorted(set(shapes) - set(got))
            unexpected = sorted(set(got) - set(shapes))
            wrong = sorted(n for n in set(got) & set(shapes) if got[n] != shapes[n])
            raise ValueError(f"{file}: optimizer state does not match the model: missing "
                             f"{missing}, unexpected {unexpected}, wrong shape {wrong}")
    return state
