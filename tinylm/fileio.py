"""Files, written once: read JSON and .npz with errors that name the file, write atomically.

Every file tinylm writes (checkpoints, logs, plots, tokenizers, token caches,
safetensors) goes through `atomic_write`: the bytes go to a temporary sibling,
are flushed to disk (fsync), and only then renamed over the target. A rename
within one directory is atomic (POSIX and Windows), so a reader, or a run that
crashes mid-write, sees the old file or the new one, never half of one.

Every JSON file tinylm reads goes through `read_json`, so a missing, undecodable
or wrongly shaped file gives one line naming the file and what was expected.

An .npz (checkpoint weights, optimizer moments) is read in two steps, so that the
caller can check names, dtypes and shapes before any array is allocated:
`npz_members` reads only the zip directory and each member's small .npy header;
`read_npz` then reads the arrays. No pickle, ever: object arrays are refused.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# A JSON file tinylm reads (config, tokenizer, trainer state) is a few MB at most;
# a larger one is refused before it is read (a stranger's file must not fill memory).
MAX_JSON_BYTES = 256 * 2**20


class FileFormatError(ValueError):
    """A file that tinylm cannot use: damaged, of another format, or not what it claims.
    The message starts with the file's path."""


def read_json(path, *, what: str = "JSON file", expect: type | None = dict,
              max_bytes: int = MAX_JSON_BYTES):
    """The parsed contents of `path`.

    Raises FileNotFoundError when it is missing, FileFormatError when it is too
    large, not UTF-8, not JSON (duplicate keys included: JSON leaves them
    undefined, so a file that has them is ambiguous), or not of type `expect`.
    `what` names the file's role in the messages ("tokenizer file").
    """
    path = Path(path)
    text = read_text(path, what=what, max_bytes=max_bytes)  # bounded size, UTF-8
    try:
        value = json.loads(text, object_pairs_hook=no_duplicate_keys)
    except (json.JSONDecodeError, RecursionError, ValueError) as exc:
        raise FileFormatError(f"{path}: {what} is not valid JSON ({_short(exc)})") from None
    if expect is not None and not isinstance(value, expect):
        kind = {dict: "object", list: "array"}.get(expect, expect.__name__)
        raise FileFormatError(f"{path}: {what} must hold a JSON {kind}, "
                              f"got {type(value).__name__}")
    return value


def read_text(path, *, what: str = "text file", max_bytes: int = MAX_JSON_BYTES) -> str:
    """The UTF-8 text of a small file tinylm reads whole (GPT-2's merges.txt): a
    FileNotFoundError when it is missing, a FileFormatError when it is larger than
    `max_bytes` or not UTF-8. (Training text is read by tinylm.data, as given.)"""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {what} not found")
    size = path.stat().st_size
    if size > max_bytes:
        raise FileFormatError(f"{path}: {what} of {size:,} bytes is larger than the "
                              f"{max_bytes:,} bytes allowed")
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FileFormatError(f"{path}: {what} is not UTF-8 text ({exc.reason})") from None


def no_duplicate_keys(pairs: list) -> dict:
    """`json.loads(..., object_pairs_hook=no_duplicate_keys)`: a key twice is a ValueError
    (JSON leaves its meaning undefined; parsers differ on which value wins)."""
    d = dict(pairs)
    if len(d) != len(pairs):
        seen, dup = set(), None
        for key, _ in pairs:
            if key in seen:
                dup = key
                break
            seen.add(key)
        raise ValueError(f"duplicate key {dup!r}")
    return d


def shorten(value, limit: int = 200) -> str:
    """An exception's text, or a value's repr, cut so that a hostile file cannot flood
    the terminal (every message that quotes a file's content goes through this)."""
    text = str(value) if isinstance(value, BaseException) else repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


_short = shorten


# ---------------------------------------------------------------------------
# .npz files, read without trusting them
# ---------------------------------------------------------------------------

# What a damaged zip or .npy can raise from zipfile, zlib and NumPy's format reader.
_NPZ_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, KeyError,
               IndexError, OverflowError, struct.error, NotImplementedError, RuntimeError,
               UnicodeDecodeError, SyntaxError)
_NPY_HEADER_MAX = 10_000  # bytes; NumPy's own default (np.savez writes ~128)


@dataclass(frozen=True)
class NpyMember:
    """One array of an .npz as its headers declare it; its data is not read."""

    name: str  # the member's file name without ".npy"
    dtype: np.dtype
    shape: tuple[int, ...]
    info: zipfile.ZipInfo  # the zip directory entry

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def npz_members(path, *, max_expansion: int, max_ndim: int = 32,
                check_directory=None) -> dict[str, NpyMember]:
    """{name: NpyMember} for the arrays of the .npz at `path`, from the zip directory
    and the .npy header of each member: no array data is read, nothing large allocated.

    Refused (FileFormatError naming the file and the member): not a zip; a member
    that is not an .npy, twice, encrypted or compressed other than by deflate; sizes
    that do not add up (a member's bytes past the end of the file, members sharing
    bytes, a header whose dtype and shape need another byte count than the zip entry
    holds, more than `max_expansion` times the file's size once unpacked); object or
    other non-numeric dtypes (they would need pickle); more than `max_ndim` dimensions.
    `check_directory`, if given, is called with {name: zipfile.ZipInfo} as soon as the
    zip directory is read, before any member is opened: it raises to refuse the names
    or sizes. The caller then checks dtypes and shapes against what it expects.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing")
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            if f.read(4) not in (b"PK\x03\x04", b"PK\x05\x06"):  # a member, or an empty zip
                raise FileFormatError(f"{path}: damaged or truncated (not an .npz (zip) file)")
        with zipfile.ZipFile(path) as zf:
            infos = _check_zip_directory(path, zf.infolist(), size, max_expansion)
            if check_directory is not None:
                check_directory(infos)
            return {name: _read_member_header(path, zf, name, info, max_ndim)
                    for name, info in infos.items()}
    except FileFormatError:
        raise
    except _NPZ_ERRORS as exc:
        raise FileFormatError(f"{path}: damaged or truncated ({_short(exc)})") from None


def _check_zip_directory(path: Path, infos: list, size: int, max_expansion: int) -> dict:
    """{array name: ZipInfo}, once the directory's names and sizes are consistent."""
    by_name, stored_bytes, unpacked_bytes = {}, 0, 0
    for info in infos:
        member = f"{path}: member {shorten(info.filename, 100)}"
        if not info.filename.endswith(".npy"):
            raise FileFormatError(f"{member} is not an .npy array (an .npz holds only those)")
        name = info.filename[: -len(".npy")]
        if name in by_name:
            raise FileFormatError(f"{member} is stored twice (which one is meant?)")
        if info.flag_bits & 0x1:
            raise FileFormatError(f"{member} is encrypted")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise FileFormatError(f"{member} uses zip compression method {info.compress_type}; "
                                  "only stored (np.savez) and deflate (np.savez_compressed) "
                                  "are read")
        if info.compress_type == zipfile.ZIP_STORED and info.compress_size != info.file_size:
            raise FileFormatError(f"{member} is stored uncompressed but declares "
                                  f"{info.file_size:,} bytes unpacked and {info.compress_size:,} "
                                  "packed")
        if info.header_offset + info.compress_size > size:
            raise FileFormatError(f"{member} ends past the end of the file ({size:,} bytes): "
                                  "damaged or truncated")
        by_name[name] = info
        stored_bytes += info.compress_size
        unpacked_bytes += info.file_size
    if stored_bytes > size:
        raise FileFormatError(f"{path}: its members claim {stored_bytes:,} bytes but the file has "
                              f"{size:,}: they overlap (a zip bomb) or the file is damaged")
    if unpacked_bytes > max_expansion * max(size, 2**20):  # tiny files: a MiB of slack
        raise FileFormatError(f"{path}: its members unpack to {unpacked_bytes:,} bytes, more "
                              f"than {max_expansion}x the file's {size:,}: refused as a zip bomb "
                              "(re-save it with np.savez, which does not compress)")
    return by_name


def _read_member_header(path: Path, zf: zipfile.ZipFile, name: str, info, max_ndim: int):
    """The dtype and shape in a member's .npy header, checked against its zip entry size."""
    member = f"{path}: array {shorten(name, 100)}"
    with zf.open(info) as fp:
        version = np.lib.format.read_magic(fp)
        if version not in ((1, 0), (2, 0)):  # np.save writes 1.0, or 2.0 for huge headers
            raise FileFormatError(f"{member} has .npy format version {version}, not 1.0 or 2.0")
        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                       else np.lib.format.read_array_header_2_0)
        shape, _fortran, dtype = read_header(fp, max_header_size=_NPY_HEADER_MAX)
        header_bytes = fp.tell()
    if dtype.hasobject or dtype.kind not in "biufc" or dtype.fields is not None:
        raise FileFormatError(f"{member} has dtype {dtype}: only numeric arrays are read "
                              "(object arrays would need pickle, which tinylm never loads)")
    if len(shape) > max_ndim or any(d < 0 for d in shape):
        raise FileFormatError(f"{member} has an impossible shape {shape}")
    found = NpyMember(name, dtype, tuple(int(d) for d in shape), info)
    if header_bytes + found.nbytes != info.file_size:
        raise FileFormatError(f"{member}: its header declares {dtype} {found.shape}, "
                              f"{found.nbytes:,} bytes of data, but the zip entry holds "
                              f"{info.file_size - header_bytes:,}: damaged or forged")
    return found


def read_npz(path, members: dict[str, NpyMember]) -> dict[str, np.ndarray]:
    """The arrays `members` (from `npz_members`, checked by the caller) of the .npz at
    `path`, read in full, so that a bad CRC shows up here. No pickle."""
    path = Path(path)
    arrays = {}
    try:
        with zipfile.ZipFile(path) as zf:
            for name, member in members.items():
                with zf.open(member.info) as fp:
                    array = np.lib.format.read_array(fp, allow_pickle=False,
                                                     max_header_size=_NPY_HEADER_MAX)
                    fp.read(1)  # the end of the member: zipfile checks the CRC here
                if array.dtype != member.dtype or array.shape != member.shape:
                    raise FileFormatError(f"{path}: array {name!r} changed while being read")
                arrays[name] = array
    except FileFormatError:
        raise
    except _NPZ_ERRORS as exc:
        raise FileFormatError(f"{path}: damaged or truncated ({_short(exc)})") from None
    return arrays


@contextlib.contextmanager
def naming(path):
    """Let an OSError from inside name `path` when it names no file: a failed write()
    on an open file says "File too large" or "No space left on device", but not where."""
    try:
        yield
    except OSError as exc:
        if exc.filename is None:
            exc.filename = str(path)
        raise


@contextlib.contextmanager
def atomic_write(path, mode: str = "wb", encoding: str | None = None):
    """`with atomic_write(path) as f: f.write(...)`: all of the file or none of it.

    Writes to `<path>.tmp`, fsyncs, renames over `path` and fsyncs the directory.
    On any error (or Ctrl-C) the temporary file is removed and `path` is untouched.
    Refuses to write through a symlink at `path` (it would replace the link, not
    its target, which is rarely what a user who made the link wants)."""
    path = Path(path)
    if path.is_symlink():
        raise FileFormatError(f"{path}: refusing to replace a symbolic link")
    tmp = path.with_name(path.name + ".tmp")
    if "b" not in mode and encoding is None:
        encoding = "utf-8"
    try:
        with open(tmp, mode, encoding=encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(exc, OSError) and exc.filename is None:
            exc.filename = str(path)  # a failed write() (disk full) names no file: name ours
        raise
    fsync_dir(path.parent)


def write_text(path, text: str) -> None:
    """Atomically replace `path` with `text` (UTF-8)."""
    with atomic_write(path, "w") as f:
        f.write(text)


def write_json(path, value, *, indent: int | None = 2) -> None:
    """Atomically write `value` as JSON; NaN and infinity are refused before anything
    is written (they are not JSON, and a file that holds them cannot be read back)."""
    write_text(path, json.dumps(value, indent=indent, allow_nan=False) + "\n")


def fsync_dir(directory) -> None:
    """Make renames and new entries in `directory` durable (POSIX; a no-op elsewhere)."""
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
