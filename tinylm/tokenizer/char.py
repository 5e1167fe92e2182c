"""`CharTokenizer`: one token per character, the classic char-level Shakespeare baseline.

The vocabulary is the sorted set of characters of the training text, so ids follow
code-point order: in Tiny Shakespeare "\\n" is 0 and " " is 1. A character that was not
in the training text cannot be encoded (a byte-level BPE has no such gap).
"""

from __future__ import annotations

from tinylm.fileio import FileFormatError, shorten

from .fileformat import SavesAsJson, check_header, header


class CharTokenizer(SavesAsJson):
    """Character-level tokenizer.

    >>> tok = CharTokenizer.train("hello")
    >>> tok.chars
    ['e', 'h', 'l', 'o']
    >>> tok.encode("hole")
    [1, 3, 2, 0]
    >>> tok.decode([1, 0, 2, 2, 3])
    'hello'
    """

    def __init__(self, chars):
        self.chars = list(chars)
        if not all(isinstance(c, str) and len(c) == 1 for c in self.chars):
            raise ValueError("CharTokenizer's vocabulary must be single characters")
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        self.itos = dict(enumerate(self.chars))
        if len(self.stoi) != len(self.chars):
            raise ValueError("CharTokenizer's vocabulary has a character twice")

    @classmethod
    def train(cls, text: str) -> CharTokenizer:
        """The sorted set of characters of `text` becomes the vocabulary."""
        if not isinstance(text, str) or not text:
            raise ValueError("CharTokenizer.train needs a non-empty str")
        return cls(sorted(set(text)))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        try:
            return [self.stoi[c] for c in text]
        except KeyError as exc:
            char = exc.args[0]
            raise ValueError(
                f"character {char!r} (U+{ord(char):04X}) at index {text.index(char)} is not "
                "in this CharTokenizer's vocabulary (it was not in the training text)"
            ) from None

    def decode(self, ids) -> str:
        try:
            return "".join([self.itos[i] for i in ids])
        except KeyError as exc:
            raise ValueError(
                f"unknown token id {exc.args[0]}: this tokenizer's ids are 0..{self.vocab_size - 1}"
            ) from None

    def decode_bytes(self, ids) -> bytes:
        """The UTF-8 bytes of `decode(ids)` (the same method as BPETokenizer's)."""
        return self.decode(ids).encode("utf-8")

    def to_dict(self) -> dict:
        d = header("char")
        d["chars"] = "".join(self.chars)
        return d

    @classmethod
    def from_dict(cls, d: dict, source: str = "tokenizer data", *,
                  trust_pattern: bool | None = None,
                  max_vocab_bytes: int | None = None) -> CharTokenizer:
        """The inverse of `to_dict`; bad data gives a FileFormatError naming `source`.
        (The options are BPETokenizer's, accepted so that any tokenizer loads alike: a
        char tokenizer has no pattern, and its vocabulary is the file's own text.)"""
        check_header(d, source, "char")
        chars = d.get("chars")
        if not isinstance(chars, str):
            raise FileFormatError(f'{source}: damaged char tokenizer data ("chars" must be a '
                                  f"string, got {shorten(chars)})")
        try:
            return cls(chars)
        except ValueError as exc:
            raise FileFormatError(f"{source}: damaged char tokenizer data ({exc})") from None

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size})"
