"""GPT-2's tokenizer files: `vocab.json` and `merges.txt`.

GPT-2 (and Hugging Face `tokenizers` when it saves a byte-level BPE) writes tokens as
text, not bytes: each byte is shown as one printable character (`bytes_to_unicode`),
so the space byte is "Ġ" and " the" is written "Ġthe".

    vocab.json   {"!": 0, "\\"": 1, ..., "Ġthe": 262, ..., "<|endoftext|>": 50256}
    merges.txt   "#version: 0.2", then one merge per line in rank order: "Ġ t", "h e", ...

`read_gpt2_files` turns them into what `BPETokenizer` holds: merges over ids, the id
of each byte (GPT-2's ids 0-255 are *not* the byte values), and the special tokens.
"""

from __future__ import annotations

from pathlib import Path

from tinylm import limits
from tinylm.fileio import FileFormatError, read_json, read_text


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's table from each byte value to a printable character.

    Printable Latin-1 bytes stand for themselves; the others (control characters,
    space, ...) are moved to the characters from U+0100 on, in byte order.

    >>> table = bytes_to_unicode()
    >>> table[ord("a")], table[ord(" ")], table[ord("\\n")], len(set(table.values()))
    ('a', 'Ġ', 'Ċ', 256)
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    n = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + n)
            n += 1
    return dict(sorted(table.items()))


def read_gpt2_files(vocab_json, merges_txt) -> tuple[dict, list[int], dict]:
    """Read GPT-2-format files -> (merges {(a, b): id}, byte_ids, special_tokens).

    Entries of vocab.json that are neither single bytes nor the result of a merge
    (GPT-2 has one: "<|endoftext|>") are the special tokens, named by their text.
    """
    vocab_json, merges_txt = Path(vocab_json), Path(merges_txt)
    for path in (vocab_json, merges_txt):
        if not path.is_file():
            raise FileNotFoundError(f"GPT-2 tokenizer file not found: {path}")
    vocab = read_json(vocab_json, what="GPT-2 vocabulary", expect=dict)
    if not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < limits.MAX_VOCAB
               for i in vocab.values()):
        raise FileFormatError(f"{vocab_json}: expected GPT-2's {{token text: id}} vocabulary "
                              f"(ids in [0, {limits.MAX_VOCAB:,}))")

    byte_to_char = bytes_to_unicode()
    missing = [b for b, c in byte_to_char.items() if c not in vocab]
    if missing:
        raise FileFormatError(f"{vocab_json}: no token for byte {missing[0]} "
                              f"({byte_to_char[missing[0]]!r}); not a byte-level BPE vocabulary")
    byte_ids = [vocab[byte_to_char[b]] for b in range(256)]

    merges = {}
    lines = read_text(merges_txt, what="GPT-2 merges file").splitlines()
    if len(lines) > limits.MAX_MERGES + 1:  # + the "#version" line
        raise FileFormatError(f"{merges_txt}: {len(lines):,} lines, above the limit of "
                              f"{limits.MAX_MERGES:,} merges")
    for line_no, line in enumerate(lines, start=1):
        if line.startswith("#version") or not line.strip():
            continue
        parts = line.split()  # token text never holds whitespace (see bytes_to_unicode)
        if len(parts) != 2 or parts[0] not in vocab or parts[1] not in vocab:
            raise FileFormatError(f"{merges_txt}, line {line_no}: {line[:100]!r} is not a merge "
                                  "of two tokens from vocab.json")
        a, b = parts
        if a + b not in vocab:
            raise FileFormatError(f"{merges_txt}, line {line_no}: the merged token "
                                  f"{(a + b)[:100]!r} is missing from vocab.json")
        merges[vocab[a], vocab[b]] = vocab[a + b]

    known = set(byte_ids) | set(merges.values())
    special_tokens = {text: idx for text, idx in vocab.items() if idx not in known}
    return merges, byte_ids, special_tokens
