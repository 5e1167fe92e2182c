"""`BPETokenizer`: byte-level BPE with special tokens, as GPT-2 and GPT-4 use it.

    tok = BPETokenizer.train(text, vocab_size=4096, special_tokens=["<|endoftext|>"])
    ids = tok.encode("To be, or not to be")       # list of ints
    tok.decode(ids)                               # back to the text
    tok.save("tokenizer.json"); BPETokenizer.load("tokenizer.json")

The steps are the pure functions of `bpe.py` (split, bytes, merges); training is in
`train.py`; this class holds the learned merges and adds what real use needs:
a cache of encoded chunks, special tokens, decoding and the file format.
"""

from __future__ import annotations

import os

import regex

from tinylm import limits
from tinylm.fileio import FileFormatError, shorten

from . import gpt2_files
from .bpe import (
    SPLIT_PATTERNS,
    build_vocab,
    check_token_lengths,
    encode_chunk,
    pattern_name,
    resolve_pattern,
    split_text,
)
from .fileformat import SavesAsJson, check_header, header
from .train import TRAINERS, count_chunks

# Most chunks repeat (" the", ","), so each distinct chunk is encoded once and cached.
# When the cache is full it is emptied: frequent chunks come back at once.
CACHE_SIZE = 100_000

# A split pattern read from a file runs only if it is GPT-2's or GPT-4's, or if the user
# says it is trusted: `load(path, trust_pattern=True)`, or this variable set to 1.
TRUST_PATTERN_ENV = "TINYLM_TRUST_PATTERN"


class BPETokenizer(SavesAsJson):
    """Byte-level BPE tokenizer.

    Attributes (treat them as read-only; build a new tokenizer to change merges):
      merges          {(a, b): new_id} in rank order (the order they were learned)
      vocab           {id: bytes} for the bytes and the merges
      special_tokens  {text: id}, e.g. {"<|endoftext|>": 4096}
      pattern         the pre-split regex, or None for no pre-split
      byte_ids        byte value -> id (0..255 for trained tokenizers; GPT-2's files differ)

    >>> tok = BPETokenizer.train("low lower lowest " * 20, vocab_size=262, pattern="gpt2")
    >>> [tok.vocab[i] for i in tok.merges.values()]
    [b'lo', b'low', b' low', b' lowe', b'st', b' lower']
    >>> [tok.decode([i]) for i in tok.encode("lowest lower")]
    ['low', 'e', 'st', ' lower']
    """

    def __init__(self, merges=None, pattern="gpt4", special_tokens=None, byte_ids=range(256)):
        self.pattern = resolve_pattern(pattern)
        self.merges = dict(merges or {})
        self.byte_ids = list(byte_ids)
        self.vocab = build_vocab(self.merges, self.byte_ids)
        self.special_tokens = {}
        self._id_to_bytes = dict(self.vocab)  # vocab + special tokens, for decoding
        self._bytes_to_id = {token: idx for idx, token in self.vocab.items()}
        self._cache = {}  # chunk text -> its ids
        self.register_special_tokens(special_tokens or {})

    # -- training -------------------------------------------------------------------

    @classmethod
    def train(cls, text, vocab_size, pattern="gpt4", special_tokens=None, *,
              trainer="fast", progress=None) -> BPETokenizer:
        """Learn `vocab_size - 256` merges from `text` and return a new tokenizer.

        `pattern`: "gpt4", "gpt2", a regex, or None (the whole text is one chunk: fine
        for small texts, slow for large ones). `special_tokens` (a list of strings) get
        the ids after the merges; their text is cut out of the training text.
        `trainer`: "fast" (incremental) or "simple" (reference); both learn the same
        merges (`train.py`, tie-break included). `progress`: optional wrapper of the
        merge iterator called as `progress(iterator, total=n)`, e.g. `tqdm.tqdm`.
        Stops early, with a smaller vocabulary, if the text runs out of pairs.
        """
        if not isinstance(text, str):
            raise TypeError(f"train expects the text as str, got {type(text).__name__}")
        if not isinstance(vocab_size, int) or vocab_size < 256:
            raise ValueError(f"vocab_size must be an int >= 256 (the bytes), got {vocab_size!r}")
        if trainer not in TRAINERS:
            raise ValueError(f"trainer must be one of {sorted(TRAINERS)}, got {trainer!r}")
        pattern = resolve_pattern(pattern)
        if isinstance(special_tokens, str):
            special_tokens = [special_tokens]
        special_tokens = list(special_tokens or [])
        chunk_counts = count_chunks(text, pattern, special_tokens)
        try:
            chunks = [list(chunk.encode("utf-8")) for chunk in chunk_counts]
        except UnicodeEncodeError:
            raise unencodable_error(text) from None
        num_merges = vocab_size - 256
        steps = TRAINERS[trainer](chunks, list(chunk_counts.values()), num_merges)
        if progress is not None:
            steps = progress(steps, total=num_merges)
        merges = {pair: new_id for pair, new_id, _count in steps}
        return cls(merges, pattern, special_tokens)

    # -- special tokens -------------------------------------------------------------

    def register_special_tokens(self, tokens) -> None:
        """Add special tokens: a list of strings gets the next free ids, a dict
        `{text: id}` sets the ids. A special token is always one id; `encode` only
        produces it when allowed to (see `encode`).

        >>> tok = BPETokenizer()
        >>> tok.register_special_tokens(["<|endoftext|>"])
        >>> tok.special_tokens
        {'<|endoftext|>': 256}
        """
        if isinstance(tokens, str):
            tokens = [tokens]
        if not isinstance(tokens, dict):
            first = self.vocab_size
            tokens = {text: first + i for i, text in enumerate(tokens)}
        for text, idx in tokens.items():
            if not isinstance(text, str) or not text:
                raise ValueError(f"a special token must be a non-empty string, got {text!r}")
            if text in self.special_tokens:
                raise ValueError(f"special token {text!r} is already registered")
            if (not isinstance(idx, int) or not 0 <= idx < limits.MAX_VOCAB
                    or idx in self._id_to_bytes):
                raise ValueError(f"id {idx!r} for special token {text!r} is invalid or taken")
            self.special_tokens[text] = idx
            self._id_to_bytes[idx] = text.encode("utf-8")

    @property
    def vocab_size(self) -> int:
        """One more than the largest id: the rows an embedding table needs."""
        return max(self._id_to_bytes) + 1

    # -- encoding -------------------------------------------------------------------

    def encode_ordinary(self, text: str) -> list[int]:
        """Encode `text`, treating special-token text like any other text.

        >>> BPETokenizer().encode_ordinary("hé!")    # no merges: the UTF-8 bytes
        [104, 195, 169, 33]
        """
        _check_text(text)
        try:
            return self._encode_ordinary(text)
        except UnicodeEncodeError:
            raise unencodable_error(text) from None

    def _encode_ordinary(self, text: str) -> list[int]:
        ids = []
        cache = self._cache
        for chunk in split_text(text, self.pattern):
            chunk_ids = cache.get(chunk)
            if chunk_ids is None:
                chunk_ids = self._encode_new_chunk(chunk)
            ids.extend(chunk_ids)
        return ids

    def _encode_new_chunk(self, chunk: str) -> list[int]:
        data = chunk.encode("utf-8")
        # Shortcut (tiktoken's too): a chunk that is itself a token, as most words are
        # once the vocabulary is large, needs no merging. Merging its bytes would give
        # the same: training built that token from these bytes by the same merges.
        idx = self._bytes_to_id.get(data)
        if idx is not None:
            ids = [idx]
        else:
            ids = encode_chunk([self.byte_ids[b] for b in data], self.merges)
        if len(self._cache) >= CACHE_SIZE:
            self._cache.clear()
        self._cache[chunk] = ids
        return ids

    def encode(self, text: str, allowed_special="none_raise") -> list[int]:
        """Encode `text`; what happens to special-token text follows tiktoken:

        "none_raise" (default)  special-token text in `text` is an error, so a document
                                can never inject an <|endoftext|> by accident
        "all"                   every special token's text becomes its id
        "none"                  special-token text is encoded as ordinary text
        a set of tokens         those become ids; any other special text is an error

        >>> tok = BPETokenizer(special_tokens={"<|eot|>": 256})
        >>> tok.encode("hi<|eot|>", allowed_special="all")
        [104, 105, 256]
        >>> tok.encode("hi<|eot|>", allowed_special="none")[:4]
        [104, 105, 60, 124]
        """
        _check_text(text)
        allowed = self._allowed_special(allowed_special)
        if allowed_special != "none":
            for special in sorted(self.special_tokens.keys() - allowed):
                if special in text:
                    raise ValueError(
                        f"the text contains the special token {special!r}; pass "
                        f"allowed_special={{{special!r}}} or 'all' to encode it as its id, "
                        "or 'none' to encode it as ordinary text"
                    )
        if not allowed:
            return self.encode_ordinary(text)
        # Split on the allowed special tokens (longest first, so one that contains
        # another wins); the capturing group keeps them: [text, special, text, ...].
        by_length = sorted(allowed, key=len, reverse=True)
        special_re = "(" + "|".join(regex.escape(s) for s in by_length) + ")"
        ids = []
        try:
            for i, part in enumerate(regex.split(special_re, text)):
                if i % 2:
                    ids.append(self.special_tokens[part])
                else:
                    ids.extend(self._encode_ordinary(part))
        except UnicodeEncodeError:
            raise unencodable_error(text) from None
        return ids

    def _allowed_special(self, allowed_special) -> set:
        if allowed_special == "all":
            return set(self.special_tokens)
        if isinstance(allowed_special, str):
            if allowed_special in ("none", "none_raise"):
                return set()
        elif isinstance(allowed_special, (set, frozenset, list, tuple)):
            unknown = set(allowed_special) - set(self.special_tokens)
            if unknown:
                raise ValueError(f"allowed_special names unknown special tokens: {sorted(unknown)}")
            return set(allowed_special)
        raise ValueError(
            "allowed_special must be 'none_raise', 'all', 'none' or a set of special tokens, "
            f"got {allowed_special!r}"
        )

    # -- decoding -------------------------------------------------------------------

    def decode_bytes(self, ids) -> bytes:
        """The exact bytes of `ids` (a token may hold part of a UTF-8 character).

        >>> BPETokenizer().decode_bytes([104, 195])
        b'h\\xc3'
        """
        try:
            return b"".join([self._id_to_bytes[idx] for idx in ids])
        except KeyError as exc:
            raise ValueError(
                f"unknown token id {exc.args[0]}: this tokenizer's ids are 0..{self.vocab_size - 1}"
            ) from None
        except TypeError:
            raise TypeError(f"token ids must be ints, got {ids!r}") from None

    def decode(self, ids) -> str:
        """The text of `ids`; bytes that are not valid UTF-8 become U+FFFD.

        >>> BPETokenizer().decode([104, 195])
        'h�'
        """
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    # -- files ----------------------------------------------------------------------

    def to_dict(self) -> dict:
        """The tokenizer as JSON-ready data (`save` writes it).

        Each merge is `[a, b, new_id, text]`; the text is for people reading the file
        (bytes that are not whole characters show as U+FFFD) and is ignored on load.
        `byte_ids` is written only when it is not the identity (GPT-2's files).
        """
        d = header("bpe")
        d["pattern"] = self.pattern
        d["special_tokens"] = self.special_tokens
        if self.byte_ids != list(range(256)):
            d["byte_ids"] = self.byte_ids
        d["merges"] = [
            [a, b, idx, self.vocab[idx].decode("utf-8", errors="replace")]
            for (a, b), idx in self.merges.items()
        ]
        return d

    @classmethod
    def from_dict(cls, d: dict, source: str = "tokenizer data", *,
                  trust_pattern: bool | None = None,
                  max_vocab_bytes: int = limits.MAX_VOCAB_BYTES) -> BPETokenizer:
        """The inverse of `to_dict`; bad data gives a FileFormatError naming `source`.

        A file may come from a stranger, so every field is checked before anything is
        built (ids in [0, tinylm.limits.MAX_VOCAB), at most MAX_MERGES merges, the
        vocabulary's bytes counted before they are made: at most `max_vocab_bytes`,
        which `load` derives from the file's size), and its split pattern runs
        only if it is GPT-2's or GPT-4's: any other regex could be written to
        backtrack for hours on an ordinary text. Pass `trust_pattern=True` (or set
        TINYLM_TRUST_PATTERN=1; None means "ask the environment") for a file whose
        pattern you wrote or checked yourself.
        """
        check_header(d, source, "bpe")
        merges = _read_merges(d.get("merges"), source)
        special_tokens = _read_special_tokens(d.get("special_tokens"), source)
        byte_ids = _read_byte_ids(d.get("byte_ids", list(range(256))), source)
        pattern = _read_pattern(d, source, trust_pattern)
        try:
            check_token_lengths(merges, byte_ids, max_vocab_bytes)  # before any token is built
            return cls(merges, pattern, special_tokens, byte_ids)
        except ValueError as exc:
            raise FileFormatError(f"{source}: damaged BPE tokenizer data ({exc})") from None

    @classmethod
    def from_gpt2(cls, vocab_json, merges_txt, pattern="gpt2") -> BPETokenizer:
        """Read GPT-2-format files (`vocab.json`, `merges.txt`), as written by OpenAI's
        GPT-2 or Hugging Face `tokenizers`; ids are those of the files. Vocabulary
        entries that are neither bytes nor merges (e.g. "<|endoftext|>") become
        special tokens. See `gpt2_files.py`."""
        merges, byte_ids, special_tokens = gpt2_files.read_gpt2_files(vocab_json, merges_txt)
        try:
            return cls(merges, pattern, special_tokens, byte_ids)
        except ValueError as exc:
            raise FileFormatError(f"{merges_txt} (with {vocab_json}): not a consistent "
                                  f"byte-level BPE ({exc})") from None

    def __repr__(self) -> str:
        return (f"BPETokenizer(vocab_size={self.vocab_size}, merges={len(self.merges)}, "
                f"special_tokens={len(self.special_tokens)}, pattern={pattern_name(self.pattern)})")


# -- reading a file's fields ------------------------------------------------------------


def _is_id(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and 0 <= x < limits.MAX_VOCAB


def _read_merges(merges, source: str) -> dict:
    """{(a, b): new_id} from the file's [a, b, new_id, text] lists (text is ignored)."""
    if not isinstance(merges, list):
        raise FileFormatError(f'{source}: damaged BPE tokenizer data ("merges" must be a '
                              f"list, got {shorten(merges)})")
    if len(merges) > limits.MAX_MERGES:
        raise FileFormatError(f"{source}: {len(merges):,} merges, above the limit of "
                              f"{limits.MAX_MERGES:,}")
    pairs = {}
    for rank, m in enumerate(merges):
        if not isinstance(m, list) or len(m) not in (3, 4) or not all(map(_is_id, m[:3])):
            raise FileFormatError(f"{source}: damaged BPE tokenizer data (merge #{rank} must be "
                                  f"[a, b, new_id, text] with ids in [0, "
                                  f"{limits.MAX_VOCAB:,}), got {shorten(m)})")
        if (m[0], m[1]) in pairs:
            raise FileFormatError(f"{source}: merge #{rank} repeats the pair ({m[0]}, {m[1]})")
        pairs[m[0], m[1]] = m[2]
    return pairs


def _read_special_tokens(special, source: str) -> dict:
    if not isinstance(special, dict) or not all(map(_is_id, special.values())):
        raise FileFormatError(f'{source}: damaged BPE tokenizer data ("special_tokens" must '
                              f"map text to ids in [0, {limits.MAX_VOCAB:,}), got "
                              f"{shorten(special)})")
    return special


def _read_byte_ids(byte_ids, source: str) -> list:
    if not isinstance(byte_ids, list) or len(byte_ids) != 256 or not all(map(_is_id, byte_ids)):
        raise FileFormatError(f'{source}: damaged BPE tokenizer data ("byte_ids" must be a '
                              f"list of 256 ids, got {shorten(byte_ids)})")
    return byte_ids


def _read_pattern(d: dict, source: str, trust_pattern: bool | None):
    """The split pattern of a file: None, a known one, or a trusted one (see from_dict)."""
    if "pattern" not in d:
        raise FileFormatError(f'{source}: damaged BPE tokenizer data (no "pattern")')
    pattern = d["pattern"]
    if pattern is None or pattern in SPLIT_PATTERNS.values():
        return pattern
    if not isinstance(pattern, str):
        raise FileFormatError(f'{source}: damaged BPE tokenizer data ("pattern" must be a '
                              f"regex or null, got {shorten(pattern)})")
    if trust_pattern is None:
        trust_pattern = os.environ.get(TRUST_PATTERN_ENV) == "1"
    if not trust_pattern:
        raise FileFormatError(
            f"{source}: its split pattern {shorten(pattern)} is neither GPT-2's nor GPT-4's. "
            "A regex from a file can be made to backtrack for hours on ordinary text, so "
            "tinylm runs only those two unless told to trust it: "
            f"BPETokenizer.load(path, trust_pattern=True), or {TRUST_PATTERN_ENV}=1")
    try:
        return resolve_pattern(pattern)
    except ValueError as exc:
        raise FileFormatError(f"{source}: {exc}") from None


def _check_text(text) -> None:
    if not isinstance(text, str):
        raise TypeError(f"encode expects a str, got {type(text).__name__}")


def unencodable_error(text: str) -> ValueError:
    """The error for text with no UTF-8 encoding: it holds a lone surrogate.

    >>> print(unencodable_error("ok\\ud800"))  # doctest: +ELLIPSIS
    the text has a lone surrogate U+D800 at index 2: not a valid character, ...
    """
    index, char = next((i, c) for i, c in enumerate(text) if 0xD800 <= ord(c) <= 0xDFFF)
    return ValueError(
        f"the text has a lone surrogate U+{ord(char):04X} at index {index}: not a valid "
        "character, so it has no UTF-8 encoding (text read with errors='surrogateescape' "
        "can contain these)"
    )
