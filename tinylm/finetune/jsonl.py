"""JSON Lines, read without trusting them: one record a line, bounded in every way.

A fine-tuning file may come from anywhere (a download, a colleague, a script gone
wrong), so `read_jsonl` never holds more than one line in memory at a time, refuses a
line longer than `max_line_bytes` before reading the rest of it, and stops at
`max_records` records. Every problem is one FileFormatError whose message starts
with `path:line`, the way compilers name a place in a file:

    data/chat.jsonl:17: not valid JSON (Expecting ',' delimiter: line 1 column 9 (char 8))

Blank lines are skipped (a trailing newline at the end of a file is common).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from tinylm.fileio import FileFormatError, no_duplicate_keys, shorten, write_text

# A chat example of the bundled sets is ~150 bytes; a long real conversation a few
# tens of KB. A MiB per line leaves ample room and keeps one line's cost small.
MAX_LINE_BYTES = 1 << 20
# The bundled sets hold hundreds of records; a million is more than tinylm trains on
# in a day, and at most a few GB of token ids.
MAX_RECORDS = 1_000_000


def read_jsonl(path, *, what: str = "JSONL file", max_line_bytes: int = MAX_LINE_BYTES,
               max_records: int = MAX_RECORDS) -> Iterator[tuple[int, dict]]:
    """Yield (line number, JSON object) for each non-blank line of `path`.

    FileNotFoundError when the file is missing; FileFormatError `path:line: cause`
    for a line that is too long, not UTF-8, not JSON (duplicate keys included), not
    an object, or past `max_records`; `path: ...` for a file with no record at all.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {what} not found")
    records = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(_lines(f, path, max_line_bytes), start=1):
            if not raw.strip():
                continue
            if records == max_records:
                raise FileFormatError(f"{path}:{lineno}: more than {max_records:,} records "
                                      "(split the file, or raise the limit)")
            yield lineno, parse_line(raw, f"{path}:{lineno}")
            records += 1
    if records == 0:
        raise FileFormatError(f"{path}: {what} holds no records (one JSON object a line)")


def _lines(f, path: Path, max_line_bytes: int) -> Iterator[bytes]:
    """The file's lines, each read with a bounded `readline`: a line without a newline
    in its first `max_line_bytes` bytes is refused before any more of it is read."""
    lineno = 0
    while True:
        raw = f.readline(max_line_bytes + 1)
        if not raw:
            return
        lineno += 1
        if len(raw) > max_line_bytes:
            raise FileFormatError(f"{path}:{lineno}: line longer than {max_line_bytes:,} bytes")
        yield raw


def parse_line(raw: bytes, where: str) -> dict:
    """One JSON object from the bytes of one line; errors start with `where`."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FileFormatError(f"{where}: not UTF-8 text ({exc.reason} at byte {exc.start})") \
            from None
    try:
        value = json.loads(text, object_pairs_hook=no_duplicate_keys)
    except (json.JSONDecodeError, RecursionError, ValueError) as exc:
        raise FileFormatError(f"{where}: not valid JSON ({shorten(exc)})") from None
    if not isinstance(value, dict):
        raise FileFormatError(f"{where}: each line must be a JSON object, got "
                              f"{type(value).__name__}")
    return value


def write_jsonl(path, records) -> None:
    """Atomically write `records` (dicts), one JSON object a line, UTF-8 as it is."""
    write_text(path, "".join(json.dumps(r, ensure_ascii=False, allow_nan=False) + "\n"
                             for r in records))
