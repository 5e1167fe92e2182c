"""Property tests (hypothesis): any text round-trips, encoding never crashes, the fast
paths agree with the simple ones, and text with no UTF-8 encoding is a clear error."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tinylm.tokenizer import BPETokenizer, CharTokenizer
from tinylm.tokenizer.bpe import encode_chunk, encode_chunk_simple
from tinylm.tokenizer.train import count_chunks, train_fast, train_simple

ROOT = Path(__file__).resolve().parent.parent
CORPUS = (ROOT / "tinylm" / "data" / "tinyshakespeare.txt").read_text(encoding="utf-8")
SPECIAL = "<|endoftext|>"

PATTERNS = ["gpt4", "gpt2", None]  # None: one chunk, so keep the texts short


@cache
def trained(pattern):
    return BPETokenizer.train(CORPUS[:40_000], 400, pattern, [SPECIAL])

# Unicode text with English and special-token pieces mixed in (hypothesis' text()
# leaves out lone surrogates, which have no UTF-8 encoding)
texts = st.lists(st.one_of(st.text(), st.sampled_from([" the", "To be,", "\n\n", "<|", SPECIAL])),
                 max_size=8).map("".join)
SETTINGS = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(text=texts, pattern=st.sampled_from(PATTERNS))
def test_any_text_round_trips(text, pattern):
    tok = trained(pattern)
    ids = tok.encode(text, allowed_special="none")
    assert tok.decode(ids) == text
    assert tok.decode_bytes(ids) == text.encode("utf-8")
    assert all(0 <= i < 400 for i in ids)
    ids = tok.encode(text, allowed_special="all")
    assert tok.decode(ids) == text


@SETTINGS
@given(text=texts, allowed=st.sampled_from(["none_raise", "all", "none", {SPECIAL}, set()]))
def test_encoding_never_crashes(text, allowed):
    tok = trained("gpt4")
    if SPECIAL in text and allowed in ("none_raise", set()):
        with pytest.raises(ValueError, match="special token"):
            tok.encode(text, allowed_special=allowed)
    else:
        ids = tok.encode(text, allowed_special=allowed)
        has_special_id = tok.special_tokens[SPECIAL] in ids
        assert has_special_id == (SPECIAL in text and allowed != "none")


@SETTINGS
@given(text=texts, surrogate=st.integers(0xD800, 0xDFFF), where=st.integers(0, 100))
def test_lone_surrogates_give_a_clear_error(text, surrogate, where):
    where = min(where, len(text))
    bad = text[:where] + chr(surrogate) + text[where:]
    for tok in map(trained, PATTERNS):
        message = f"lone surrogate U\\+{surrogate:04X} at index {where}"
        with pytest.raises(ValueError, match=message):
            tok.encode(bad, allowed_special="all")


@SETTINGS
@given(data=st.binary(max_size=60))
def test_fast_chunk_encoder_matches_the_simple_one(data):
    merges = trained(None).merges
    assert encode_chunk(list(data), merges) == encode_chunk_simple(list(data), merges)


@settings(max_examples=60, deadline=None)
@given(text=st.text(alphabet="ab c\n", max_size=120), pattern=st.sampled_from([None, "gpt2"]),
       num_merges=st.integers(1, 30))
def test_fast_and_simple_trainers_agree_even_with_many_ties(text, pattern, num_merges):
    # a tiny alphabet makes equal counts common, so the tie-break decides often
    counts = count_chunks(text, BPETokenizer(pattern=pattern).pattern)
    chunks, weights = [list(c.encode()) for c in counts], list(counts.values())
    fast = list(train_fast(chunks, weights, num_merges))
    assert fast == list(train_simple(chunks, weights, num_merges))


@SETTINGS
@given(text=texts)
def test_ids_equal_tiktoken(text):
    tiktoken = pytest.importorskip("tiktoken")
    tok = trained("gpt4")
    enc = tiktoken.Encoding(name="tinylm-prop", pat_str=tok.pattern,
                            mergeable_ranks={b: i for i, b in tok.vocab.items()},
                            special_tokens=tok.special_tokens)
    assert tok.encode(text, allowed_special="all") == enc.encode(text, allowed_special="all")


@SETTINGS
@given(text=st.text(min_size=1))
def test_char_tokenizer_round_trips_its_training_text(text):
    tok = CharTokenizer.train(text)
    ids = tok.encode(text)
    assert tok.decode(ids) == text and max(ids) < tok.vocab_size
