"""CharTokenizer: the sorted character vocabulary, clear errors, and its JSON file."""

from __future__ import annotations

from pathlib import Path

import pytest

from tinylm.tokenizer import BPETokenizer, CharTokenizer, load

CORPUS = (Path(__file__).resolve().parent.parent / "tinylm" / "data" / "tinyshakespeare.txt"
          ).read_text(encoding="utf-8")


def test_vocabulary_is_the_sorted_characters_of_the_text():
    tok = CharTokenizer.train(CORPUS)
    assert tok.vocab_size == 65  # the classic Tiny Shakespeare vocabulary
    assert tok.chars[:2] == ["\n", " "] and tok.chars == sorted(set(CORPUS))
    ids = tok.encode("First Citizen:")
    assert ids == [tok.chars.index(c) for c in "First Citizen:"]
    assert tok.decode(ids) == "First Citizen:"
    assert tok.decode_bytes(tok.encode("ab")) == b"ab"


def test_unknown_character_error_names_it():
    tok = CharTokenizer.train("hello")
    with pytest.raises(ValueError, match=r"character 'é' \(U\+00E9\) at index 2"):
        tok.encode("heé")


def test_unknown_id_error_names_it():
    tok = CharTokenizer.train("hello")
    with pytest.raises(ValueError, match="unknown token id 4"):
        tok.decode([0, 4])
    with pytest.raises(ValueError, match="unknown token id -1"):
        tok.decode([-1])


def test_save_load_round_trip(tmp_path):
    tok = CharTokenizer.train("To be, or not to be: that is the question.\n")
    tok.save(tmp_path / "char.json")
    for loaded in (CharTokenizer.load(tmp_path / "char.json"), load(tmp_path / "char.json")):
        assert isinstance(loaded, CharTokenizer) and loaded.chars == tok.chars
    assert CharTokenizer.from_dict(tok.to_dict()).chars == tok.chars
    assert '"chars": "\\n ,.:Tabehinoqrstu"' in (tmp_path / "char.json").read_text()


def test_loading_the_wrong_type_is_a_clear_error(tmp_path):
    BPETokenizer().save(tmp_path / "bpe.json")
    with pytest.raises(ValueError, match="holds a 'bpe' tokenizer, not a 'char' one"):
        CharTokenizer.load(tmp_path / "bpe.json")


def test_bad_vocabularies_are_rejected():
    with pytest.raises(ValueError, match="twice"):
        CharTokenizer("aba")
    with pytest.raises(ValueError, match="single characters"):
        CharTokenizer(["ab"])
    with pytest.raises(ValueError, match="non-empty"):
        CharTokenizer.train("")
