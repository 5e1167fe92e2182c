"""Checkpoints: a directory of plain files, written atomically, read without pickle.

    ckpt/
      config.json      format name + version, the GPTConfig, dtype, which files follow
      model.npz        {parameter name: array}, names as GPT.state_dict(); a quantized
                       model (tinylm.quant) stores each Linear weight as "<layer>.weight.codes"
                       and "<layer>.weight.scales", and config.json says "quantization"
      tokenizer.json   the tokenizer's own versioned JSON (optional)
      optimizer.npz    AdamW: "m/<name>", "v/<name>", "t", "lr", "betas", ... (optional)
      trainer.json     step, RNG states, best validation loss, ... (optional, an object)

    save("runs/x/last", model, optimizer, tokenizer, trainer_state)
    ckpt = load("runs/x/last")            # ckpt.model, .tokenizer, .optimizer_state, ...

Arrays are stored as NumPy arrays on the host (`GPT.state_dict()` copies them off
the GPU), so a checkpoint trained with CuPy loads on a machine without it.

A checkpoint may come from a stranger, so `load` trusts none of it (docs/safety.md):
no pickle (an object array is refused: loading never runs code), and nothing is
allocated before it is known to fit. config.json is checked against tinylm.limits;
the parameter shapes it implies are computed (no model is built) and compared with
the names, dtypes and shapes in the .npy headers of model.npz and optimizer.npz, read
from the zip directory without their data; those headers must agree with the zip
entries' sizes, and the entries with the file's size. Only then is the model built
and the arrays read, each refused if it holds NaN or infinity. Those checks are in
tinylm/checkpoint_read.py; `load` below runs them in this order.

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
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# The checks `load` makes on files it cannot trust, and the format's names (the four not
# used here are imported so that tinylm.checkpoint.KNOWN_FILES and the like still work).
from tinylm.checkpoint_read import (  # noqa: F401
    DTYPES,
    FORMAT,
    KNOWN_FILES,
    OPTIMIZER_SCALARS,
    VERSION,
    WEIGHT_DTYPES,
    _model_config,
    _optimizer_members,
    _read_config,
    _read_optimizer,
    _read_tokenizer,
    _read_trainer_json,
    _read_weights,
    _weight_members,
)
from tinylm.fileio import (
    FileFormatError,
    atomic_write,
    fsync_dir,
    shorten,
    write_json,
    write_text,
)
from tinylm.model import GPT, GPTConfig


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
    if trainer_state is not None and not isinstance(trainer_state, dict):
        raise TypeError(f"trainer_state must be a dict, got {type(trainer_state).__name__}")
    path = Path(path)
    tmp, old = _sibling(path, "tmp"), _sibling(path, "old")
    for p in (path, tmp, old):  # checked before anything is written or removed
        if p.is_symlink():
            raise ValueError(f"refusing to save through {p}: it is a symbolic link (a save "
                             "replaces what it names; remove the link or save elsewhere)")
    _check_replaceable(path)
    if tmp.exists():  # left by a save that crashed before step 3: incomplete
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        _write_files(tmp, model, optimizer, tokenizer, trainer_state)
    except BaseException:  # a full disk, Ctrl-C: no half-written checkpoint is left behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    if path.exists():
        if old.exists():  # a previous save finished step 3 but not step 4
            shutil.rmtree(old)
        os.replace(path, old)  # 2.
    os.replace(tmp, path)  # 3.
    fsync_dir(path.parent)
    if old.exists():
        shutil.rmtree(old)  # 4.
    return path


def _write_files(tmp: Path, model, optimizer, tokenizer, trainer_state) -> None:
    """Step 1: every file into `tmp`, config.json (which lists them) last."""
    files = ["model.npz"]
    quantization = getattr(model, "quantization", None)  # set by tinylm.quant
    if quantization is not None:
        from tinylm.quant import quantized_state

        if optimizer is not None:
            raise ValueError("a quantized model is for inference only: save it without an "
                             "optimizer")
        _write_npz(tmp / "model.npz", quantized_state(model))  # packed codes and scales
    else:
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
            raise ValueError(f"trainer_state cannot be saved as JSON: {exc}") from None
        files.append("trainer.json")
    meta = {
        "format": FORMAT, "version": VERSION,
        "model": model.config.to_dict(), "dtype": np.dtype(model.dtype).name,
        "files": files,
    }
    if quantization is not None:
        meta["quantization"] = quantization
    # config.json last: a directory with a config.json listing its files is complete.
    write_json(tmp / "config.json", meta)
    fsync_dir(tmp)


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
# Loading (the checks themselves: tinylm/checkpoint_read.py)
# ---------------------------------------------------------------------------


def load(path, device: str = "cpu", *, trust_pattern: bool | None = None) -> Checkpoint:
    """Read a checkpoint directory; the model is built on `device` ("cpu", "cuda", "auto").

    Everything that decides how much memory the load takes is checked before it is
    allocated: the config against tinylm.limits, then the names, dtypes and shapes in
    the .npz headers against the config, and their byte counts against the files.
    Every problem raises FileNotFoundError or FileFormatError (a ValueError) naming
    the file. `trust_pattern`: see `tinylm.tokenizer.BPETokenizer.from_dict`.
    """
    path = resolve(path)
    config_file = path / "config.json"
    meta = _read_config(config_file)
    files = meta["files"]
    for name in files:
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path / name}: missing (config.json lists it)")

    # 1. every size, name and shape, from the small files and the .npz headers
    config = _model_config(meta, config_file)
    quantization = meta.get("quantization")  # checked by _read_config
    model_file = path / "model.npz"
    weights, shapes = _weight_members(model_file, config, config_file, quantization)
    moments = None
    if "optimizer.npz" in files:
        moments = _optimizer_members(path / "optimizer.npz", shapes, config_file)
    trainer_state = None
    if "trainer.json" in files:
        trainer_state = _read_trainer_json(path / "trainer.json")
    tokenizer = None
    if "tokenizer.json" in files:
        tokenizer = _read_tokenizer(path / "tokenizer.json", config, config_file, trust_pattern)

    # 2. only now the memory: the arrays, each checked as it is read, then the model
    state = _read_weights(model_file, weights)
    model = GPT(config, device=device, dtype=meta["dtype"])
    if quantization is not None:  # its Linear layers become QuantizedLinear, codes as stored
        from tinylm.quant import restore_quantized

        try:
            state = restore_quantized(model, state, quantization)
        except ValueError as exc:
            raise FileFormatError(f"{model_file}: {shorten(exc)}") from None
    model.load_state_dict(state)
    del state  # (the model holds its own copies)
    optimizer_state = None
    if moments is not None:
        optimizer_state = _read_optimizer(path / "optimizer.npz", moments)
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
        raise FileFormatError(f"{path}: a checkpoint is a directory, this is a file")
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
