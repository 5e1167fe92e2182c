"""The safetensors file format, read and written with NumPy alone.

safetensors (Hugging Face) stores named tensors without pickle, so loading a file
cannot run code. A file is three parts:

    bytes 0..8      N, the header's length: an unsigned 64-bit little-endian integer
    bytes 8..8+N    the header: UTF-8 JSON, possibly padded with trailing spaces
                    {"wte.weight": {"dtype": "F32", "shape": [50257, 768],
                                    "data_offsets": [0, 154389504]},
                     ...,
                     "__metadata__": {"format": "pt"}}          (optional, str -> str)
    bytes 8+N..     the data: each tensor's raw little-endian bytes, row-major (C order),
                    at [begin, end) counted from the start of the data section

So reading is: parse the header, check every tensor's byte range, and view those
bytes as an array. Big files (GPT-2 XL is 6 GB) are memory-mapped, so a tensor's
bytes are read from disk only when they are used.

    header = read_header(path)                 # {name: TensorInfo}, metadata
    tensors = load_file(path)                  # {name: np.ndarray}
    save_file({"w": np.ones((2, 3))}, path)    # float arrays are written as F32

The format is described at https://github.com/huggingface/safetensors (README,
"Format"). What is checked here, before any tensor is touched (a file may come from
a stranger: docs/safety.md): the header length fits in the file, the header is a
JSON object with no key twice, every entry has a known dtype, a shape of at most
32 non-negative ints and `data_offsets` whose length equals prod(shape) * itemsize,
no range runs past the end of the file (a truncated download) and no two ranges
overlap. So the tensors can never claim more bytes than the file has. Every error
is a SafetensorsError (a tinylm.fileio.FileFormatError) naming the file and, where
there is one, the tensor.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tinylm import limits
from tinylm.fileio import FileFormatError, atomic_write, no_duplicate_keys, shorten

# safetensors dtype name -> NumPy dtype (little-endian). BF16 has no NumPy dtype: its
# bytes are read as uint16 and widened to float32 (see `_bf16_to_f32`).
DTYPES = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
# NumPy dtype -> safetensors name, for writing (BF16 is read-only here).
_WRITE_NAMES = {dt: name for name, dt in DTYPES.items() if name not in ("BF16",)}

MAX_HEADER_BYTES = 100_000_000  # the reference implementation's limit
MAX_DIM = 2**40  # one dimension of a tensor (a 0-size tensor could claim any other)


@dataclass(frozen=True)
class TensorInfo:
    """One header entry: dtype name, shape, and [begin, end) in the data section."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


class SafetensorsError(FileFormatError):
    """A malformed or truncated safetensors file (a FileFormatError, so a ValueError);
    the message starts with the file's path."""


def read_header(path) -> tuple[dict[str, TensorInfo], dict[str, str], int]:
    """Parse and check the header of `path`.

    Returns ({name: TensorInfo}, metadata, data_start) where data_start is the byte
    offset of the data section in the file (8 + header length).
    """
    path = Path(path)
    if not path.is_file():
        if not path.exists():
            raise FileNotFoundError(f"{path}: safetensors file not found")
        raise SafetensorsError(f"{path}: not a file")
    file_size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise SafetensorsError(f"{path}: {file_size} bytes, too short to be a safetensors "
                                   "file (it starts with an 8-byte header length)")
        n = int.from_bytes(prefix, "little")
        if n > MAX_HEADER_BYTES or 8 + n > file_size:
            raise SafetensorsError(f"{path}: the header length says {n} bytes but the file has "
                                   f"{file_size - 8} after the length (truncated or not a "
                                   "safetensors file)")
        raw = f.read(n)
    try:  # a key twice is refused: which tensor would be meant?
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=no_duplicate_keys)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise SafetensorsError(f"{path}: the header is not UTF-8 JSON ({shorten(exc)})") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: the header must be a JSON object, got "
                               f"{type(header).__name__}")

    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise SafetensorsError(f"{path}: __metadata__ must map strings to strings")
    data_start = 8 + n
    data_size = file_size - data_start
    infos = {name: _check_entry(path, name, entry, data_size) for name, entry in header.items()}
    _check_overlaps(path, infos)
    return infos, metadata, data_start


def _check_entry(path: Path, name: str, entry, data_size: int) -> TensorInfo:
    where = f"{path}: tensor {shorten(name, 100)}"
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
        raise SafetensorsError(f"{where}: a header entry needs dtype, shape and data_offsets, "
                               f"got {shorten(entry)}")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise SafetensorsError(f"{where}: unsupported dtype {shorten(dtype)} "
                               f"(supported: {', '.join(DTYPES)})")
    if (not isinstance(shape, list) or len(shape) > limits.MAX_NDIM
            or not all(_is_count(d) and d <= MAX_DIM for d in shape)):
        raise SafetensorsError(f"{where}: shape must be a list of at most {limits.MAX_NDIM} "
                               f"non-negative ints below 2**40, got {shorten(shape)}")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(map(_is_count, offsets))
            or offsets[0] > offsets[1]):
        raise SafetensorsError(f"{where}: data_offsets must be [begin, end] with "
                               f"0 <= begin <= end, got {shorten(offsets)}")
    begin, end = offsets
    nbytes = math.prod(shape) * DTYPES[dtype].itemsize
    if end - begin != nbytes:
        raise SafetensorsError(f"{where}: {dtype} {shape} needs {nbytes} bytes but data_offsets "
                               f"[{begin}, {end}] hold {end - begin}")
    if end > data_size:
        raise SafetensorsError(f"{where}: its data ends at byte {end} of the data section, which "
                               f"has only {data_size} bytes (the file is truncated)")
    return TensorInfo(dtype, tuple(shape), begin, end)


def _is_count(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _check_overlaps(path: Path, infos: dict[str, TensorInfo]) -> None:
    """No two tensors may share bytes (empty tensors own no bytes)."""
    spans = sorted((i.begin, i.end, name) for name, i in infos.items() if i.end > i.begin)
    for (_, end_a, a), (begin_b, _, b) in zip(spans, spans[1:], strict=False):
        if begin_b < end_a:
            raise SafetensorsError(f"{path}: tensors {a!r} and {b!r} overlap in the data section "
                                   f"(bytes {begin_b}..{end_a})")


def load_file(path, names=None) -> dict[str, np.ndarray]:
    """{name: array} for the tensors of `path` (all of them, or those in `names`).

    Arrays of F32/F64/F16 and integer dtypes are read-only views of a memory map of
    the file (no copy until they are used); BF16 tensors become float32 copies.
    """
    path = Path(path)
    infos, _, data_start = read_header(path)
    if names is not None:
        unknown = sorted(set(names) - set(infos))
        if unknown:
            raise SafetensorsError(f"{path}: no tensors named {shorten(unknown)}")
        infos = {name: infos[name] for name in names}
    data = _map_data(path, data_start)  # (data_size,) uint8
    return {name: _tensor(data, info) for name, info in infos.items()}


def _map_data(path: Path, data_start: int) -> np.ndarray:
    """The data section as a read-only uint8 array, memory-mapped (np.memmap cannot map
    zero bytes, so an empty data section is an empty array)."""
    if path.stat().st_size == data_start:
        return np.zeros(0, dtype=np.uint8)
    return np.memmap(path, dtype=np.uint8, mode="r", offset=data_start)


def _tensor(data: np.ndarray, info: TensorInfo) -> np.ndarray:
    raw = data[info.begin:info.end]  # (nbytes,) uint8 view, no copy
    array = np.asarray(raw).view(DTYPES[info.dtype]).reshape(info.shape)
    if info.dtype == "BF16":
        return _bf16_to_f32(array)
    return array


def _bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 is the top half of a float32 (same sign and exponent, 7-bit mantissa),
    so shifting its 16 bits up into a uint32 gives the float32 with the same value.

    >>> _bf16_to_f32(np.array([0x3F80, 0xC000, 0x7F80], dtype=np.uint16))
    array([ 1., -2., inf], dtype=float32)
    """
    return (bits.astype(np.uint32) << 16).view(np.float32)


def save_file(tensors: dict, path, metadata: dict | None = None) -> None:
    """Write `tensors` ({name: array}) to `path` in the safetensors format, atomically.

    Floating arrays keep their precision (F64, F32, F16); pass float32 arrays to
    get F32. The file is written with `tinylm.fileio.atomic_write` (a temporary
    file, then a rename), so a crash never leaves a half-written file behind.
    Tensors are laid out in name order; the header is padded with spaces to a
    multiple of 8 bytes so that every tensor starts 8-byte aligned for memory maps.
    """
    raw, arrays = _layout(tensors, metadata)  # every check, before the file is opened
    with atomic_write(path) as f:
        _write(f, raw, arrays)


def _layout(tensors: dict, metadata: dict | None) -> tuple[bytes, list[np.ndarray]]:
    """(the header's bytes, length prefix included, and the arrays in file order)."""
    arrays, header, offset = {}, {}, 0
    for name in sorted(tensors):
        if not isinstance(name, str) or name == "__metadata__":
            raise ValueError(f"tensor names must be strings other than '__metadata__', "
                             f"got {name!r}")
        a = np.asarray(tensors[name])
        dt = a.dtype.newbyteorder("<") if a.dtype.byteorder == ">" else a.dtype
        if dt not in _WRITE_NAMES:
            raise TypeError(f"tensor {name!r}: cannot write dtype {a.dtype} to safetensors")
        a = np.asarray(a, dtype=dt, order="C")  # (not ascontiguousarray: it makes 0-d 1-d)
        arrays[name] = a
        header[name] = {"dtype": _WRITE_NAMES[dt], "shape": list(a.shape),
                        "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    if metadata:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise TypeError("safetensors metadata must map strings to strings")
        header = {"__metadata__": dict(metadata), **header}
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-(8 + len(raw)) % 8)  # data starts 8-byte aligned
    return len(raw).to_bytes(8, "little") + raw, list(arrays.values())


def _write(f, header: bytes, arrays: list[np.ndarray]) -> None:
    f.write(header)
    for a in arrays:
        f.write(memoryview(a.reshape(-1)).cast("B"))  # the raw bytes, no copy
