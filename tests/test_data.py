"""Training data: UTF-8 reading, tokenization to a memory-mapped cache, the split, batches."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tinylm import data
from tinylm.tokenizer import BPETokenizer, CharTokenizer

SHAKESPEARE = data.bundled_text_path().read_text(encoding="utf-8")


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(SHAKESPEARE[:20_000], encoding="utf-8")
    return path


# -- reading ---------------------------------------------------------------------------


def test_non_utf8_names_the_file_and_byte_offset(tmp_path):
    path = tmp_path / "latin1.txt"
    good = "First line\nsecond line\n" * 50  # 1150 bytes before the bad one
    path.write_bytes(good.encode() + "café\n".encode("latin-1") + b"more\n")
    bad_offset = len(good.encode()) + 3
    for block_bytes in (7, 64, 1 << 20):  # the offset is exact whatever the block size
        with pytest.raises(ValueError) as err:
            list(data.text_blocks(path, block_bytes))
        assert str(path) in str(err.value) and f"byte offset {bad_offset}" in str(err.value)
        assert "e9" not in str(err.value)  # the file's bytes are not quoted
    with pytest.raises(ValueError, match="not UTF-8"):
        data.prepare(path, "char", tmp_path / "run")


def test_blocks_reassemble_the_text_and_never_split_a_character(tmp_path):
    path = tmp_path / "t.txt"
    text = "héllo wörld 🙂\n" * 300 + "no newline at the end ✓"
    path.write_text(text, encoding="utf-8")
    blocks = list(data.text_blocks(path, block_bytes=50))
    assert len(blocks) > 10 and "".join(blocks) == text
    assert data.read_text(path) == text and data.read_text(path, max_chars=7) == "héllo w"


def test_missing_data_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="data file not found: .*nope.txt"):
        data.prepare(tmp_path / "nope.txt", "char", tmp_path / "run")


def test_bundled_tiny_shakespeare_is_the_default():
    assert data.resolve_data_path(None) == data.bundled_text_path()
    assert data.bundled_text_path().read_text(encoding="utf-8").startswith("First Citizen:")


# -- tokenizing into the cache ----------------------------------------------------------


@pytest.mark.parametrize("pattern", ["gpt4", "gpt2"])
def test_blockwise_bpe_encoding_equals_encoding_the_whole_text(tmp_path, pattern):
    # whitespace runs before newlines, blank lines, indentation: where a careless cut
    # would change the pre-split chunks
    text = SHAKESPEARE[:6000].replace("\n\n", "  \n\n   ").replace(":\n", ":  \n\t")
    path = tmp_path / "t.txt"
    path.write_text(text, encoding="utf-8")
    tok = BPETokenizer.train(text, 300, pattern=pattern)
    n = data.encode_file(path, tok, tmp_path / "ids.npy", block_bytes=97)
    ids = np.load(tmp_path / "ids.npy")
    assert n == len(ids) and ids.tolist() == tok.encode(text)


def test_char_encoding_in_blocks(tmp_path, text_file):
    tok = CharTokenizer.train(SHAKESPEARE[:20_000])
    data.encode_file(text_file, tok, tmp_path / "ids.npy", block_bytes=100)
    ids = np.load(tmp_path / "ids.npy")
    assert ids.dtype == np.uint16 and ids.tolist() == tok.encode(SHAKESPEARE[:20_000])


def test_prepare_caches_memory_maps_and_splits_90_10(tmp_path, text_file):
    run = tmp_path / "run"
    d = data.prepare(text_file, "char", run)
    assert not d.cached and (run / "tokens.npy").is_file()
    assert isinstance(d.tokens, np.memmap) and d.tokens.dtype == np.uint16
    assert len(d.tokens) == 20_000 and len(d.train) == 18_000 and len(d.val) == 2_000
    assert d.tokenizer.decode(d.val[:50].tolist()) == SHAKESPEARE[18_000:18_050]
    note = json.loads((run / "tokens.json").read_text())
    assert note["tokens"] == 20_000 and note["source_sha256"] == d.source_sha256
    # the text's fingerprint, by which a resumed run checks the file it names
    assert d.describe()["bytes"] == text_file.stat().st_size == note["source_bytes"]
    assert d.describe()["sha256"] == data.file_sha256(text_file)

    again = data.prepare(text_file, "char", run)
    assert again.cached and np.array_equal(again.tokens, d.tokens)

    text_file.write_text(SHAKESPEARE[:30_000], encoding="utf-8")  # new text: re-tokenized
    changed = data.prepare(text_file, "char", run)
    assert not changed.cached and len(changed.tokens) == 30_000

    bpe = data.prepare(text_file, "bpe", run, vocab_size=300)  # new tokenizer: re-tokenized
    assert not bpe.cached and bpe.tokenizer.vocab_size == 300 and len(bpe.tokens) < 30_000


def test_token_files_are_written_atomically_and_a_damaged_note_rebuilds(tmp_path, text_file):
    """Regression for the move to tinylm.fileio: the .npy (header written by hand, then the
    raw ids) equals np.save's file; nothing temporary is left; a note that is not
    unambiguous JSON (a key twice) is a stale cache, rebuilt rather than an error."""
    tok = CharTokenizer.train(SHAKESPEARE[:20_000])
    n = data.encode_file(text_file, tok, tmp_path / "ids.npy", block_bytes=1000)
    np.save(tmp_path / "ref.npy", np.array(tok.encode(SHAKESPEARE[:20_000]), dtype=np.uint16))
    assert n == 20_000
    assert (tmp_path / "ids.npy").read_bytes() == (tmp_path / "ref.npy").read_bytes()
    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    assert data.encode_file(empty, tok, tmp_path / "none.npy") == 0
    assert np.load(tmp_path / "none.npy").shape == (0,)

    run = tmp_path / "run"
    data.prepare(text_file, "char", run)
    assert sorted(p.name for p in run.iterdir()) == ["tokens.json", "tokens.npy"]
    note = (run / "tokens.json").read_text()
    (run / "tokens.json").write_text(note.replace("{", '{"tokens": 1,', 1))  # "tokens" twice
    assert not data.prepare(text_file, "char", run).cached
    assert data.prepare(text_file, "char", run).cached

    # a cache whose note matches but whose ids are not the tokenizer's (a run directory
    # from elsewhere) is rebuilt, not fed to the model
    ids = np.load(run / "tokens.npy")
    ids[123] = 60_000
    np.save(run / "tokens.npy", ids)
    rebuilt = data.prepare(text_file, "char", run)
    assert not rebuilt.cached and rebuilt.tokens.max() < rebuilt.tokenizer.vocab_size


def test_loaded_tokenizer_file(tmp_path, text_file):
    tok = BPETokenizer.train(SHAKESPEARE[:5000], 280)
    tok.save(tmp_path / "tok.json")
    d = data.prepare(text_file, str(tmp_path / "tok.json"), tmp_path / "run")
    assert d.tokenizer.merges == tok.merges
    with pytest.raises(FileNotFoundError, match="tokenizer must be 'char', 'bpe' or a tokenizer"):
        data.prepare(text_file, "missing.json", tmp_path / "run")


def test_too_little_text_is_a_clear_error(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("To be or not to be", encoding="utf-8")
    with pytest.raises(ValueError, match="too little text.*context_length"):
        data.prepare(path, "char", tmp_path / "run", min_tokens=65)
    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(ValueError, match="empty"):
        data.prepare(empty, "char", tmp_path / "run")


def test_uint32_for_large_vocabularies():
    assert data.token_dtype(65) == np.uint16 and data.token_dtype(2**16) == np.uint16
    assert data.token_dtype(2**16 + 1) == np.uint32


# -- batches ----------------------------------------------------------------------------


def test_batches_are_shifted_windows_from_a_seeded_generator():
    tokens = np.arange(1000, dtype=np.uint16)
    x, y = data.get_batch(tokens, 8, 5, np.random.default_rng(0))
    assert x.shape == y.shape == (5, 8) and x.dtype == np.int64
    assert np.array_equal(y, x + 1)  # y is x shifted by one position
    assert np.array_equal(x[:, 1:] - x[:, :-1], np.ones((5, 7)))  # contiguous windows
    assert x.min() >= 0 and y.max() <= 999
    x2, _ = data.get_batch(tokens, 8, 5, np.random.default_rng(0))
    assert np.array_equal(x, x2)


def test_every_window_start_is_reachable_including_the_last():
    tokens = np.arange(10, dtype=np.uint16)
    x, y = data.get_batch(tokens, 4, 2000, np.random.default_rng(1))
    assert set(x[:, 0].tolist()) == set(range(6)) and y.max() == 9


def test_batch_stream_resumes_from_its_state():
    tokens = np.arange(5000, dtype=np.uint16)
    a = data.Batches(tokens, 16, 4, seed=[7, 1])
    for _ in range(3):
        a.next()
    state = json.loads(json.dumps(a.state_dict()))  # survives JSON, as in trainer.json
    expected = [a.next()[0] for _ in range(3)]
    b = data.Batches(tokens, 16, 4, seed=123)
    b.load_state_dict(state)
    assert all(np.array_equal(e, b.next()[0]) for e in expected)
