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
and the arrays read, each refused if it holds NaN or infinity.

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

import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tinylm import limits
from tinylm.fileio import (
    FileFormatError,
    atomic_write,
    fsync_dir,
    npz_members,
    read_json,
    read_npz,
    shorten,
    write_json,
    write_text,
)
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
# Loading
# ---------------------------------------------------------------------------

# The files a config.json may list (and so the only names `load` ever opens).
KNOWN_FILES = ("model.npz", "tokenizer.json", "optimizer.npz", "trainer.json")
DTYPES = ("float32", "float64")  # what a model may be built in (tinylm.backend)
WEIGHT_DTYPES = ("float16", "float32", "float64")  # what a stored weight may be
OPTIMIZER_SCALARS = {"t": (), "lr": (), "betas": (2,), "eps": (), "weight_decay": ()}


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


# -- the small files ----------------------------------------------------------------


def _read_config(file: Path) -> dict:
    if not file.is_file():
        raise FileNotFoundError(f"{file}: missing (is {file.parent} a tinylm checkpoint?)")
    meta = read_json(file, what="checkpoint config", expect=None)  # not a dict: next line
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise FileFormatError(f'{file}: not a tinylm checkpoint config (no "format": "{FORMAT}")')
    if meta.get("version") != VERSION:
        raise FileFormatError(f"{file}: checkpoint format version {meta.get('version')!r} is "
                              f"not supported (this tinylm reads version {VERSION})")
    files = meta.get("files")
    if not isinstance(meta.get("model"), dict) or not isinstance(files, list):
        raise FileFormatError(f'{file}: damaged checkpoint config ("model" or "files" missing)')
    # only known names: a config.json must not make `load` open files of its choosing
    if not all(isinstance(name, str) and name in KNOWN_FILES for name in files):
        raise FileFormatError(f'{file}: damaged checkpoint config ("files" may list only '
                              f"{', '.join(KNOWN_FILES)}; got {shorten(files)})")
    if "model.npz" not in files:
        raise FileFormatError(f"{file}: damaged checkpoint config (model.npz is not listed)")
    if "quantization" in meta:
        from tinylm.quant import check_quantization

        try:
            meta["quantization"] = check_quantization(meta["quantization"])
        except ValueError as exc:
            raise FileFormatError(f"{file}: {shorten(exc)}") from None
        if "optimizer.npz" in files:
            raise FileFormatError(f"{file}: a quantized checkpoint cannot hold optimizer.npz "
                                  "(it is for inference only)")
    meta.setdefault("dtype", "float32")
    if meta["dtype"] not in DTYPES:  # (a list or dict would make `in` fail: it compares)
        raise FileFormatError(f'{file}: "dtype" must be one of {DTYPES}, '
                              f"got {shorten(meta['dtype'])}")
    return meta


def _model_config(meta: dict, file: Path) -> GPTConfig:
    """The GPTConfig in config.json, checked against tinylm.limits (nothing allocated)."""
    try:
        config = GPTConfig.from_dict(meta["model"])
    except (TypeError, ValueError, OverflowError) as exc:
        raise FileFormatError(f"{file}: bad model configuration: {shorten(exc)}") from None
    limits.check_config(config, file)
    return config


def _read_trainer_json(file: Path) -> dict:
    """trainer.json: a JSON object; the fields the trainer relies on are checked here,
    so that a damaged or forged file fails on load, naming itself (what the trainer
    does with them is its own business: tinylm/training/resume.py)."""
    state = read_json(file, what="trainer state", expect=dict)
    for key, ok, want in _TRAINER_FIELDS:
        if key in state and not ok(state[key]):
            raise FileFormatError(f"{file}: {key!r} must be {want}, got {shorten(state[key])}")
    if "rng" in state:
        _check_rng_states(state["rng"], file)
    return state


def _count(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 2**63


def _real(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


_TRAINER_FIELDS = (
    ("format", lambda x: isinstance(x, str), "a string"),
    ("version", _count, "an int >= 0"),
    ("step", _count, "an int >= 0"),
    ("tokens_seen", _count, "an int >= 0"),
    ("best_val_loss", lambda x: x is None or _real(x), "a finite number or null"),
    ("elapsed_s", lambda x: _real(x) and x >= 0, "a finite number >= 0"),
    ("last_eval", lambda x: x is None or isinstance(x, dict), "an object or null"),
    ("config", lambda x: isinstance(x, dict), "an object"),
    ("data", lambda x: isinstance(x, dict), "an object"),
)
# NumPy's bit generators, by the name their state carries; setting a state on one is
# the check (NumPy validates every field; a microsecond, next to no memory).
_BIT_GENERATORS = {"PCG64": np.random.PCG64, "PCG64DXSM": np.random.PCG64DXSM,
                   "MT19937": np.random.MT19937, "Philox": np.random.Philox,
                   "SFC64": np.random.SFC64}


def _check_rng_states(rng, file: Path) -> None:
    """"rng": one generator state, or an object whose values are states or lists of
    states (the trainer's {"batches": ..., "eval": ..., "dropout": [...]})."""
    checkers = {}  # one bit generator per kind, reused: a state is set in a microsecond
    if isinstance(rng, dict) and "bit_generator" in rng:
        _check_rng_state(rng, "rng", file, checkers)
        return
    if not isinstance(rng, dict):
        raise FileFormatError(f"{file}: 'rng' must be an object, got {shorten(rng)}")
    for key, value in rng.items():
        states = value if isinstance(value, list) else [value]
        for i, state in enumerate(states):
            where = f"rng.{key}" + (f"[{i}]" if isinstance(value, list) else "")
            _check_rng_state(state, where, file, checkers)


def _check_rng_state(state, where: str, file: Path, checkers: dict) -> None:
    kind = state.get("bit_generator") if isinstance(state, dict) else None
    if not isinstance(kind, str) or kind not in _BIT_GENERATORS:
        raise FileFormatError(f"{file}: {where} is not a NumPy generator state (bit_generator "
                              f"one of {', '.join(_BIT_GENERATORS)})")
    if kind not in checkers:
        checkers[kind] = _BIT_GENERATORS[kind]()
    try:
        checkers[kind].state = state
    except (TypeError, ValueError, KeyError, IndexError, OverflowError) as exc:
        raise FileFormatError(f"{file}: {where} is not a valid {kind} state "
                              f"({shorten(exc)})") from None


def _read_tokenizer(file: Path, config: GPTConfig, config_file: Path, trust_pattern):
    from tinylm.tokenizer import load as load_tokenizer

    tokenizer = load_tokenizer(file, trust_pattern=trust_pattern)
    if tokenizer.vocab_size > config.vocab_size:
        raise FileFormatError(
            f"{file}: the tokenizer has {tokenizer.vocab_size} ids but the model "
            f"({config_file}) only {config.vocab_size}: they do not belong together")
    return tokenizer


# -- the arrays: headers first, data second ----------------------------------------------


def _weight_members(file: Path, config: GPTConfig, config_file: Path,
                    quantization: dict | None = None) -> tuple[dict, dict]:
    """model.npz's members, and the parameter shapes of `config`, once the config fits
    the file and the members' names, shapes and float dtypes are those it implies.
    A quantized model (`quantization`) holds each Linear weight as integer codes and
    float32 scales instead (tinylm.quant.stored_shapes), of exactly those dtypes."""
    shapes, stored = {}, {}

    def check_directory(infos: dict) -> None:  # the zip directory is read, no member yet
        tensors, params = limits.count(config)
        if quantization is not None:  # a weight takes half a byte at least (int4)
            params = -(-params // (2 * limits.MIN_WEIGHT_BYTES))
        limits.check_fits(config_file, file, params=params, tensors=tensors,
                          max_bytes=sum(info.file_size for info in infos.values()),
                          max_tensors=len(infos))
        shapes.update(limits.parameter_shapes(config))  # small now: one entry per member
        if quantization is None:
            stored.update({name: (shape, None) for name, shape in shapes.items()})
        else:
            from tinylm.quant import stored_shapes

            stored.update(stored_shapes(shapes, quantization))
        _match_names(file, set(infos), stored, config_file)

    members = npz_members(file, max_expansion=limits.MAX_EXPANSION, max_ndim=limits.MAX_NDIM,
                          check_directory=check_directory)
    _match_shapes(file, members, {name: shape for name, (shape, _) in stored.items()},
                  config_file)
    _float_dtypes(file, [members[name] for name, (_, dtype) in stored.items() if dtype is None])
    for name, (_, dtype) in stored.items():
        if dtype is not None and members[name].dtype != dtype:
            raise FileFormatError(f"{file}: {name} has dtype {members[name].dtype}; a "
                                  f"{quantization['scheme']} checkpoint stores it as {dtype}")
    return members, shapes


def _optimizer_members(file: Path, shapes: dict, config_file: Path) -> dict:
    """optimizer.npz's members: AdamW's scalars, and moments m/<name> and v/<name> of
    every parameter's shape."""
    expected = dict(OPTIMIZER_SCALARS)
    for kind in ("m", "v"):
        expected.update({f"{kind}/{name}": shape for name, shape in shapes.items()})
    members = npz_members(file, max_expansion=limits.MAX_EXPANSION, max_ndim=limits.MAX_NDIM,
                          check_directory=lambda infos: _match_names(file, set(infos), expected,
                                                                     config_file))
    _match_shapes(file, members, expected, config_file)
    if members["t"].dtype.kind not in "iu":
        raise FileFormatError(f"{file}: 't' (the step count) has dtype {members['t'].dtype}, "
                              "expected an integer")
    _float_dtypes(file, (m for name, m in members.items() if name != "t"))
    return members


def _match_names(file: Path, names: set, expected: dict, config_file: Path) -> None:
    """Before any member is opened: exactly the expected names."""
    missing = sorted(set(expected) - names)
    unexpected = sorted(names - set(expected))
    if missing or unexpected:
        raise FileFormatError(f"{file}: the arrays do not match the model of {config_file.name}:"
                              f" missing {_names(missing)}; unexpected {_names(unexpected)}")


def _match_shapes(file: Path, members: dict, expected: dict, config_file: Path) -> None:
    for name, shape in expected.items():
        if members[name].shape != shape:
            raise FileFormatError(f"{file}: shape mismatch for {name}: the file has "
                                  f"{members[name].shape}, {config_file.name} implies {shape}")


def _names(names: list, limit: int = 6) -> str:
    """The first `limit` names and how many more: a message must stay readable."""
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ("[" + ", ".join(names[:limit]) + more + "]") if names else "none"


def _float_dtypes(file: Path, members) -> None:
    for m in members:
        if m.dtype.kind != "f" or m.dtype.name not in WEIGHT_DTYPES:
            raise FileFormatError(f"{file}: {m.name} has dtype {m.dtype}; weights and moments "
                                  f"must be one of {', '.join(WEIGHT_DTYPES)}")


def _read_weights(file: Path, members: dict) -> dict[str, np.ndarray]:
    arrays = read_npz(file, members)
    for name, array in arrays.items():
        _check_finite(file, name, array)
    return arrays


def _read_optimizer(file: Path, members: dict) -> dict:
    flat = read_npz(file, members)
    state = {"t": int(flat["t"]), "lr": float(flat["lr"]),
             "betas": [float(b) for b in flat["betas"]], "eps": float(flat["eps"]),
             "weight_decay": float(flat["weight_decay"]), "m": {}, "v": {}}
    hyper_ok = (state["t"] >= 0 and _real(state["lr"]) and state["lr"] >= 0
                and all(_real(b) and 0 <= b < 1 for b in state["betas"])
                and _real(state["eps"]) and state["eps"] > 0
                and _real(state["weight_decay"]) and state["weight_decay"] >= 0)
    if not hyper_ok:
        shown = {k: v for k, v in state.items() if k not in ("m", "v")}
        raise FileFormatError(f"{file}: AdamW's settings are out of range: {shown} (t >= 0, "
                              "lr >= 0, betas in [0, 1), eps > 0, weight_decay >= 0, finite)")
    for key, array in flat.items():
        if "/" in key:
            kind, name = key.split("/", 1)
            _check_finite(file, key, array)
            if kind == "v" and array.size and array.min() < 0:  # a mean of squares
                raise FileFormatError(f"{file}: {key} has negative entries (AdamW's second "
                                      "moment is a mean of squares)")
            state[kind][name] = array
    return state


def _check_finite(file: Path, name: str, array: np.ndarray) -> None:
    """Refuse NaN and infinity. min and max propagate NaN and show an infinity, so two
    passes over the array, without a temporary, find either."""
    if array.size and not (np.isfinite(array.min()) and np.isfinite(array.max())):
        bad = int(np.count_nonzero(~np.isfinite(array)))
        raise FileFormatError(f"{file}: {name} holds {bad} NaN or infinite value(s) "
                              "(a diverged run or a damaged file)")
