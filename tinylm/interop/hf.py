"""What every Hugging Face converter shares: the directory, its files, the checks.

A Hugging Face model directory (what `save_pretrained` writes) holds

    config.json                    the architecture (each model type names its keys)
    model.safetensors              the weights, or, for big models,
    model.safetensors.index.json   {"weight_map": {tensor name: shard file}} + the shards

Reading one is the same for GPT-2 and Llama up to two tables, which each converter
(gpt2.py, llama.py) keeps for itself: its config keys and its tensor names and
shapes. This file does the rest once: read config.json and the weights (refusing
pickles, and shards that point outside the directory), split off the name prefix,
check the tensors against the expected shapes, build the model, and write a
directory back.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np

from tinylm import limits
from tinylm.fileio import FileFormatError, read_json, shorten, write_json
from tinylm.interop.safetensors import load_file, read_header, save_file
from tinylm.model import GPT, GPTConfig

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"  # sharded checkpoints (big models)
HEAD = "lm_head.weight"  # the output projection, (V, C), outside the prefixed model


class HFCheckpointError(FileFormatError):
    """A Hugging Face checkpoint that tinylm cannot load as it is (a FileFormatError, so
    a ValueError); the message starts with the file it is about."""


# ---------------------------------------------------------------------------
# Reading a directory
# ---------------------------------------------------------------------------


def read_config(directory, kind: str) -> dict:
    """The parsed config.json of a Hugging Face `kind` directory ("GPT-2", "Llama",
    which the errors name); the directory must exist and hold config.json."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: not a directory (expected a Hugging Face {kind} "
                                f"directory with {CONFIG_FILE} and {WEIGHTS_FILE})")
    if not (directory / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{directory}: no {CONFIG_FILE} (a Hugging Face {kind} directory "
                                f"holds {CONFIG_FILE} and {WEIGHTS_FILE})")
    # expect=None: each converter's config check says what a non-object is
    return _read_json(directory / CONFIG_FILE, f"{kind} config", expect=None)


def _read_json(path: Path, what: str, expect=dict):
    """`tinylm.fileio.read_json`, with a damaged file reported as an HFCheckpointError,
    as every other problem with a Hugging Face directory (the message names the file)."""
    try:
        return read_json(path, what=what, expect=expect)
    except FileFormatError as exc:
        raise HFCheckpointError(str(exc)) from None


def read_weights(directory, model_class: str) -> tuple[dict[str, np.ndarray], str]:
    """All tensors of the checkpoint in `directory` (memory-mapped), and the file name
    to quote in errors. Reads model.safetensors, or the shards listed in
    model.safetensors.index.json; refuses pickled weights (the error's conversion
    command loads them with transformers' `model_class`, e.g. "GPT2LMHeadModel")."""
    directory = Path(directory)
    single, index = directory / WEIGHTS_FILE, directory / INDEX_FILE
    if single.is_file():
        return load_file(single), str(single)
    if index.is_file():
        return _read_shards(index), str(index)
    pickles = sorted(p.name for p in directory.glob("*.bin") if p.name != "training_args.bin")
    if pickles:
        raise HFCheckpointError(
            f"{directory}: the weights are in {', '.join(pickles)}, a pickled PyTorch file, and "
            "tinylm never unpickles (loading a pickle can run arbitrary code). Convert it to "
            f"safetensors once, where PyTorch and transformers are installed:\n"
            f"    python -c \"from transformers import {model_class}; "
            f"{model_class}.from_pretrained('{directory}').save_pretrained('{directory}')\"\n"
            "(transformers older than 4.35: add safe_serialization=True), which writes "
            f"{WEIGHTS_FILE}.")
    raise FileNotFoundError(f"{directory}: no {WEIGHTS_FILE} (nor {INDEX_FILE})")


def _read_shards(index: Path) -> dict[str, np.ndarray]:
    weight_map = _read_json(index, "safetensors index").get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(f, str)
                                                   for f in weight_map.values()):
        raise HFCheckpointError(f"{index}: not a safetensors index (no weight_map "
                                "{tensor name: shard file})")
    tensors = {}
    for shard in sorted(set(weight_map.values())):
        path = shard_path(index, shard)
        if not path.is_file():
            raise FileNotFoundError(f"{index}: lists shard {shorten(shard)}, which is missing")
        names = [name for name, file in weight_map.items() if file == shard]
        absent = sorted(set(names) - set(read_header(path)[0]))
        if absent:
            raise HFCheckpointError(f"{path}: {index.name} puts {absent} in this shard, "
                                    "but it does not hold them")
        tensors.update(load_file(path, names))
    return tensors


def shard_path(index: Path, shard: str) -> Path:
    """Where shard file `shard` of `index` is: inside the index's directory, always.

    A shard name is a relative path without ".." (transformers writes plain file
    names). Anything else, an absolute path or "../x", would make a downloaded
    index read a file it does not own, so it is refused. The test is on the name
    only, not on where symbolic links lead: the Hugging Face cache links every file
    of a model directory to a blob elsewhere, and that must keep working."""
    parts = (PurePosixPath(shard), PureWindowsPath(shard))
    if not shard or any(p.is_absolute() or p.drive or p.root or ".." in p.parts for p in parts):
        raise HFCheckpointError(f"{index}: shard {shard!r} is not a file in {index.parent} "
                                "(an index may only name files inside its own directory)")
    return index.parent / shard


# ---------------------------------------------------------------------------
# Names and checks
# ---------------------------------------------------------------------------


def check_limits(cfg: GPTConfig, source: str) -> None:
    """`cfg`, just read from the config.json `source`, within tinylm.limits: checked
    before any table of per-layer names is built or any memory allocated."""
    limits.check_config(cfg, source, error=HFCheckpointError)


def check_weights_fit(cfg: GPTConfig, tensors: dict, config_file: str, weights: str) -> None:
    """The weights (read from `weights`, memory-mapped) hold at least the tensors and the
    bytes that `cfg` implies, checked before the per-layer tables of names and shapes
    are built (a Hugging Face model has as many tensors as tinylm's or more: Llama
    splits q, k and v)."""
    n_tensors, params = limits.count(cfg)
    limits.check_fits(config_file, weights, params=params, tensors=n_tensors,
                      max_bytes=sum(a.nbytes for a in tensors.values()),
                      max_tensors=len(tensors), error=HFCheckpointError)


def failing_in(source: str):
    """`fail(message)`, which raises an HFCheckpointError naming `source` (config.json or
    the weights file): each check is then one line that says only what is wrong."""
    def fail(message: str):
        raise HFCheckpointError(f"{source}: {message}")

    return fail


def layer_names(outer: dict, block: dict, n_layers: int, hf_layer: str) -> dict[str, str]:
    """{Hugging Face name: tinylm name}: `outer` as it is, then `block` repeated for every
    layer i, its Hugging Face names under "{hf_layer}.{i}." and tinylm's under "blocks.{i}."."""
    names = dict(outer)
    for i in range(n_layers):
        names.update({f"{hf_layer}.{i}.{hf}": f"blocks.{i}.{ours}" for hf, ours in block.items()})
    return names


def layer_shapes(outer: dict, block: dict, n_layers: int, hf_layer: str) -> dict:
    """{Hugging Face name: shape}: `outer`, then `block` under "{hf_layer}.{i}." for every i."""
    shapes = dict(outer)
    for i in range(n_layers):
        shapes.update({f"{hf_layer}.{i}.{name}": shape for name, shape in block.items()})
    return shapes


def strip_prefix(tensors: dict, prefix: str, fail) -> dict[str, np.ndarray]:
    """The tensors by their names without `prefix` (the outer model class's name for
    the inner one: "transformer.", "model."), which a checkpoint may or may not use."""
    plain: dict[str, np.ndarray] = {}
    for name, array in tensors.items():
        key = name.removeprefix(prefix)
        if key in plain:
            fail(f"{key!r} is stored twice (with and without the {prefix!r} prefix)")
        plain[key] = array
    return plain


def check_tensors(plain: dict, shapes: dict, cfg: GPTConfig, *, ignored: re.Pattern, what: str,
                  shape_note: str, fail) -> None:
    """Every tensor of `shapes` ({name: shape}, lm_head included) must be in `plain`
    (lm_head only when the head is untied) with that shape, a floating dtype and
    finite values, and nothing else may be, but for buffers matching `ignored`.
    `what` ("a GPT-2 with n_layer=2") and `shape_note` (the config.json keys behind
    the shapes) go into the messages; `fail(message)` raises."""
    expected = set(shapes) - ({HEAD} if cfg.tie_weights else set())
    missing = sorted(expected - set(plain), key=natural)
    if missing:
        fail(f"missing tensors {short_list(missing)} for {what}")
    unexpected = sorted((k for k in plain if k not in shapes and not ignored.fullmatch(k)),
                        key=natural)
    if unexpected:
        fail(f"unexpected tensors {short_list(unexpected)} (not part of {what}; see "
             "docs/interop.md for the names)")
    for key in sorted(set(shapes) & set(plain), key=natural):
        array = plain[key]
        if tuple(array.shape) != shapes[key]:
            fail(f"{key} has shape {tuple(array.shape)}, expected {shapes[key]} from config.json "
                 f"({shape_note})")
        if array.dtype.kind != "f":
            fail(f"{key} has dtype {array.dtype}, expected floating-point weights")
    for key in sorted(set(shapes) & set(plain), key=natural):
        array = plain[key]  # (memory-mapped: min and max read it once, no temporary)
        if array.size and not (np.isfinite(array.min()) and np.isfinite(array.max())):
            fail(f"{key} holds NaN or infinite values (a diverged run or a damaged file)")


def head_from_hf(plain: dict, cfg: GPTConfig, embedding: str, fail) -> dict:
    """tinylm's head: {"head.weight": lm_head transposed} when untied; when tied, {}
    after checking that a stored lm_head equals the token `embedding` it shares."""
    if not cfg.tie_weights:
        return {"head.weight": plain[HEAD].T}  # (V, C) -> tinylm's (C, V)
    if HEAD in plain and not np.array_equal(plain[HEAD], plain[embedding]):
        fail(f"{HEAD} differs from {embedding}, but config.json has tie_word_embeddings "
             "true (the head shares the token embedding)")
    return {}


def natural(name: str):
    """Sort key that puts h.2 before h.10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def short_list(names: list[str], limit: int = 8) -> str:
    """The first `limit` names, and how many more (a message must stay readable)."""
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


# ---------------------------------------------------------------------------
# Model in, directory out
# ---------------------------------------------------------------------------


def build_model(cfg: GPTConfig, state: dict, device: str, dtype) -> GPT:
    """A GPT of `cfg` on `device` holding `state` (converted to `dtype`), in eval mode
    as `from_pretrained` returns it."""
    model = GPT(cfg, device=device, dtype=dtype)  # random weights, overwritten next
    model.load_state_dict(state)
    model.eval()
    return model


def write_directory(directory, tensors: dict, hf_config: dict) -> None:
    """Write a Hugging Face directory: model.safetensors (float32) and config.json,
    each atomically. Written by tinylm, it carries safetensors' {"format": "pt"}
    metadata, which transformers' loader expects."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {name: np.ascontiguousarray(a, dtype=np.float32) for name, a in tensors.items()}
    save_file(tensors, directory / WEIGHTS_FILE, metadata={"format": "pt"})
    write_json(directory / CONFIG_FILE, hf_config)
