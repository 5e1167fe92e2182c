"""BPETokenizer: encoding and decoding, the chunk cache, special tokens, the file format,
GPT-2's files (against Hugging Face `tokenizers`) and equality with tiktoken."""

from __future__ import annotations

import doctest
import importlib
import json
from pathlib import Path

import numpy as np
import pytest

import tinylm.tokenizer as tokenizer_pkg
from tinylm.tokenizer import BPETokenizer, CharTokenizer, bpe_tokenizer, bytes_to_unicode, load
from tinylm.tokenizer.bpe import (
    GPT2_SPLIT_PATTERN,
    GPT4_SPLIT_PATTERN,
    encode_chunk,
    encode_chunk_simple,
    split_text,
)

ROOT = Path(__file__).resolve().parent.parent
CORPUS = (ROOT / "tinylm" / "data" / "tinyshakespeare.txt").read_text(encoding="utf-8")
FIXTURES = ROOT / "tests" / "fixtures" / "tokenizer"
HELD_OUT = CORPUS[-20_000:]
MULTILINGUAL = [
    "héllo wörld, naïve café",
    "你好，世界。日本語のテキスト。한국어",
    "Привет, мир! Γειά σου Κόσμε! مرحبا",
    "emoji 👋🏽 family 👨‍👩‍👧 flags 🇫🇷",
    "control \x00\x01\x1b[31m\x07\x7f nbsp\xa0 zwj\u200d tab\t cr\r\n",
    "   spaces   \n\n\n  and   newlines  ",
    "",
]


@pytest.fixture(scope="module")
def tok():
    return BPETokenizer.train(CORPUS[:100_000], 512, special_tokens=["<|endoftext|>"])


@pytest.mark.parametrize("module", ["bpe", "train", "bpe_tokenizer", "gpt2_files", "char",
                                    "fileformat", "visualize"])
def test_docstring_examples(module):
    result = doctest.testmod(importlib.import_module(f"tinylm.tokenizer.{module}"))
    assert result.attempted > 0 and result.failed == 0


# -- encoding and decoding -----------------------------------------------------------

def test_without_merges_the_ids_are_the_utf8_bytes():
    tok = BPETokenizer()
    for text in MULTILINGUAL:
        assert tok.encode(text) == list(text.encode("utf-8"))
    assert tok.vocab_size == 256 and tok.vocab[200] == bytes([200])


@pytest.mark.parametrize("text", [HELD_OUT, *MULTILINGUAL])
def test_decode_inverts_encode(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.decode_bytes(ids) == text.encode("utf-8")


def test_trained_tokenizer_compresses_held_out_text(tok):
    ids = tok.encode(HELD_OUT)
    assert len(HELD_OUT.encode()) / len(ids) > 1.7  # 256 merges of English: ~1.9 bytes/token
    assert max(ids) >= 256


def test_chunks_are_encoded_independently(tok):
    # merges never cross a pre-split boundary: encoding is chunk by chunk
    chunks = split_text(HELD_OUT, tok.pattern)
    assert tok.encode(HELD_OUT) == [i for chunk in chunks for i in tok.encode(chunk)]


def test_fast_chunk_encoder_matches_the_simple_one(tok):
    for chunk in set(split_text(HELD_OUT, tok.pattern)) | set(MULTILINGUAL):
        ids = list(chunk.encode("utf-8"))
        assert encode_chunk(ids, tok.merges) == encode_chunk_simple(ids, tok.merges)


def test_cache_gives_the_same_ids_even_when_it_overflows(tok, monkeypatch):
    expected = [i for chunk in split_text(HELD_OUT, tok.pattern)
                for i in encode_chunk(list(chunk.encode()), tok.merges)]
    fresh = BPETokenizer(tok.merges, tok.pattern)
    monkeypatch.setattr(bpe_tokenizer, "CACHE_SIZE", 50)
    assert fresh.encode(HELD_OUT) == expected
    assert 0 < len(fresh._cache) <= 50
    assert fresh.encode(HELD_OUT) == expected  # now partly from the cache


def test_patterns_by_name_regex_or_none():
    assert BPETokenizer(pattern="gpt4").pattern == GPT4_SPLIT_PATTERN
    assert BPETokenizer(pattern="gpt2").pattern == GPT2_SPLIT_PATTERN
    assert BPETokenizer(pattern=r"\S+|\s+").pattern == r"\S+|\s+"
    assert BPETokenizer(pattern=None).pattern is None
    with pytest.raises(ValueError, match="invalid split pattern"):
        BPETokenizer(pattern="(unclosed")
    # no pre-split: a merge may cross a space. "a " and " b" both occur 3 times; the
    # tie-break takes the smaller pair, (32, 98) = " b"
    tok = BPETokenizer.train("a b a b a b", 257, pattern=None)
    assert tok.vocab[256] == b" b"


def test_gpt2_and_gpt4_patterns_split_differently():
    text = "I'LL pay 12345 dollars!!\n\n  ok"
    assert split_text(text, GPT2_SPLIT_PATTERN) == [
        "I", "'", "LL", " pay", " 12345", " dollars", "!!", "\n\n ", " ok"]
    assert split_text(text, GPT4_SPLIT_PATTERN) == [
        "I", "'LL", " pay", " ", "123", "45", " dollars", "!!\n\n", " ", " ok"]


def test_decode_replaces_invalid_utf8_and_decode_bytes_is_exact():
    tok = BPETokenizer()
    smile = list("😀".encode())  # 4 bytes
    assert tok.decode(smile[:2]) == "\ufffd"
    assert tok.decode_bytes(smile[:2]) == "😀".encode()[:2]
    assert tok.decode([0xFF, 104]) == "\ufffdh"


def test_decode_unknown_id_names_the_id(tok):
    with pytest.raises(ValueError, match="unknown token id 9999"):
        tok.decode([104, 9999])
    with pytest.raises(ValueError, match="unknown token id -1"):
        tok.decode_bytes([-1])


def test_decode_accepts_numpy_ids(tok):
    ids = tok.encode("To be, or not to be")
    assert tok.decode(np.array(ids, dtype=np.int64)) == "To be, or not to be"


def test_encode_rejects_non_text(tok):
    with pytest.raises(TypeError, match="str"):
        tok.encode(b"bytes")


# -- special tokens ------------------------------------------------------------------

def test_special_token_text_raises_by_default(tok):
    with pytest.raises(ValueError, match=r"special token '<\|endoftext\|>'.*allowed_special"):
        tok.encode("the end<|endoftext|>")


def test_allowed_special_modes(tok):
    eot = tok.special_tokens["<|endoftext|>"]
    text = "the end<|endoftext|>The start"
    as_special = tok.encode(text, allowed_special="all")
    assert as_special == tok.encode("the end") + [eot] + tok.encode("The start")
    assert tok.encode(text, allowed_special={"<|endoftext|>"}) == as_special
    as_text = tok.encode(text, allowed_special="none")
    assert as_text == tok.encode_ordinary(text) and eot not in as_text
    assert tok.decode(as_special) == tok.decode(as_text) == text
    with pytest.raises(ValueError, match="unknown special tokens"):
        tok.encode(text, allowed_special={"<|pad|>"})
    with pytest.raises(ValueError, match="allowed_special must be"):
        tok.encode(text, allowed_special="some")


def test_a_set_allows_some_special_tokens_and_still_raises_for_others():
    tok = BPETokenizer(special_tokens={"<|a|>": 256, "<|b|>": 257})
    assert tok.encode("<|a|>x", allowed_special={"<|a|>"}) == [256, 120]
    with pytest.raises(ValueError, match=r"'<\|b\|>'"):
        tok.encode("<|a|><|b|>", allowed_special={"<|a|>"})


def test_longest_special_token_wins():
    tok = BPETokenizer(special_tokens=["<s>", "<s><s>"])
    assert tok.encode("<s><s><s>x", allowed_special="all") == [257, 256, 120]


def test_register_special_tokens_later():
    tok = BPETokenizer.train(CORPUS[:5_000], 300)
    tok.register_special_tokens(["<|endoftext|>", "<|pad|>"])
    tok.register_special_tokens("<|sep|>")
    tok.register_special_tokens({"<|im_start|>": 1000})
    assert tok.special_tokens == {"<|endoftext|>": 300, "<|pad|>": 301, "<|sep|>": 302,
                                  "<|im_start|>": 1000}
    assert tok.vocab_size == 1001
    assert tok.decode([1000, 300]) == "<|im_start|><|endoftext|>"
    with pytest.raises(ValueError, match="already registered"):
        tok.register_special_tokens(["<|pad|>"])
    with pytest.raises(ValueError, match="invalid or taken"):
        tok.register_special_tokens({"<|x|>": 104})
    with pytest.raises(ValueError, match="non-empty string"):
        tok.register_special_tokens([""])


# -- files ---------------------------------------------------------------------------

def test_save_load_round_trip(tok, tmp_path):
    path = tmp_path / "tok.json"
    tok.save(path)
    loaded = BPETokenizer.load(path)
    assert loaded.merges == tok.merges and list(loaded.merges) == list(tok.merges)
    assert loaded.special_tokens == tok.special_tokens
    assert loaded.pattern == tok.pattern and loaded.vocab == tok.vocab
    text = HELD_OUT[:2000] + "<|endoftext|>"
    assert loaded.encode(text, allowed_special="all") == tok.encode(text, allowed_special="all")
    assert isinstance(load(path), BPETokenizer)
    assert not list(tmp_path.glob("*.tmp"))  # the atomic write left no temporary file


def test_file_is_versioned_readable_json(tok, tmp_path):
    tok.save(tmp_path / "tok.json")
    text = (tmp_path / "tok.json").read_text(encoding="utf-8")
    d = json.loads(text)
    assert (d["format"], d["version"], d["type"]) == ("tinylm-tokenizer", 1, "bpe")
    assert "byte_ids" not in d  # the identity is implied
    a, b, idx, shown = d["merges"][0]
    assert f'[{a}, {b}, {idx}, "{shown}"]' in text.splitlines()[9]  # one merge per line
    assert tok.vocab[idx] == tok.vocab[a] + tok.vocab[b] == shown.encode()
    assert tokenizer_pkg.from_dict(tok.to_dict()).merges == tok.merges


@pytest.mark.parametrize("content, message", [
    ('{"model": {}, "added_tokens": []}', "Hugging Face tokenizer.json"),
    ('{"!": 0, "a": 1}', "from_gpt2"),
    ('{"format": "tinylm-tokenizer", "version": 2, "type": "bpe"}', "version 2 is not supported"),
    ('{"format": "tinylm-tokenizer", "version": 1, "type": "char", "chars": "ab"}',
     "holds a 'char' tokenizer"),
    (('{"format": "tinylm-tokenizer", "version": 1, "type": "bpe", "pattern": null, '
      '"special_tokens": {}, "merges": [[1, 999, 256]]}'), "uses an id not defined"),
    ('{"format": "tinylm-tokenizer", "version": 1, "type": "bpe"}', "damaged"),
    ("not json at all", "tokenizer file is not valid JSON"),
    # (regression: read through tinylm.fileio.read_json, which refuses ambiguous files)
    ('{"format": "tinylm-tokenizer", "format": "x"}', "duplicate key 'format'"),
])
def test_load_rejects_other_files_clearly(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=message) as info:
        BPETokenizer.load(path)
    assert "bad.json" in str(info.value)


def test_load_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="unknown tokenizer type 'wordpiece'"):
        tokenizer_pkg.from_dict({"format": "tinylm-tokenizer", "version": 1, "type": "wordpiece"})


# -- GPT-2's files, against Hugging Face `tokenizers` ---------------------------------

def gpt2_fixture_tokenizer():
    gpt2 = FIXTURES / "gpt2"
    return BPETokenizer.from_gpt2(gpt2 / "vocab.json", gpt2 / "merges.txt")


def test_bytes_to_unicode_is_gpt2s_table():
    table = bytes_to_unicode()
    assert sorted(table) == list(range(256)) and len(set(table.values())) == 256
    assert table[ord(" ")] == "Ġ" and table[ord("\n")] == "Ċ" and table[ord("A")] == "A"
    assert all(c.isprintable() and not c.isspace() for c in table.values())


def test_from_gpt2_encodes_like_the_program_that_wrote_the_files():
    tok = gpt2_fixture_tokenizer()
    assert tok.special_tokens == {"<|endoftext|>": 0}  # HF put the special token first
    assert tok.byte_ids[ord("!")] == 1 and tok.vocab_size == 512
    expected = json.loads((FIXTURES / "gpt2" / "expected.json").read_text(encoding="utf-8"))
    assert len(expected) > 10
    for sample in expected:
        ids = tok.encode(sample["text"], allowed_special="all")
        assert ids == sample["ids"], sample["text"][:40]
        assert tok.decode(ids) == sample["text"]


def test_from_gpt2_matches_hugging_face_live():
    tokenizers = pytest.importorskip("tokenizers")
    hf = tokenizers.Tokenizer(tokenizers.models.BPE.from_file(
        str(FIXTURES / "gpt2" / "vocab.json"), str(FIXTURES / "gpt2" / "merges.txt")))
    hf.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok = gpt2_fixture_tokenizer()
    for text in [HELD_OUT, *MULTILINGUAL]:
        assert tok.encode(text) == hf.encode(text).ids


def test_gpt2_tokenizer_survives_save_and_load(tmp_path):
    tok = gpt2_fixture_tokenizer()
    tok.save(tmp_path / "gpt2.json")
    loaded = BPETokenizer.load(tmp_path / "gpt2.json")
    assert loaded.byte_ids == tok.byte_ids and loaded.pattern == GPT2_SPLIT_PATTERN
    assert loaded.encode(HELD_OUT[:3000]) == tok.encode(HELD_OUT[:3000])


def test_from_gpt2_reports_bad_files(tmp_path):
    vocab = FIXTURES / "gpt2" / "vocab.json"
    merges = tmp_path / "merges.txt"
    merges.write_text("#version: 0.2\nĠ t\nnot-a-token x\n", encoding="utf-8")
    with pytest.raises(ValueError, match="line 3"):
        BPETokenizer.from_gpt2(vocab, merges)
    with pytest.raises(FileNotFoundError, match="nowhere.txt"):
        BPETokenizer.from_gpt2(vocab, tmp_path / "nowhere.txt")
    bad_vocab = tmp_path / "vocab.json"
    bad_vocab.write_text('{"a": 0}', encoding="utf-8")
    with pytest.raises(ValueError, match="not a byte-level BPE"):
        BPETokenizer.from_gpt2(bad_vocab, merges)
    # regression: vocab.json is read by tinylm.fileio.read_json, errors name the file
    for content, message in (('["a"]', "GPT-2 vocabulary must hold a JSON .*object"),
                             ('{"a": 0', "GPT-2 vocabulary is not valid JSON"),
                             ('{"a": 0, "a": 1}', "duplicate key 'a'")):
        bad_vocab.write_text(content, encoding="utf-8")
        with pytest.raises(ValueError, match=message) as info:
            BPETokenizer.from_gpt2(bad_vocab, merges)
        assert "vocab.json" in str(info.value)


# -- tiktoken ------------------------------------------------------------------------

def test_ids_equal_committed_tiktoken_ids():
    # tiktoken encoded these with tinylm_bpe.json's ranks and pattern
    # (scripts/make_tokenizer_fixture.py), so this runs without tiktoken
    tok = BPETokenizer.load(FIXTURES / "tinylm_bpe.json")
    expected = json.loads((FIXTURES / "tiktoken_expected.json").read_text(encoding="utf-8"))
    assert len(expected) > 10
    for sample in expected:
        assert tok.encode(sample["text"], allowed_special="all") == sample["ids"]


def tiktoken_encoding(tok):
    tiktoken = pytest.importorskip("tiktoken")
    return tiktoken.Encoding(name="tinylm-test", pat_str=tok.pattern,
                             mergeable_ranks={b: i for i, b in tok.vocab.items()},
                             special_tokens=tok.special_tokens)


@pytest.mark.parametrize("pattern", ["gpt4", "gpt2"])
def test_ids_equal_tiktoken_live(pattern):
    tok = BPETokenizer.train(CORPUS[:150_000], 1024, pattern, ["<|endoftext|>"])
    enc = tiktoken_encoding(tok)
    for text in [HELD_OUT, *MULTILINGUAL, "x<|endoftext|>y"]:
        assert tok.encode(text, allowed_special="all") == enc.encode(text, allowed_special="all")
        assert tok.encode_ordinary(text) == enc.encode_ordinary(text)


def test_char_tokenizer_file_loads_through_the_module_loader(tmp_path):
    CharTokenizer.train("abc").save(tmp_path / "char.json")
    assert isinstance(load(tmp_path / "char.json"), CharTokenizer)
