"""Whole-split evaluation: every token predicted once, bits per byte (tinylm/evaluate.py)."""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest

from tinylm.backend import get_xp, to_device
from tinylm.evaluate import evaluate_tokens, token_bytes
from tinylm.model import GPT, GPTConfig
from tinylm.nn import SoftmaxCrossEntropy
from tinylm.tokenizer import BPETokenizer, CharTokenizer

TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n"
        "Café, naïve — déjà vu: ünïcödé costs more than one byte per character.\n") * 3


def model_for(vocab, device="cpu", T=8):
    cfg = GPTConfig(vocab_size=vocab, context_length=T, d_model=32, n_layers=2, n_heads=4,
                    dropout=0.1)
    return GPT(cfg, seed=0, device=device)


def brute_force(model, tokens, T):
    """Each target, one window at a time, through the layer training uses."""
    loss_fn, nats, hits, n = SoftmaxCrossEntropy(), 0.0, 0, 0
    model.eval()
    for s in range(0, len(tokens) - 1, T):
        x = np.asarray(tokens[s:s + T + 1], dtype=np.int64)[None]  # (1, t+1)
        logits = model.forward(to_device(x[:, :-1], model.xp))
        t = x.shape[1] - 1
        nats += loss_fn.forward(logits, to_device(x[:, 1:], model.xp)) * t
        hits += int((logits.argmax(-1) == to_device(x[:, 1:], model.xp)).sum())
        n += t
    model.train()
    return nats, hits, n


@pytest.mark.parametrize("n_tokens", [57, 65, 2])  # a partial last window, exact windows, one
def test_every_token_is_predicted_once(device, n_tokens):
    tok = CharTokenizer.train(TEXT)
    tokens = np.asarray(tok.encode(TEXT)[:n_tokens], dtype=np.uint16)
    model = model_for(tok.vocab_size, device)
    r = evaluate_tokens(model, tokens, tok, batch_size=3)
    assert model.training  # mode restored
    assert all(m._cache is None for m in model.modules())  # no activations kept
    nats, hits, n = brute_force(model, tokens, 8)
    assert r.tokens == n == n_tokens - 1
    assert r.windows == math.ceil((n_tokens - 1) / 8)
    assert r.loss == pytest.approx(nats / n, rel=1e-5)
    assert r.accuracy == hits / n and r.perplexity == pytest.approx(math.exp(r.loss))


def test_batch_size_does_not_change_the_numbers(device):
    tok = CharTokenizer.train(TEXT)
    tokens = np.asarray(tok.encode(TEXT), dtype=np.uint16)
    model = model_for(tok.vocab_size, device)
    a = evaluate_tokens(model, tokens, tok, batch_size=1)
    b = evaluate_tokens(model, tokens, tok, batch_size=16)
    assert a.loss == pytest.approx(b.loss, rel=1e-6) and a.accuracy == b.accuracy
    c = evaluate_tokens(model, tokens, tok, context_length=4)  # shorter windows: more of them
    assert c.windows == math.ceil((len(tokens) - 1) / 4)


def test_bits_per_byte_counts_utf8_bytes_for_characters():
    tok = CharTokenizer.train(TEXT)
    tokens = np.asarray(tok.encode(TEXT), dtype=np.uint16)
    r = evaluate_tokens(model_for(tok.vocab_size), tokens, tok)
    assert r.bytes == len(TEXT[1:].encode("utf-8")) > r.tokens  # é, ï, — take 2-3 bytes
    assert r.bits_per_byte == pytest.approx(r.loss * r.tokens / math.log(2) / r.bytes)
    ascii_text = "to be or not to be, that is the question\n" * 4
    tok = CharTokenizer.train(ascii_text)
    r = evaluate_tokens(model_for(tok.vocab_size), np.asarray(tok.encode(ascii_text)), tok)
    assert r.bytes == r.tokens and r.bits_per_byte == pytest.approx(r.loss / math.log(2))


def test_bits_per_byte_counts_the_bytes_of_bpe_tokens():
    tok = BPETokenizer.train(TEXT, 300)
    ids = tok.encode(TEXT)
    assert len(ids) < len(TEXT.encode("utf-8"))  # merges: fewer tokens than bytes
    r = evaluate_tokens(model_for(tok.vocab_size), np.asarray(ids), tok)
    assert r.bytes == len(tok.decode_bytes(ids[1:]))  # the text after the first token
    lengths = token_bytes(tok)
    assert lengths[:256].tolist() == [1] * 256 and lengths.max() > 1


def test_without_a_tokenizer_there_are_no_bytes():
    r = evaluate_tokens(model_for(20), np.arange(20) % 7)
    assert r.bytes is None and r.bits_per_byte is None
    assert set(r.to_dict()) >= {"loss", "perplexity", "bits_per_byte", "accuracy", "tokens"}


def test_the_same_numbers_on_every_backend(device):
    tok = CharTokenizer.train(TEXT)
    tokens = np.asarray(tok.encode(TEXT), dtype=np.uint16)
    ref = evaluate_tokens(model_for(tok.vocab_size), tokens, tok)
    got = evaluate_tokens(model_for(tok.vocab_size, device), tokens, tok)
    assert got.loss == pytest.approx(ref.loss, rel=1e-6) and got.accuracy == ref.accuracy
    assert get_xp(device) is not None


def test_bad_arguments():
    model = model_for(10)
    with pytest.raises(ValueError, match="at least 2"):
        evaluate_tokens(model, np.array([1]))
    with pytest.raises(ValueError, match="context_length"):
        evaluate_tokens(model, np.arange(10), context_length=9)
    with pytest.raises(ValueError, match="batch_size"):
        evaluate_tokens(model, np.arange(10), batch_size=0)


def run_command(module, argv):
    """A command module's configure + run, as `tinylm <command>` calls them."""
    parser = argparse.ArgumentParser()
    module.configure(parser)
    return module.run(parser.parse_args(argv))


def test_eval_command_scores_the_validation_split(tmp_path, capsys):
    from tinylm import checkpoint, eval_cli

    text_file = tmp_path / "text.txt"
    text_file.write_text(TEXT * 2, encoding="utf-8")
    tok = CharTokenizer.train(TEXT)
    model = model_for(tok.vocab_size)
    checkpoint.save(tmp_path / "ck", model, tokenizer=tok)
    argv = ["--checkpoint", str(tmp_path / "ck"), "--data", str(text_file), "--batch-size", "4"]
    assert run_command(eval_cli, [*argv, "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    ids = np.asarray(tok.encode(TEXT * 2))
    want = evaluate_tokens(model, ids[int(len(ids) * 0.9):], tok)  # the last 10%, as training
    assert got["tokens"] == want.tokens and got["bytes"] == want.bytes
    assert got["loss"] == pytest.approx(want.loss, rel=1e-6) and got["quantization"] is None
    assert run_command(eval_cli, [*argv, "--val-fraction", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "bits per byte" in out and "last 0.5" in out
