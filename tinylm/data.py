"""Training data: text file -> token ids on disk -> random (x, y) windows.

    text file (UTF-8)  --tokenizer-->  tokens.npy (uint16/uint32, memory-mapped)
    tokens[:90%] = train, tokens[90%:] = validation           (nanoGPT's split)
    x = tokens[i : i+T],  y = tokens[i+1 : i+T+1]  for B random starts i

The token ids are written once, next to the run, as a plain `.npy` file with a
small JSON note saying which text and which tokenizer made them (`tokens.json`),
so a second run or a resumed one skips tokenization. The file is opened with
`np.load(..., mmap_mode="r")`: only the windows a batch needs are read from
disk, so a corpus larger than memory trains fine. The text is likewise read and
tokenized in blocks of a few megabytes, never all at once (see `text_blocks`).

    from tinylm.data import prepare, Batches
    data = prepare(None, "char", "runs/demo")          # None: bundled Tiny Shakespeare
    batches = Batches(data.train, context_length=64, batch_size=12, seed=1337)
    x, y = batches.next()                               # (12, 64) int64 each
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import regex

from tinylm.fileio import atomic_write, read_json, write_json
from tinylm.tokenizer import BPETokenizer, CharTokenizer
from tinylm.tokenizer import load as load_tokenizer
from tinylm.tokenizer.bpe import SPLIT_PATTERNS

TOKENS_FORMAT = "tinylm-tokens"
TOKENS_VERSION = 1
BLOCK_BYTES = 4 << 20  # read and tokenize the text 4 MiB at a time

# A place where the text may be cut into blocks without changing its tokens: a newline
# between two printable ASCII characters ("x\nN"). Every built-in BPE pre-split pattern
# (GPT-2's and GPT-4's) ends one chunk at that newline and starts the next after it, and
# merges never cross chunks, so encoding the blocks one by one gives the same ids as
# encoding the whole text. (Not so for a run of whitespace before the newline: GPT-2's
# pattern splits "  \n\n" differently at the very end of a text than in its middle.)
_SAFE_CUT = regex.compile(rb"[!-~]\n(?=[!-~])")


def bundled_text_path() -> Path:
    """The bundled Tiny Shakespeare (Karpathy's char-rnn corpus, 1.1 MB), the default data."""
    return Path(__file__).resolve().parent / "data" / "tinyshakespeare.txt"


def resolve_data_path(path) -> Path:
    """`path` as a Path, or the bundled text for None; a missing file is an error."""
    path = bundled_text_path() if path is None else Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    return path


# ---------------------------------------------------------------------------
# Reading text
# ---------------------------------------------------------------------------


def _decode(path: Path, raw: bytes, offset: int) -> str:
    """Strict UTF-8 decoding; an error names the file and the byte offset in it, and
    quotes none of its bytes (the file may not be the user's to show: see resume.py)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"{path} is not UTF-8 text: {exc.reason} at byte offset {offset + exc.start}; "
            "convert it to UTF-8 first"
        ) from None


def text_blocks(path, block_bytes: int = BLOCK_BYTES, cut=None) -> Iterator[str]:
    """Yield the text of a UTF-8 file in blocks of about `block_bytes` bytes.

    Each block ends at a newline, so a multi-byte character is never split and a
    decoding error can name its exact byte offset. With `cut` (a compiled bytes
    regex) a block ends only right after a match of it, which is how BPE encoding
    is kept identical to encoding the whole text (`_SAFE_CUT`); `cut=False` makes
    the whole file one block.
    """
    path = Path(path)
    offset = 0  # byte offset of `pending` in the file
    pending = b""
    with open(path, "rb") as f:
        while True:
            chunk = f.read(block_bytes)
            pending += chunk
            if not chunk:  # end of file: the rest is the last block
                if pending:
                    yield _decode(path, pending, offset)
                return
            end = _last_cut(pending, cut)
            if end > 0:
                yield _decode(path, pending[:end], offset)
                offset += end
                pending = pending[end:]


def _last_cut(raw: bytes, cut) -> int:
    """Length of the longest prefix of `raw` that ends at a permitted cut (0 if none)."""
    if cut is None:
        return raw.rfind(b"\n") + 1
    if cut is False:  # no safe cut known: the whole file is one block
        return 0
    # search only the last part first: cuts are frequent in real text
    for start in (max(0, len(raw) - 65536), 0):
        ends = [m.start() + 2 for m in cut.finditer(raw, start)]
        if ends:
            return ends[-1]
    return 0


def read_text(path, max_chars: int | None = None) -> str:
    """The text of a UTF-8 file (only its first `max_chars` characters, if given)."""
    parts, n = [], 0
    for block in text_blocks(path):
        parts.append(block)
        n += len(block)
        if max_chars is not None and n >= max_chars:
            break
    text = "".join(parts)
    return text if max_chars is None else text[:max_chars]


# ---------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------


def make_tokenizer(spec: str, data_path, *, vocab_size: int = 512,
                   train_chars: int = 2_000_000):
    """The tokenizer a run uses.

    spec "char": a CharTokenizer over every character of the file (one pass over it).
    spec "bpe":  a byte-level BPETokenizer (GPT-4 pre-split) with `vocab_size` ids,
                 trained on the first `train_chars` characters (a second or two).
    otherwise:   the path of a tokenizer file written by `tinylm tokenizer train`.
    """
    if spec == "char":
        chars: set[str] = set()
        for block in text_blocks(data_path):
            chars.update(block)
        if not chars:
            raise ValueError(f"{data_path} is empty")
        return CharTokenizer(sorted(chars))
    if spec == "bpe":
        text = read_text(data_path, max_chars=train_chars)
        if not text:
            raise ValueError(f"{data_path} is empty")
        return BPETokenizer.train(text, vocab_size, pattern="gpt4")
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(
            f"tokenizer must be 'char', 'bpe' or a tokenizer file; no such file: {spec}")
    return load_tokenizer(path)


def tokenizer_fingerprint(tokenizer) -> str:
    """A SHA-256 of the tokenizer's saved form: equal fingerprints, equal ids."""
    blob = json.dumps(tokenizer.to_dict(), sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def _encoder(tokenizer):
    """(encode function, cut rule) for streaming a file through `tokenizer`."""
    if isinstance(tokenizer, BPETokenizer):
        # Special tokens in the data (e.g. "<|endoftext|>" between documents) are meant.
        def encode(text):
            return tokenizer.encode(text, allowed_special="all")

        streams = tokenizer.pattern in SPLIT_PATTERNS.values() and not any(
            "\n" in s for s in tokenizer.special_tokens)
        # Another pattern (or none) has no known safe cut: the file is one block.
        return encode, (_SAFE_CUT if streams else False)
    return tokenizer.encode, None  # char-level: any newline is a safe cut


# ---------------------------------------------------------------------------
# The token file
# ---------------------------------------------------------------------------


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def token_dtype(vocab_size: int):
    """uint16 when every id fits (half the disk of uint32), else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def encode_file(data_path, tokenizer, out_path, *, block_bytes: int = BLOCK_BYTES) -> int:
    """Tokenize a text file into `out_path` (.npy), block by block; returns the count.

    The ids go to a raw temporary file first (their number, which the .npy header
    holds, is unknown until the end), then, after that header, into the .npy,
    which is written atomically (`tinylm.fileio.atomic_write`).
    """
    data_path, out_path = Path(data_path), Path(out_path)
    dtype = token_dtype(tokenizer.vocab_size)
    encode, cut = _encoder(tokenizer)
    raw_path = out_path.with_name(out_path.name + ".raw.tmp")
    n = 0
    try:
        with open(raw_path, "wb") as raw:
            offset = 0
            for block in text_blocks(data_path, block_bytes, cut):
                try:
                    ids = encode(block)
                except ValueError as exc:
                    raise ValueError(
                        f"{data_path}: cannot tokenize the block at byte offset {offset}: {exc}"
                    ) from None
                # write(), not tofile(): on a full disk it raises with the OS's reason
                raw.write(np.asarray(ids, dtype=dtype).tobytes())
                n += len(ids)
                offset += len(block.encode("utf-8"))
        with atomic_write(out_path) as out, open(raw_path, "rb") as raw:
            _write_npy_header(out, dtype, n)
            shutil.copyfileobj(raw, out)  # the raw ids are the .npy's data, byte for byte
    except OSError as exc:  # a failed write() says "No space left on device", not where
        if exc.filename is None:
            exc.filename = str(out_path)
        raise
    finally:
        raw_path.unlink(missing_ok=True)
    return n


def _write_npy_header(f, dtype: np.dtype, n: int) -> None:
    """The header of a .npy holding a (n,) array of `dtype`; the raw data follows it
    (C order, this machine's byte order, as `tofile` wrote it)."""
    np.lib.format.write_array_header_1_0(
        f, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
            "shape": (n,)})


@dataclass
class TokenData:
    """Token ids of a text file and its 90/10 train/validation split (memory-mapped)."""

    tokens: np.ndarray  # (N,) uint16/uint32, a read-only memmap of tokens.npy
    train: np.ndarray  # tokens[:n_train]
    val: np.ndarray  # tokens[n_train:]
    tokenizer: object
    source: Path  # the text file
    source_sha256: str
    cached: bool  # True when tokens.npy was reused rather than written
    source_bytes: int | None = None  # the text file's size

    def describe(self) -> dict:
        """The record trainer.json keeps: the text's fingerprint (size and SHA-256), by
        which a resumed run checks the file its saved config names (training/resume.py)."""
        return {"source": str(self.source), "sha256": self.source_sha256,
                "bytes": self.source_bytes, "tokens": int(len(self.tokens)),
                "train_tokens": int(len(self.train)), "val_tokens": int(len(self.val))}


def prepare(data, tokenizer, cache_dir, *, vocab_size: int = 512,
            train_chars: int = 2_000_000, val_fraction: float = 0.1,
            min_tokens: int = 2, report=None) -> TokenData:
    """Tokenize `data` (a path; None = bundled Tiny Shakespeare) into `cache_dir`.

    `tokenizer` is a tokenizer object (e.g. from a checkpoint being resumed) or a
    spec for `make_tokenizer`. `cache_dir/tokens.npy` is reused when its note
    (`tokens.json`) names the same text (by SHA-256) and the same tokenizer.
    Each split must hold at least `min_tokens` tokens (context_length + 1 for
    training). `report(message)` is told what is happening.
    """
    report = report or (lambda message: None)
    path = resolve_data_path(data)
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if not isinstance(tokenizer, (str, os.PathLike)):
        tok = tokenizer
    else:
        tokenizer = str(tokenizer)
        if tokenizer == "bpe":
            report(f"training a BPE tokenizer ({vocab_size} ids) on {path.name}")
        tok = make_tokenizer(tokenizer, path, vocab_size=vocab_size, train_chars=train_chars)

    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    npy, note_path = cache_dir / "tokens.npy", cache_dir / "tokens.json"
    note = {
        "format": TOKENS_FORMAT, "version": TOKENS_VERSION,
        "source": str(path), "source_bytes": path.stat().st_size,
        "source_sha256": file_sha256(path), "tokenizer_sha256": tokenizer_fingerprint(tok),
        "dtype": token_dtype(tok.vocab_size).name,
    }
    cached = _cache_matches(npy, note_path, note, tok.vocab_size)
    if not cached:
        report(f"tokenizing {path} with {tok!r}")
        note["tokens"] = encode_file(path, tok, npy)
        write_json(note_path, note)
    tokens = np.load(npy, mmap_mode="r")  # (N,) read from disk on demand
    n_train = int(len(tokens) * (1.0 - val_fraction))
    train, val = tokens[:n_train], tokens[n_train:]
    if min(len(train), len(val)) < min_tokens:
        raise ValueError(
            f"{path}: too little text: {len(tokens)} tokens give splits of {len(train)} "
            f"(train) and {len(val)} (validation) tokens, and each needs at least "
            f"{min_tokens} (context_length + 1); use more text or a smaller context_length"
        )
    return TokenData(tokens, train, val, tok, path, note["source_sha256"], cached,
                     note["source_bytes"])


def _cache_matches(npy: Path, note_path: Path, note: dict, vocab_size: int) -> bool:
    """True when tokens.npy exists, its note matches `note` (text, tokenizer, dtype) and
    every id is one of the tokenizer's (a run directory may come from elsewhere: an id
    out of range would fail deep in the model, as an IndexError)."""
    if not (npy.is_file() and note_path.is_file()):
        return False
    try:
        old = read_json(note_path, what="token cache note")
        tokens = np.load(npy, mmap_mode="r")
    except (OSError, ValueError):
        return False  # a damaged cache is simply rebuilt
    same = all(old.get(k) == v for k, v in note.items() if k != "source")
    if not (same and tokens.ndim == 1 and len(tokens) == old.get("tokens")):
        return False
    return len(tokens) == 0 or int(tokens.max()) < vocab_size  # one pass over the file


# ---------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------


def get_batch(tokens: np.ndarray, context_length: int, batch_size: int,
              rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """`batch_size` random windows of `context_length + 1` tokens, as nanoGPT's get_batch.

    Returns x (B, T) and y (B, T) int64 on the host, y being x shifted by one:
    the model at position t predicts token t+1.
    """
    T = context_length
    starts = rng.integers(0, len(tokens) - T, size=batch_size)  # (B,) in [0, N-T-1]
    windows = tokens[starts[:, None] + np.arange(T + 1)]  # (B, T+1), read from the memmap
    windows = windows.astype(np.int64)
    return windows[:, :-1], windows[:, 1:]


class Batches:
    """An endless stream of random training windows from its own seeded generator.

    The generator's state is all there is to the "data position": `state_dict()`
    saves it (JSON-friendly) and `load_state_dict()` continues the same stream.
    """

    def __init__(self, tokens: np.ndarray, context_length: int, batch_size: int, seed=0):
        if len(tokens) < context_length + 1:
            raise ValueError(f"need at least context_length + 1 = {context_length + 1} tokens, "
                             f"got {len(tokens)}")
        self.tokens = tokens
        self.context_length = context_length
        self.batch_size = batch_size
        self.rng = np.random.default_rng(seed)

    def next(self) -> tuple[np.ndarray, np.ndarray]:
        return get_batch(self.tokens, self.context_length, self.batch_size, self.rng)

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]
