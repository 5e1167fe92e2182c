"""`tinylm finetune` and `tinylm dpo` end to end on a tiny model (seconds): checkpoints,
LoRA's merged checkpoints and adapter store, exact resume, DPO's cached reference,
one-line errors."""

from __future__ import annotations

import json
from itertools import islice

import numpy as np
import pytest

from tinylm import GPT, GPTConfig, checkpoint
from tinylm.cli import main
from tinylm.data import bundled_text_path
from tinylm.finetune import bundled, chat_tokens, has_chat_tokens
from tinylm.finetune.dpo import REFERENCE_FILE
from tinylm.tokenizer import CharTokenizer

TINY = ["--set", "batch_size=4", "eval_interval=2", "eval_iters=1", "warmup_iters=1",
        "--no-progress"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny char-level base checkpoint and small slices of the bundled sets."""
    root = tmp_path_factory.mktemp("finetune")
    tok = CharTokenizer.train(bundled_text_path().read_text(encoding="utf-8"))
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, context_length=48, d_model=16,
                          n_layers=2, n_heads=2, bias=False, dropout=0.1), seed=0)
    checkpoint.save(root / "base", model, None, tok)
    out = {"base": root / "base"}
    for name, n in (("sft-train", 24), ("sft-test", 8), ("prefs-train", 24), ("prefs-test", 8)):
        with open(bundled(name), encoding="utf-8") as f:
            out[name] = root / f"{name}.jsonl"
            out[name].write_text("".join(islice(f, n)), encoding="utf-8")
    return out


def finetune(files, out, *extra, command="finetune", start=None):
    data = "sft" if command == "finetune" else "prefs"
    args = [command, "--checkpoint", str(start or files["base"]), "--data",
            str(files[f"{data}-train"]), "--val", str(files[f"{data}-test"]), "--out", str(out),
            "--score", str(files["sft-test"]), *TINY, *extra]
    assert main(args) == 0


def weights(path):
    return checkpoint.load(path).model.state_dict()


def same(a, b):
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def events(out, kind):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()
            if json.loads(line)["event"] == kind]


@pytest.mark.parametrize("extra", [[], ["--lora", "2"], ["--pack"]], ids=["full", "lora", "pack"])
def test_finetune_runs_and_resumes_exactly(files, tmp_path, extra, capsys):
    finetune(files, tmp_path / "a", "--max-iters", "4", *extra)
    text = capsys.readouterr().out
    assert "trainable:" in text and "score on" in text and "held-out loss" in text
    ckpt = checkpoint.load(tmp_path / "a" / "best")  # an ordinary checkpoint, merged for LoRA
    assert has_chat_tokens(ckpt.tokenizer) and ckpt.config.vocab_size == 71
    score = json.loads((tmp_path / "a" / "score.json").read_text())
    assert score["n"] == 8 and 0 <= score["accuracy"] <= 1
    assert [e["step"] for e in events(tmp_path / "a", "eval")] == [0, 2, 4]
    if "--lora" in extra:
        kept = sorted(p.name for p in (tmp_path / "a" / "adapters").iterdir())
        assert 1 <= len(kept) <= 2 and "step-00000004" in kept  # old steps pruned
    # 2 steps, then resumed to 4: bitwise the weights of the uninterrupted run
    finetune(files, tmp_path / "b", "--max-iters", "2", *extra)
    assert main(["finetune", "--resume", str(tmp_path / "b"), "--max-iters", "4",
                 "--no-progress"]) == 0
    same(weights(tmp_path / "b" / "last"), weights(tmp_path / "a" / "last"))


def test_lora_trains_adapters_and_new_rows_only(files, tmp_path):
    finetune(files, tmp_path / "r", "--max-iters", "2", "--lora", "2")
    base = weights(files["base"])
    tuned = weights(tmp_path / "r" / "last")
    # the MLPs are frozen (no adapters there by default); the old embedding rows are not
    # frozen (the embedding is trained for its new rows), the new rows moved
    for name in base:
        if ".mlp." in name or name.startswith(("ln_f", "pos_emb")):
            np.testing.assert_array_equal(tuned[name], base[name], err_msg=name)
    assert not np.allclose(tuned["blocks.0.attn.qkv.weight"], base["blocks.0.attn.qkv.weight"])


def test_dpo_runs_logs_rewards_and_resumes_exactly(files, tmp_path, capsys):
    finetune(files, tmp_path / "sft", "--max-iters", "2")
    for extra in ([], ["--lora", "2"]):
        a, b = tmp_path / f"a{len(extra)}", tmp_path / f"b{len(extra)}"
        finetune(files, a, "--max-iters", "4", *extra, command="dpo", start=tmp_path / "sft")
        assert "preference accuracy" in capsys.readouterr().out
        steps = events(a, "step")
        assert len(steps) == 4 and {"accuracy", "margin", "chosen_reward"} <= set(steps[0])
        ev = events(a, "eval")[-1]
        assert 0 <= ev["val_accuracy"] <= 1 and np.isfinite(ev["val_margin"])
        assert events(a, "eval")[0]["val_margin"] == 0  # the policy starts as the reference
        with np.load(a / REFERENCE_FILE) as ref:
            assert ref["train"].shape == (24, 2) and ref["val"].shape == (8, 2)
        finetune(files, b, "--max-iters", "2", *extra, command="dpo", start=tmp_path / "sft")
        assert main(["dpo", "--resume", str(b), "--max-iters", "4", "--no-progress"]) == 0
        same(weights(b / "last"), weights(a / "last"))


def test_errors_are_one_line(files, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    assert main(["finetune", "--checkpoint", str(files["base"]), "--data", str(bad),
                 "--out", str(tmp_path / "x"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"tinylm finetune: error: {bad}:1: no assistant message: nothing to train on"
    assert main(["dpo", "--checkpoint", str(files["base"]), "--out", str(tmp_path / "y"),
                 "--no-progress"]) == 2
    assert "no chat tokens" in capsys.readouterr().err
    assert main(["finetune", "--out", str(tmp_path / "z")]) == 2
    assert "--checkpoint DIR" in capsys.readouterr().err


def test_interrupt_saves_and_resumes(files, tmp_path, monkeypatch):
    """A KeyboardInterrupt after step 2 saves last/ at step 2; resuming it ends where an
    uninterrupted run ends."""
    from tinylm.finetune import cli

    finetune(files, tmp_path / "a", "--max-iters", "4")
    calls = {"n": 0}
    original = cli.FinetuneReporter.__call__

    def stop_after_two(self, event, info):
        original(self, event, info)
        if event == "step":
            calls["n"] += 1
            if calls["n"] == 2:
                raise KeyboardInterrupt

    monkeypatch.setattr(cli.FinetuneReporter, "__call__", stop_after_two)
    assert main(["finetune", "--checkpoint", str(files["base"]), "--data",
                 str(files["sft-train"]), "--val", str(files["sft-test"]), "--out",
                 str(tmp_path / "b"), "--max-iters", "4", *TINY]) == 130
    monkeypatch.setattr(cli.FinetuneReporter, "__call__", original)
    assert checkpoint.read_trainer_state(tmp_path / "b" / "last")["step"] == 2
    assert main(["finetune", "--resume", str(tmp_path / "b"), "--no-progress"]) == 0
    same(weights(tmp_path / "b" / "last"), weights(tmp_path / "a" / "last"))
    assert chat_tokens(checkpoint.load(tmp_path / "b" / "last").tokenizer).end == 68


def test_generate_chat_and_lang(files, tmp_path, capsys):
    """`tinylm generate --chat --lang`: the prompt as a user message after the tag, the
    reply stopped at <|end|>; a model without chat tokens is refused in one line."""
    from tinylm.finetune import render_prompt
    from tinylm.finetune.cli import chat_prompt

    finetune(files, tmp_path / "sft", "--max-iters", "2")
    tok = checkpoint.load(tmp_path / "sft" / "best").tokenizer
    ids, end, shown = chat_prompt(tok, "reverse: lord", chat=True, lang="en")
    expected = render_prompt([{"role": "user", "content": "reverse: lord"}], tok, lang="en")
    assert ids == expected.tolist() and end == chat_tokens(tok).end and shown == "reverse: lord\n"
    ids, end, _ = chat_prompt(tok, "To be", chat=False, lang="id")
    assert ids == [chat_tokens(tok).id, *tok.encode("To be")] and end is None
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(tmp_path / "sft"), "--chat", "--lang", "en",
                 "--prompt", "reverse: lord", "--temperature", "0",
                 "--max-new-tokens", "6"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("reverse: lord\n")
    assert main(["generate", "--checkpoint", str(files["base"]), "--chat",
                 "--prompt", "hi"]) == 2
    assert "no chat tokens" in capsys.readouterr().err
