"""Tokenizers: byte-level BPE (as GPT-2 and GPT-4) and a character-level baseline.

    from tinylm.tokenizer import BPETokenizer, CharTokenizer, load
    tok = BPETokenizer.train(text, vocab_size=4096, special_tokens=["<|endoftext|>"])
    tok.save("tokenizer.json")
    tok = load("tokenizer.json")          # any tinylm tokenizer file (BPE or char)

Where to look (read in this order):
  bpe.py            the steps as small pure functions: split, get_stats, merge, encode_chunk
  train.py          learning merges: the simple reference trainer and the fast incremental one
  bpe_tokenizer.py  BPETokenizer: encode (with a cache), special tokens, decode, files
  gpt2_files.py     GPT-2's vocab.json / merges.txt and its byte-to-unicode table
  char.py           CharTokenizer
  fileformat.py     the versioned JSON file both tokenizers use
  visualize.py      show_tokens: coloured token boundaries for a terminal or a notebook
  cli.py            `tinylm tokenizer train|encode|decode`
The full story is in docs/tokenizer.md.
"""

from tinylm.fileio import FileFormatError, shorten

from .bpe import GPT2_SPLIT_PATTERN, GPT4_SPLIT_PATTERN, encode_chunk, get_stats, merge
from .bpe_tokenizer import BPETokenizer
from .char import CharTokenizer
from .fileformat import check_header, file_options, read_json
from .gpt2_files import bytes_to_unicode
from .visualize import TokenView, show_tokens, token_pieces

TOKENIZER_TYPES = {"bpe": BPETokenizer, "char": CharTokenizer}


def from_dict(d: dict, source: str = "tokenizer data", **options):
    """A tokenizer of the type named in `d["type"]` (what `to_dict()` returns).
    `options` (trust_pattern, max_vocab_bytes): see `BPETokenizer.from_dict`."""
    check_header(d, source)
    kind = d.get("type")
    if not isinstance(kind, str) or kind not in TOKENIZER_TYPES:
        raise FileFormatError(f"{source}: unknown tokenizer type {shorten(kind)} "
                              f"(known: {', '.join(TOKENIZER_TYPES)})")
    return TOKENIZER_TYPES[kind].from_dict(d, source, **options)


def load(path, *, trust_pattern: bool | None = None):
    """Read any tinylm tokenizer file (BPE or char). A BPE file's split pattern must be
    GPT-2's or GPT-4's unless `trust_pattern` (see `BPETokenizer.from_dict`)."""
    return from_dict(read_json(path), str(path), trust_pattern=trust_pattern,
                     **file_options(path))


__all__ = [
    "GPT2_SPLIT_PATTERN",
    "GPT4_SPLIT_PATTERN",
    "BPETokenizer",
    "CharTokenizer",
    "TokenView",
    "bytes_to_unicode",
    "encode_chunk",
    "from_dict",
    "get_stats",
    "load",
    "merge",
    "show_tokens",
    "token_pieces",
]
