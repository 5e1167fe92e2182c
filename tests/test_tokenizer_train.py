"""BPE training: the fast incremental trainer against the simple reference, the
documented tie-break, weighted chunk counts, and the committed fixture's merges."""

from __future__ import annotations

from pathlib import Path

import pytest

from tinylm.tokenizer import BPETokenizer
from tinylm.tokenizer.bpe import GPT2_SPLIT_PATTERN, GPT4_SPLIT_PATTERN, get_stats, split_text
from tinylm.tokenizer.train import count_chunks, train_fast, train_simple

ROOT = Path(__file__).resolve().parent.parent
CORPUS = (ROOT / "tinylm" / "data" / "tinyshakespeare.txt").read_text(encoding="utf-8")
FIXTURES = ROOT / "tests" / "fixtures" / "tokenizer"


def chunks_and_weights(text, pattern):
    counts = count_chunks(text, pattern)
    return [list(c.encode("utf-8")) for c in counts], list(counts.values())


@pytest.mark.parametrize("pattern, text, num_merges", [
    (GPT4_SPLIT_PATTERN, CORPUS[:30_000], 300),
    (GPT2_SPLIT_PATTERN, CORPUS[30_000:60_000], 300),
    (r"\w+|\s+|[^\w\s]+", CORPUS[60_000:90_000], 300),
    (None, CORPUS[:1_500], 200),  # one long chunk
], ids=["gpt4", "gpt2", "custom-regex", "no-split"])
def test_fast_trainer_learns_the_same_merges_as_the_simple_one(pattern, text, num_merges):
    chunks, weights = chunks_and_weights(text, pattern)
    simple = list(train_simple(chunks, weights, num_merges))
    fast = list(train_fast(chunks, weights, num_merges))
    assert len(simple) == num_merges
    assert fast == simple  # same pairs, same new ids, same counts


def test_first_merge_count_is_the_pair_count_over_all_chunks_of_the_text():
    text = CORPUS[:20_000]
    chunks = split_text(text, GPT4_SPLIT_PATTERN)  # every occurrence, not deduplicated
    stats = {}
    for chunk in chunks:
        get_stats(list(chunk.encode()), stats)
    best_count = max(stats.values())
    (pair, new_id, count), = train_fast(*chunks_and_weights(text, GPT4_SPLIT_PATTERN), 1)
    assert (new_id, count) == (256, best_count)
    assert stats[pair] == best_count


@pytest.mark.parametrize("trainer", [train_simple, train_fast])
def test_tie_break_prefers_the_smallest_pair_not_the_first_seen(trainer):
    # "cdab": (99, 100), (100, 97), (97, 98) all occur once -> the smallest, (97, 98)
    assert list(trainer([list(b"cdab")], [1], 1)) == [((97, 98), 256, 1)]
    # a higher count beats a smaller pair
    assert list(trainer([list(b"ab"), list(b"cd")], [1, 2], 1)) == [((99, 100), 256, 2)]
    # equal counts: compare a first, then b
    assert list(trainer([list(b"ac"), list(b"ab")], [1, 1], 1)) == [((97, 98), 256, 1)]


@pytest.mark.parametrize("trainer", [train_simple, train_fast])
def test_distinct_chunks_count_once_with_their_weight(trainer):
    # " ab" occurs 3 times, "cd" 2 times: the weights decide, not the number of chunks
    counts = count_chunks(" ab ab ab cd cd", r" ?\w+")
    assert dict(counts) == {" ab": 3, " cd": 2}
    merges = list(trainer([list(c.encode()) for c in counts], list(counts.values()), 3))
    # (32, 97) and (97, 98) tie at 3: the smaller pair first; then (32, 99) beats (99, 100)
    assert merges == [((32, 97), 256, 3), ((256, 98), 257, 3), ((32, 99), 258, 2)]


@pytest.mark.parametrize("trainer", ["fast", "simple"])
def test_training_stops_early_when_no_pair_is_left(trainer):
    tok = BPETokenizer.train("ab ab", 1000, pattern="gpt2", trainer=trainer)
    # chunks "ab" and " ab": "ab" (count 2), then " " + "ab"; then every chunk is one token
    assert [tok.vocab[i] for i in tok.merges.values()] == [b"ab", b" ab"]
    assert tok.vocab_size == 258


def test_training_reproduces_the_committed_fixture():
    # the fixture script trained this file; training again must learn the same merges
    saved = BPETokenizer.load(FIXTURES / "tinylm_bpe.json")
    tok = BPETokenizer.train(CORPUS[:200_000], 512, "gpt4", ["<|endoftext|>"])
    assert tok.merges == saved.merges
    assert list(tok.merges) == list(saved.merges)  # rank order too
    assert tok.special_tokens == saved.special_tokens == {"<|endoftext|>": 512}


def test_special_tokens_get_the_ids_after_the_merges_and_are_never_learned():
    text = "hello<|endoftext|>" * 50
    tok = BPETokenizer.train(text, 270, special_tokens=["<|endoftext|>", "<|pad|>"])
    assert tok.special_tokens == {"<|endoftext|>": 256 + len(tok.merges),
                                  "<|pad|>": 257 + len(tok.merges)}
    assert all(tok.vocab[i] in b"hello" for i in tok.merges.values())
    assert tok.encode(text, allowed_special="all").count(tok.special_tokens["<|endoftext|>"]) == 50


def test_progress_wraps_the_merge_iterator():
    seen = {}

    def progress(steps, total):
        seen["total"] = total
        for step in steps:
            seen["steps"] = seen.get("steps", 0) + 1
            yield step

    tok = BPETokenizer.train(CORPUS[:5_000], 300, progress=progress)
    assert seen == {"total": 44, "steps": 44} and len(tok.merges) == 44


def test_training_rejects_bad_arguments():
    with pytest.raises(ValueError, match="vocab_size"):
        BPETokenizer.train("abc", 100)
    with pytest.raises(ValueError, match="trainer"):
        BPETokenizer.train("abc", 300, trainer="quick")
    with pytest.raises(TypeError, match="str"):
        BPETokenizer.train(b"abc", 300)
    with pytest.raises(ValueError, match="does not match every character"):
        BPETokenizer.train("words, and punctuation", 300, pattern=r"\w+")
    with pytest.raises(ValueError, match="surrogate U\\+DC80 at index 3"):
        BPETokenizer.train("abc\udc80", 300)
