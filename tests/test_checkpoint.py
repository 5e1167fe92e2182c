"""Checkpoints: round trip, atomic replacement, clear errors, GPU -> CPU, no pickle."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from tinylm import backend, checkpoint
from tinylm.fileio import FileFormatError
from tinylm.model import GPT, GPTConfig
from tinylm.nn import SoftmaxCrossEntropy
from tinylm.optim import AdamW
from tinylm.tokenizer import BPETokenizer, CharTokenizer

CFG = GPTConfig(vocab_size=20, context_length=8, d_model=16, n_layers=2, n_heads=2)
TOK = CharTokenizer("abcdefghijklmnopqrst")


def trained(seed=0, device="cpu", config=CFG):
    """A model and an AdamW that took two steps (so the moments are not zero)."""
    model = GPT(config, seed=seed, device=device)
    opt = AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    loss_fn = SoftmaxCrossEntropy()
    rng = np.random.default_rng(seed)
    xp = model.xp
    for _ in range(2):
        x = backend.to_device(rng.integers(0, config.vocab_size, (2, 8)), xp)
        model.zero_grad()
        loss_fn.forward(model.forward(x), x)
        model.backward(loss_fn.backward())
        opt.step()
    return model, opt


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_round_trip(tmp_path):
    model, opt = trained()
    state = {"step": 7, "best_val_loss": 1.5, "rng": np.random.default_rng(3).bit_generator.state}
    path = checkpoint.save(tmp_path / "ck", model, opt, TOK, state)
    assert sorted(os.listdir(path)) == ["config.json", "model.npz", "optimizer.npz",
                                        "tokenizer.json", "trainer.json"]
    meta = json.loads((path / "config.json").read_text())
    assert meta["format"] == "tinylm-checkpoint" and meta["version"] == 1

    ck = checkpoint.load(path)
    assert ck.config == CFG and same_weights(ck.model.state_dict(), model.state_dict())
    assert ck.tokenizer.chars == TOK.chars and ck.trainer_state == state
    saved = opt.state_dict()
    assert ck.optimizer_state["t"] == saved["t"] == 2
    assert ck.optimizer_state["lr"] == saved["lr"] and ck.optimizer_state["betas"] == saved["betas"]
    assert same_weights(ck.optimizer_state["m"], saved["m"])
    assert same_weights(ck.optimizer_state["v"], saved["v"])
    fresh = AdamW(ck.model.parameters())
    fresh.load_state_dict(ck.optimizer_state)  # what a resumed run does
    assert fresh.t == 2 and fresh.weight_decay == 0.1


def test_optional_parts_and_float64(tmp_path):
    model = GPT(CFG, dtype="float64")
    ck = checkpoint.load(checkpoint.save(tmp_path / "ck", model))
    assert ck.tokenizer is None and ck.optimizer_state is None and ck.trainer_state is None
    assert ck.model.dtype == np.float64
    assert same_weights(ck.model.state_dict(), model.state_dict())


def test_bpe_tokenizer_round_trip(tmp_path):
    tok = BPETokenizer.train("low lower lowest " * 20, 262, special_tokens=["<|endoftext|>"])
    cfg = GPTConfig(vocab_size=263, context_length=8, d_model=8, n_layers=1, n_heads=1)
    ck = checkpoint.load(checkpoint.save(tmp_path / "ck", GPT(cfg), tokenizer=tok))
    assert ck.tokenizer.merges == tok.merges and ck.tokenizer.special_tokens == tok.special_tokens


def test_gpu_checkpoint_loads_without_cupy(tmp_path, fake_cuda):
    model, opt = trained(device="cuda")
    assert backend.xp_of(next(model.parameters())[1]) is fake_cuda
    path = checkpoint.save(tmp_path / "ck", model, opt, TOK, {"step": 2})
    expected = model.state_dict()
    with backend.use_cupy(None):  # a machine without CuPy
        ck = checkpoint.load(path, device="cpu")
        assert same_weights(ck.model.state_dict(), expected)
        assert isinstance(ck.optimizer_state["m"]["tok_emb.weight"], np.ndarray)
        with pytest.raises(RuntimeError, match="needs CuPy"):
            checkpoint.load(path, device="cuda")


# -- atomicity ------------------------------------------------------------------------


def test_a_crash_mid_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ck"
    old_model, old_opt = trained(seed=0)
    checkpoint.save(path, old_model, old_opt, TOK, {"step": 1})
    new_model, new_opt = trained(seed=1)

    real_write = checkpoint._write_npz

    def crash_on_optimizer(file, arrays):
        if file.name == "optimizer.npz":
            with open(file, "wb") as f:
                f.write(b"PK\x03\x04half")  # a torn write
            raise OSError("disk full")
        real_write(file, arrays)

    monkeypatch.setattr(checkpoint, "_write_npz", crash_on_optimizer)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save(path, new_model, new_opt, TOK, {"step": 2})
    ck = checkpoint.load(path)  # still the old one, complete
    assert ck.trainer_state == {"step": 1}
    assert same_weights(ck.model.state_dict(), old_model.state_dict())

    monkeypatch.setattr(checkpoint, "_write_npz", real_write)
    checkpoint.save(path, new_model, new_opt, TOK, {"step": 2})  # cleans up the torn .tmp
    assert checkpoint.load(path).trainer_state == {"step": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_a_crash_between_the_renames_is_recovered(tmp_path, monkeypatch):
    path = tmp_path / "ck"
    old_model, _ = trained(seed=0)
    checkpoint.save(path, old_model, trainer_state={"step": 1})
    new_model, _ = trained(seed=1)

    real_replace = os.replace

    def crash_on_second_rename(src, dst):
        # (every file write also ends in a rename, inside ck.tmp/: those go through)
        if Path(dst) == path:  # ck -> ck.old done, ck.tmp -> ck not yet
            raise OSError("power cut")
        real_replace(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", crash_on_second_rename)
    with pytest.raises(OSError, match="power cut"):
        checkpoint.save(path, new_model, trainer_state={"step": 2})
    monkeypatch.setattr(checkpoint.os, "replace", real_replace)
    assert not path.exists()
    ck = checkpoint.load(path)  # falls back to ck.old: the previous checkpoint
    assert ck.trainer_state == {"step": 1} and checkpoint.is_checkpoint(path)
    assert same_weights(ck.model.state_dict(), old_model.state_dict())

    checkpoint.save(path, new_model, trainer_state={"step": 3})
    assert checkpoint.load(path).trainer_state == {"step": 3}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_save_refuses_to_replace_a_directory_that_is_not_a_checkpoint(tmp_path):
    precious = tmp_path / "notes"
    precious.mkdir()
    (precious / "thesis.txt").write_text("years of work")
    with pytest.raises(ValueError, match="refusing to overwrite .*notes"):
        checkpoint.save(precious, GPT(CFG))
    assert (precious / "thesis.txt").read_text() == "years of work"


# -- clear errors, each naming the file -------------------------------------------------


@pytest.fixture
def saved(tmp_path):
    model, opt = trained()
    return checkpoint.save(tmp_path / "ck", model, opt, TOK, {"step": 2})


def test_missing_checkpoint_and_missing_files(tmp_path, saved):
    with pytest.raises(FileNotFoundError, match="checkpoint not found: .*nowhere"):
        checkpoint.load(tmp_path / "nowhere")
    (saved / "optimizer.npz").unlink()
    with pytest.raises(FileNotFoundError, match="optimizer.npz: missing"):
        checkpoint.load(saved)
    (saved / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json: missing"):
        checkpoint.load(saved)


@pytest.mark.parametrize("name", ["model.npz", "optimizer.npz"])
def test_truncated_npz(saved, name):
    raw = (saved / name).read_bytes()
    (saved / name).write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match=f"{name}: damaged or truncated"):
        checkpoint.load(saved)


def test_corrupted_npz_bytes_fail_the_crc(saved):
    raw = bytearray((saved / "model.npz").read_bytes())
    raw[len(raw) // 3] ^= 0xFF  # inside some array's data
    (saved / "model.npz").write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="model.npz: damaged or truncated"):
        checkpoint.load(saved)


def test_not_an_npz_and_no_pickle(saved):
    (saved / "model.npz").write_bytes(b"garbage, not a zip")
    with pytest.raises(ValueError, match="model.npz: damaged .*not an .npz"):
        checkpoint.load(saved)
    # an object array would need pickle to load: refused, never executed
    arrays = dict(GPT(CFG).state_dict())
    arrays["tok_emb.weight"] = np.array([{"evil": 1}], dtype=object)
    np.savez(saved / "model.npz", **arrays)
    with pytest.raises(FileFormatError, match="model.npz: array 'tok_emb.weight' has dtype "
                       "object: .*pickle, which tinylm never loads"):
        checkpoint.load(saved)


@pytest.mark.parametrize("name", ["config.json", "trainer.json", "tokenizer.json"])
def test_bad_json(saved, name):
    (saved / name).write_text('{"format": "tinylm-check')
    with pytest.raises(ValueError, match=f"{name}: .* is not valid JSON"):
        checkpoint.load(saved)


def test_json_goes_through_fileio(saved):
    """Regression: checkpoints read and write JSON with tinylm.fileio, so an ambiguous
    file (a key twice) is refused, and a save leaves no temporary file behind."""
    assert sorted(p.name for p in saved.iterdir()) == [
        "config.json", "model.npz", "optimizer.npz", "tokenizer.json", "trainer.json"]
    (saved / "trainer.json").write_text('{"step": 1, "step": 2}')
    with pytest.raises(ValueError, match="trainer.json: .*duplicate key 'step'"):
        checkpoint.load(saved)


def test_unknown_format_version(saved):
    meta = json.loads((saved / "config.json").read_text())
    meta["version"] = 99
    (saved / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="config.json: checkpoint format version 99 is not"):
        checkpoint.load(saved)
    (saved / "config.json").write_text(json.dumps({"model_type": "gpt2"}))  # someone else's
    with pytest.raises(ValueError, match="config.json: not a tinylm checkpoint"):
        checkpoint.load(saved)


def test_weights_that_do_not_match_the_config(tmp_path, saved):
    other = GPTConfig(vocab_size=20, context_length=8, d_model=32, n_layers=2, n_heads=2)
    np.savez(saved / "model.npz", **GPT(other).state_dict())
    with pytest.raises(ValueError, match="model.npz: shape mismatch for tok_emb.weight"):
        checkpoint.load(saved)
    deeper = GPTConfig(vocab_size=20, context_length=8, d_model=16, n_layers=3, n_heads=2)
    np.savez(saved / "model.npz", **GPT(deeper).state_dict())
    with pytest.raises(ValueError, match="model.npz: the arrays do not match the model "
                       "of config.json: missing none; unexpected .blocks.2"):
        checkpoint.load(saved)


def test_optimizer_state_of_another_model(tmp_path, saved):
    other = GPTConfig(vocab_size=20, context_length=8, d_model=32, n_layers=2, n_heads=2)
    _, opt = trained(config=other)
    donor = checkpoint.save(tmp_path / "other", GPT(other), opt)
    (saved / "optimizer.npz").write_bytes((donor / "optimizer.npz").read_bytes())
    with pytest.raises(ValueError, match=r"optimizer.npz: shape mismatch for m/tok_emb.weight: "
                       r"the file has \(20, 32\), config.json implies \(20, 16\)"):
        checkpoint.load(saved)


def test_tokenizer_larger_than_the_model(saved):
    big = CharTokenizer("abcdefghijklmnopqrstuvwxyz")
    (saved / "tokenizer.json").write_text(json.dumps(big.to_dict()))
    with pytest.raises(ValueError, match="tokenizer.json: the tokenizer has 26 ids"):
        checkpoint.load(saved)


def test_trainer_state_must_be_json(tmp_path):
    with pytest.raises(ValueError, match="trainer_state cannot be saved as JSON"):
        checkpoint.save(tmp_path / "ck", GPT(CFG), trainer_state={"best": float("nan")})
    assert not (tmp_path / "ck").exists()


def test_save_never_goes_through_a_symlink_and_leaves_no_tmp(tmp_path):
    """A `last` that is a link to elsewhere is refused before anything is written or
    removed, and neither the link nor its target is touched."""
    model = GPT(GPTConfig(vocab_size=5, context_length=4, d_model=4, n_layers=1, n_heads=1))
    elsewhere = tmp_path / "elsewhere"
    checkpoint.save(elsewhere, model)
    before = sorted(p.name for p in elsewhere.iterdir())
    for name in ("last", "last.old", "last.tmp"):
        link = tmp_path / "run" / name
        link.parent.mkdir(exist_ok=True)
        link.symlink_to(elsewhere, target_is_directory=True)
        with pytest.raises(ValueError, match="symbolic link"):
            checkpoint.save(tmp_path / "run" / "last", model)
        link.unlink()
    assert sorted(p.name for p in elsewhere.iterdir()) == before
    assert not list((tmp_path / "run").iterdir())


def test_a_failed_write_removes_the_half_written_checkpoint(tmp_path, monkeypatch):
    model = GPT(GPTConfig(vocab_size=5, context_length=4, d_model=4, n_layers=1, n_heads=1))

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "write_json", disk_full)
    with pytest.raises(OSError, match="No space left"):
        checkpoint.save(tmp_path / "ck", model)
    assert not list(tmp_path.iterdir())  # no ck.tmp/, no ck/
