"""Reading a checkpoint's files, none of them trusted: every check `checkpoint.load` makes.

A checkpoint may come from a stranger (docs/safety.md), so its files are read in
two passes, and this module holds both:

    1. the small files and the .npz headers, nothing allocated yet:
       _read_config (config.json), _model_config (the GPTConfig against tinylm.limits),
       _read_trainer_json (trainer.json, its RNG states included), _read_tokenizer,
       _weight_members / _optimizer_members (names, dtypes and shapes from the zip
       directory and the .npy headers, against the config and the file's size)
    2. the arrays, each checked as it is read: _read_weights, _read_optimizer
       (no NaN or infinity; AdamW's settings in range)

It is separate from tinylm/checkpoint.py, which defines the directory and its
atomic save and puts these steps in order in `load`, so that the rules for an
untrusted file can be read (and reviewed) on their own.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from tinylm import limits
from tinylm.fileio import FileFormatError, npz_members, read_json, read_npz, shorten
from tinylm.model import GPTConfig

FORMAT = "tinylm-checkpoint"
VERSION = 1

# The files a config.json may list (and so the only names `load` ever opens).
KNOWN_FILES = ("model.npz", "tokenizer.json", "optimizer.npz", "trainer.json")
DTYPES = ("float32", "float64")  # what a model may be built in (tinylm.backend)
WEIGHT_DTYPES = ("float16", "float32", "float64")  # what a stored weight may be
OPTIMIZER_SCALARS = {"t": (), "lr": (), "betas": (2,), "eps": (), "weight_decay": ()}


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
