"""`tinylm tokenizer train|encode|decode`, and the token-boundary display."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest

from tinylm.cli import main
from tinylm.tokenizer import BPETokenizer, CharTokenizer, load, show_tokens, token_pieces

ROOT = Path(__file__).resolve().parent.parent
CORPUS = (ROOT / "tinylm" / "data" / "tinyshakespeare.txt").read_text(encoding="utf-8")
GPT2_DIR = ROOT / "tests" / "fixtures" / "tokenizer" / "gpt2"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small BPE tokenizer trained through the command line: (path, tokenizer)."""
    tmp = tmp_path_factory.mktemp("tok")
    (tmp / "corpus.txt").write_text(CORPUS[:20_000], encoding="utf-8")
    path = tmp / "tok.json"
    code = main(["tokenizer", "train", "--input", str(tmp / "corpus.txt"), "--vocab-size", "300",
                 "--special", "<|endoftext|>", "--out", str(path), "--no-progress"])
    assert code == 0
    return path, load(path)


def test_train_writes_a_tokenizer(trained):
    _, tok = trained
    assert isinstance(tok, BPETokenizer)
    assert len(tok.merges) == 44 and tok.special_tokens == {"<|endoftext|>": 300}
    assert tok.merges == BPETokenizer.train(CORPUS[:20_000], 300).merges


def test_train_refuses_an_output_that_is_a_directory_before_training(tmp_path, capsys):
    (tmp_path / "c.txt").write_text(CORPUS[:5_000], encoding="utf-8")
    (tmp_path / "out").mkdir()
    for out, message in ((tmp_path / "out", "is a directory; give a file name"),
                         (tmp_path / "no" / "tok.json", "does not exist")):
        code = main(["tokenizer", "train", "--input", str(tmp_path / "c.txt"), "--out", str(out),
                     "--no-progress"])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and f"--out {out}: " in err and message in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.txt", "out"]  # no *.tmp


def test_train_reports_and_shows_progress(tmp_path, capsys):
    (tmp_path / "c.txt").write_text(CORPUS[:5_000], encoding="utf-8")
    code = main(["tokenizer", "train", "--input", str(tmp_path / "c.txt"), "--vocab-size", "280",
                 "--pattern", "gpt2", "--trainer", "simple", "--out", str(tmp_path / "t.json")])
    assert code == 0
    captured = capsys.readouterr()
    assert "merges" in captured.err and "24/24" in captured.err  # the tqdm bar
    assert "bytes per token" in captured.out and "t.json" in captured.out
    assert load(tmp_path / "t.json").pattern == BPETokenizer(pattern="gpt2").pattern


def test_encode_then_decode(trained, capsys):
    path, tok = trained
    text = "To be, or not to be"
    assert main(["tokenizer", "encode", "--tokenizer", str(path), text]) == 0
    out = capsys.readouterr().out
    assert [int(w) for w in out.split()] == tok.encode(text)
    assert main(["tokenizer", "decode", "--tokenizer", str(path), *out.split()]) == 0
    assert capsys.readouterr().out == text + "\n"


def test_encode_from_a_file_and_decode_from_stdin(trained, tmp_path, capsys, monkeypatch):
    path, _ = trained
    (tmp_path / "in.txt").write_text("First Citizen:\nSpeak.", encoding="utf-8")
    assert main(["tokenizer", "encode", "--tokenizer", str(path),
                 "--input", str(tmp_path / "in.txt")]) == 0
    ids = capsys.readouterr().out
    monkeypatch.setattr("sys.stdin", io.StringIO(ids))
    assert main(["tokenizer", "decode", "--tokenizer", str(path)]) == 0
    assert capsys.readouterr().out == "First Citizen:\nSpeak.\n"


def test_special_tokens_on_the_command_line(trained, capsys):
    path, _ = trained
    text = "the end<|endoftext|>"
    assert main(["tokenizer", "encode", "--tokenizer", str(path), text]) == 2
    assert "special token '<|endoftext|>'" in capsys.readouterr().err
    for allowed in ("all", "<|endoftext|>"):
        assert main(["tokenizer", "encode", "--tokenizer", str(path),
                     "--allowed-special", allowed, text]) == 0
        assert capsys.readouterr().out.split()[-1] == "300"
    assert main(["tokenizer", "encode", "--tokenizer", str(path),
                 "--allowed-special", "none", text]) == 0
    assert "300" not in capsys.readouterr().out.split()


def test_encode_show_prints_coloured_tokens(trained, capsys):
    path, _ = trained
    assert main(["tokenizer", "encode", "--tokenizer", str(path), "--show", "the king"]) == 0
    out = capsys.readouterr().out
    assert out.count("\x1b[0m") > 2
    assert re.sub(r"\x1b\[[0-9;]*m", "", out) == "the king\n"  # the text without colours


def test_char_tokenizer_from_the_command_line(tmp_path, capsys):
    (tmp_path / "c.txt").write_text("hello world", encoding="utf-8")
    assert main(["tokenizer", "train", "--type", "char", "--input", str(tmp_path / "c.txt"),
                 "--out", str(tmp_path / "char.json")]) == 0
    assert isinstance(load(tmp_path / "char.json"), CharTokenizer)
    capsys.readouterr()
    assert main(["tokenizer", "encode", "--tokenizer", str(tmp_path / "char.json"), "hold"]) == 0
    assert capsys.readouterr().out.split() == ["3", "5", "4", "1"]  # " dehlorw"


def test_gpt2_directory_as_tokenizer(capsys):
    assert main(["tokenizer", "encode", "--tokenizer", str(GPT2_DIR), "Hello"]) == 0
    ids = [int(w) for w in capsys.readouterr().out.split()]
    tok = BPETokenizer.from_gpt2(GPT2_DIR / "vocab.json", GPT2_DIR / "merges.txt")
    assert ids == tok.encode("Hello")


@pytest.mark.parametrize("argv, message", [
    (["tokenizer", "encode", "--tokenizer", "missing.json", "x"], "not found"),
    (["tokenizer", "decode", "--tokenizer", str(GPT2_DIR), "99999"], "unknown token id 99999"),
    (["tokenizer", "train", "--input", "missing.txt"], "no such file"),
])
def test_user_errors_are_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("action, option", [
    ("train", "--vocab-size"), ("encode", "--allowed-special"), ("decode", "--tokenizer")])
def test_every_action_has_help(action, option, capsys):
    with pytest.raises(SystemExit) as info:
        main(["tokenizer", action, "--help"])
    assert info.value.code == 0
    assert option in capsys.readouterr().out


# -- the token-boundary display --------------------------------------------------------

def test_token_pieces_and_views(trained):
    _, tok = trained
    text = "To be, or <not> to be 😀"
    view = show_tokens(tok, text)
    assert view.ids == tok.encode(text)
    assert "".join(view.pieces[:-4]) == "To be, or <not> to be "  # the emoji is 4 byte tokens
    assert view.pieces[-4:] == ["\\xf0", "\\x9f", "\\x98", "\\x80"]
    assert view.ansi().count("\x1b[0m") == len(view.ids) and str(view) == view.ansi()
    html = view._repr_html_()
    assert "&lt;" in html and "<not>" not in html
    assert html.count("<span") == len(view.ids) and f'title="id {view.ids[0]}"' in html


def test_show_tokens_works_for_char_tokenizers_and_special_tokens(trained):
    char = CharTokenizer.train("abc")
    assert token_pieces(char, char.encode("cab")) == ["c", "a", "b"]
    _, tok = trained
    view = show_tokens(tok, "end<|endoftext|>", allowed_special="all")
    assert view.pieces[-1] == "<|endoftext|>"
