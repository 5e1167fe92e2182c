"""The steps of byte-level BPE as small pure functions.

Text becomes token ids in three steps (read this file top to bottom):

1. **Pre-split** the text into chunks with a regex (`split_text`): words, numbers,
   punctuation runs and whitespace. Merges never cross a chunk boundary, so " dog",
   " dog." and " dog!" share the token for " dog".
2. **Bytes**: each chunk becomes its UTF-8 bytes. Ids 0-255 *are* the bytes, so any
   string (any language, emoji, control characters) has an encoding; nothing is unknown.
3. **Merges**: a learned merge `(a, b) -> c` replaces the adjacent ids `a, b` by `c`.
   `encode_chunk` applies the merges in the order they were learned (`merge` is where
   a merge is carried out; `encode_chunk` is its fast twin for encoding, tested against
   the simple `encode_chunk_simple`).

Training (which merges to learn) is in `train.py`; `bpe_tokenizer.py` puts it together.
"""

from __future__ import annotations

from itertools import pairwise

import regex

from tinylm import limits

# The pre-split patterns of tiktoken's r50k_base (GPT-2) and cl100k_base (GPT-4), verbatim.
# GPT-2 splits off " word", " 123", " ?!" and runs of whitespace, and keeps the English
# contractions 's 't 're 've 'm 'll 'd apart. GPT-4's also matches contractions in any
# case, lets a word take one leading non-letter ("(word"), splits numbers into runs of
# at most 3 digits, and keeps newlines with the punctuation or spaces before them.
# (`++` and `?+` are possessive quantifiers: the same matches, without backtracking.)
GPT2_SPLIT_PATTERN = (
    r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
)
GPT4_SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
    r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)
SPLIT_PATTERNS = {"gpt2": GPT2_SPLIT_PATTERN, "gpt4": GPT4_SPLIT_PATTERN}

INF = float("inf")


def resolve_pattern(pattern: str | None) -> str | None:
    """A pattern name ("gpt2", "gpt4"), a regex, or None (no pre-split) -> the regex.

    >>> resolve_pattern("gpt2") == GPT2_SPLIT_PATTERN
    True
    >>> resolve_pattern("[a-z]+|[^a-z]+")   # any regex: used as it is
    '[a-z]+|[^a-z]+'
    >>> resolve_pattern(None) is None
    True
    """
    if pattern is None:
        return None
    if not isinstance(pattern, str) or not pattern:
        raise ValueError(
            f"pattern must be 'gpt4', 'gpt2', a regex or None (no pre-split), got {pattern!r}"
        )
    pattern = SPLIT_PATTERNS.get(pattern, pattern)
    try:
        regex.compile(pattern)
    except regex.error as exc:
        raise ValueError(f"invalid split pattern {pattern!r}: {exc}") from None
    return pattern


def pattern_name(pattern: str | None) -> str:
    """The short name of a pattern, for messages.

    >>> pattern_name(GPT4_SPLIT_PATTERN), pattern_name(None), pattern_name("[a-z]+")
    ('gpt4', 'none', "'[a-z]+'")
    """
    if pattern is None:
        return "none"
    for name, known in SPLIT_PATTERNS.items():
        if pattern == known:
            return name
    return repr(pattern)


def split_text(text: str, pattern: str | None) -> list[str]:
    """Pre-split `text` into chunks; with no pattern the whole text is one chunk.

    Text that the pattern does not match is dropped, as in tiktoken; the GPT-2 and
    GPT-4 patterns match every character.

    >>> split_text("Hello world!! It's 2024.", GPT4_SPLIT_PATTERN)
    ['Hello', ' world', '!!', ' It', "'s", ' ', '202', '4', '.']
    >>> split_text("Hello world", None)
    ['Hello world']
    """
    if pattern is None:
        return [text] if text else []
    return regex.findall(pattern, text)


def get_stats(ids: list[int], counts: dict | None = None, weight: int = 1) -> dict:
    """Count the adjacent pairs in `ids`, adding `weight` per occurrence into `counts`.

    >>> get_stats([1, 2, 3, 1, 2])
    {(1, 2): 2, (2, 3): 1, (3, 1): 1}
    >>> get_stats([1, 2], {(1, 2): 5}, weight=3)   # a chunk that occurs 3 times
    {(1, 2): 8}
    """
    counts = {} if counts is None else counts
    for pair in pairwise(ids):
        counts[pair] = counts.get(pair, 0) + weight
    return counts


def merge(ids: list[int], pair: tuple[int, int], idx: int) -> list[int]:
    """Replace every occurrence of `pair` in `ids` by `idx`, scanning left to right.

    >>> merge([1, 2, 3, 1, 2], (1, 2), 4)
    [4, 3, 4]
    >>> merge([7, 7, 7], (7, 7), 8)   # overlapping: the leftmost pair wins
    [8, 7]
    """
    a, b = pair
    newids = []
    i, n = 0, len(ids)
    while i < n:
        if ids[i] == a and i + 1 < n and ids[i + 1] == b:
            newids.append(idx)
            i += 2
        else:
            newids.append(ids[i])
            i += 1
    return newids


def encode_chunk_simple(ids: list[int], merges: dict[tuple[int, int], int]) -> list[int]:
    """Apply `merges` to one chunk's ids, the earliest-learned merge first, until none applies.

    A merge's rank is its new id: merges learned earlier got smaller ids. So this replays,
    on one chunk, what training did to every chunk. This is the readable reference;
    `encode_chunk` gives the same ids faster.

    >>> merges = {(104, 105): 256, (256, 256): 257}    # "hi" -> 256, "hihi" -> 257
    >>> encode_chunk_simple(list(b"hihih"), merges)
    [257, 104]
    """
    while len(ids) >= 2:
        # the adjacent pair learned first; pairs that are not merges rank as infinity
        pair = min(pairwise(ids), key=lambda p: merges.get(p, INF))
        if pair not in merges:
            break  # nothing left to merge
        ids = merge(ids, pair, merges[pair])
    return ids


def encode_chunk(ids: list[int], merges: dict[tuple[int, int], int]) -> list[int]:
    """The same ids as `encode_chunk_simple`, without recounting every pair per step.

    `ranks[i]` is the rank of the pair `(ids[i], ids[i+1])` (INF if it is not a merge).
    Each step merges the lowest-ranked pair, the leftmost if it occurs twice, and then
    only the ranks of its two new neighbours change. (This is tiktoken's algorithm.)
    Merging one occurrence at a time gives what `merge` gives: the next step picks the
    same pair again at its next occurrence, because a pair that holds the new token was
    learned after it and so ranks after it.

    >>> merges = {(104, 105): 256, (256, 256): 257}    # "hi" -> 256, "hihi" -> 257
    >>> encode_chunk(list(b"hihih"), merges)            # ranks [256, inf, 256, inf]
    [257, 104]
    """
    ids = list(ids)
    ranks = [merges.get(pair, INF) for pair in pairwise(ids)]
    while ranks:
        rank = min(ranks)
        if rank == INF:
            break  # nothing left to merge
        i = ranks.index(rank)
        ids[i : i + 2] = [merges[ids[i], ids[i + 1]]]  # ids[i], ids[i+1] -> the new token
        del ranks[i]  # ranks[i-1] and ranks[i] now describe the new token's neighbours
        if i > 0:
            ranks[i - 1] = merges.get((ids[i - 1], ids[i]), INF)
        if i < len(ranks):
            ranks[i] = merges.get((ids[i], ids[i + 1]), INF)
    return ids


def build_vocab(merges: dict[tuple[int, int], int], byte_ids=range(256)) -> dict[int, bytes]:
    """Token id -> its bytes: the 256 single bytes, then each merge's concatenation.

    `byte_ids[b]` is the id of byte `b` (the identity here; GPT-2's files order the bytes
    differently). Merges must come in rank order, each new id above the previous one,
    each built from ids that already exist.

    The merges are checked first, on token *lengths* (plain ints), and the bytes are
    built only once they are known to fit: each merge can double a token, so forty
    merges in a 1 KB file could otherwise ask for a 2**40-byte token.

    >>> vocab = build_vocab({(104, 105): 256, (256, 33): 257})
    >>> vocab[104], vocab[256], vocab[257]
    (b'h', b'hi', b'hi!')
    """
    byte_ids = list(byte_ids)
    if len(byte_ids) != 256 or len(set(byte_ids)) != 256:
        raise ValueError("byte_ids must give 256 distinct ids, one for each byte value")
    check_token_lengths(merges, byte_ids)
    vocab = {idx: bytes([b]) for b, idx in enumerate(byte_ids)}
    for (a, b), idx in merges.items():
        vocab[idx] = vocab[a] + vocab[b]
    return vocab


def check_token_lengths(merges: dict[tuple[int, int], int], byte_ids: list[int],
                        max_bytes: int = limits.MAX_VOCAB_BYTES) -> int:
    """Check the merges' ids (see `build_vocab`) and return the bytes all tokens hold
    together, computed from the merge tree without building a single token; raise a
    ValueError past `max_bytes` (default `tinylm.limits.MAX_VOCAB_BYTES`).

    >>> check_token_lengths({(104, 105): 256, (256, 256): 257}, list(range(256)))
    262
    """
    length = dict.fromkeys(byte_ids, 1)  # id -> the number of bytes of its token
    total, previous = 256, -1
    for rank, ((a, b), idx) in enumerate(merges.items()):
        if a not in length or b not in length:
            raise ValueError(f"merge #{rank} ({a}, {b}) -> {idx} uses an id not defined before it")
        if idx in length or idx <= previous or idx >= limits.MAX_VOCAB:
            raise ValueError(
                f"merge #{rank} ({a}, {b}) -> {idx}: new ids must be unused, below "
                f"{limits.MAX_VOCAB:,}, and increase with the merge rank (the rank order is "
                "the order merges are applied)"
            )
        length[idx] = length[a] + length[b]
        total += length[idx]
        if total > max_bytes:
            raise ValueError(
                f"merge #{rank} makes a token of {length[idx]:,} bytes and the vocabulary "
                f"{total:,} bytes in all, above the limit of {max_bytes:,} (tinylm.limits)"
            )
        previous = idx
    return total
