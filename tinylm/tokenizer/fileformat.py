"""The tokenizer file: versioned, human-readable JSON shared by every tokenizer type.

Every file starts with the same three fields, then what its type needs:

    {
      "format": "tinylm-tokenizer",
      "version": 1,
      "type": "bpe",            (or "char")
      ...
    }

`read_json` checks them and says clearly what is wrong with a file that is not ours
(GPT-2's vocab.json, a Hugging Face tokenizer.json, a newer version). Reading and
writing go through `tinylm.fileio`, as for every file tinylm touches: a damaged file
gives one line naming it, and a crash never leaves half a file.
"""

from __future__ import annotations

import json
from pathlib import Path

import regex

from tinylm import fileio, limits
from tinylm.fileio import FileFormatError

FORMAT = "tinylm-tokenizer"
VERSION = 1


def header(kind: str) -> dict:
    """The fields every tokenizer file starts with.

    >>> header("char")
    {'format': 'tinylm-tokenizer', 'version': 1, 'type': 'char'}
    """
    return {"format": FORMAT, "version": VERSION, "type": kind}


def check_header(d, source: str = "tokenizer data", kind: str | None = None) -> None:
    """Raise a clear FileFormatError (a ValueError) unless `d` is tinylm tokenizer data
    (of type `kind`)."""
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        hint = ""
        if isinstance(d, dict) and "model" in d and "added_tokens" in d:
            hint = " It looks like a Hugging Face tokenizer.json."
        elif isinstance(d, dict) and d and all(isinstance(v, int) for v in d.values()):
            hint = (" It looks like GPT-2's vocab.json: use "
                    "BPETokenizer.from_gpt2(vocab_json, merges_txt).")
        raise FileFormatError(f'{source}: not a tinylm tokenizer file (no "format": '
                              f'"{FORMAT}").{hint}')
    if d.get("version") != VERSION:
        raise FileFormatError(
            f"{source}: tokenizer file version {fileio.shorten(d.get('version'))} is not "
            f"supported (this tinylm reads version {VERSION})"
        )
    if kind is not None and d.get("type") != kind:
        raise FileFormatError(f"{source}: holds a {fileio.shorten(d.get('type'))} tokenizer, "
                              f"not a {kind!r} one")


def dumps(d: dict) -> str:
    """JSON with an indent of 2, but each list of plain values kept on one line.

    So a BPE file shows one merge per line. (Joining lines is safe: JSON never has a
    raw newline inside a string.)

    >>> print(dumps({"merges": [[104, 105, 256, "hi"], [256, 93, 257, "hi]"]]}))
    {
      "merges": [
        [104, 105, 256, "hi"],
        [256, 93, 257, "hi]"]
      ]
    }
    """
    text = json.dumps(d, indent=2, ensure_ascii=False)
    # an innermost list: "[", newline, then strings or characters other than brackets
    innermost = r'\[\n\s*((?:"(?:[^"\\]|\\.)*"|[^\[\]{}"])*?)\n\s*\]'
    return regex.sub(innermost, lambda m: "[" + regex.sub(r",\n\s*", ", ", m[1]) + "]", text)


def write_json(path, d: dict) -> None:
    """Write `d` to `path` atomically, laid out by `dumps`."""
    fileio.write_text(path, dumps(d) + "\n")


def read_json(path, kind: str | None = None) -> dict:
    """Read and check a tokenizer file; errors name the file."""
    # expect=None: check_header explains what a non-object file probably is
    d = fileio.read_json(path, what="tokenizer file", expect=None)
    check_header(d, str(path), kind)
    return d


class SavesAsJson:
    """`save(path)` / `load(path)` for a class with `to_dict()` / `from_dict(d)`."""

    def save(self, path) -> None:
        """Write the tokenizer to `path` as JSON (see `fileformat`)."""
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path, **options):
        """Read a tokenizer written by `save` (`options` go to `from_dict`)."""
        return cls.from_dict(read_json(path), source=str(path), **file_options(path), **options)


def file_options(path) -> dict:
    """What the size of the tokenizer file at `path` allows it to build: its tokens hold
    at most `tinylm.limits.vocab_bytes_allowed(size)` bytes together."""
    return {"max_vocab_bytes": limits.vocab_bytes_allowed(Path(path).stat().st_size)}
