"""Files, written once: read JSON with an error that names the file, write atomically.

Every file tinylm writes (checkpoints, logs, plots, tokenizers, token caches,
safetensors) goes through `atomic_write`: the bytes go to a temporary sibling,
are flushed to disk (fsync), and only then renamed over the target. A rename
within one directory is atomic (POSIX and Windows), so a reader, or a run that
crashes mid-write, sees the old file or the new one, never half of one.

Every JSON file tinylm reads goes through `read_json`, so a missing, undecodable
or wrongly shaped file gives one line naming the file and what was expected.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

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
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {what} not found")
    size = path.stat().st_size
    if size > max_bytes:
        raise FileFormatError(f"{path}: {what} of {size:,} bytes is larger than the "
                              f"{max_bytes:,} bytes allowed")
    try:
        value = json.loads(path.read_bytes().decode("utf-8"), object_pairs_hook=_no_duplicates)
    except UnicodeDecodeError as exc:
        raise FileFormatError(f"{path}: {what} is not UTF-8 text ({exc.reason})") from None
    except (json.JSONDecodeError, RecursionError, ValueError) as exc:
        raise FileFormatError(f"{path}: {what} is not valid JSON ({_short(exc)})") from None
    if expect is not None and not isinstance(value, expect):
        kind = {dict: "object", list: "array"}.get(expect, expect.__name__)
        raise FileFormatError(f"{path}: {what} must hold a JSON {kind}, "
                              f"got {type(value).__name__}")
    return value


def _no_duplicates(pairs: list) -> dict:
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


def _short(exc: Exception, limit: int = 200) -> str:
    """An exception's text, cut so that a hostile file cannot flood the terminal."""
    text = str(exc)
    return text if len(text) <= limit else text[:limit] + "..."


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
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
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
