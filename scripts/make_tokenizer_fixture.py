"""Write the tokenizer test fixtures under tests/fixtures/tokenizer/ (run by hand).

    pip install tokenizers tiktoken
    python scripts/make_tokenizer_fixture.py

Two independent programs produce the expected ids the tests compare tinylm against:

1. Hugging Face `tokenizers` trains a small GPT-2-style byte-level BPE and saves it in
   GPT-2's format (gpt2/vocab.json, gpt2/merges.txt); its encodings of SAMPLES go to
   gpt2/expected.json. `BPETokenizer.from_gpt2` must reproduce them.
2. tinylm trains a small BPE (tinylm_bpe.json) and tiktoken, given the same ranks and
   pattern, encodes SAMPLES (tiktoken_expected.json), so the tests need no tiktoken.

Both use slices of the bundled Tiny Shakespeare; the files stay a few kB.
"""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "tokenizer"
CORPUS = ROOT / "tinylm" / "data" / "tinyshakespeare.txt"

TRAIN_CHARS = 200_000  # the first 200k characters train; SAMPLES come from elsewhere
HF_VOCAB_SIZE = 512  # 1 special + 256 bytes + 255 merges
TINYLM_VOCAB_SIZE = 512  # 256 bytes + 256 merges (+ 1 special)
SPECIAL = "<|endoftext|>"


def samples(corpus: str) -> list[str]:
    held_out = corpus[-3000:]
    return [
        "",
        "To be, or not to be, that is the question:",
        held_out,
        held_out[:500] + SPECIAL + held_out[500:1000],
        "I'LL don't WE'RE you've they'd Shouldn't it's",
        "1234567 + 3.14159 = 42, and 2024-01-01",
        "a   b\n\n\n  c  \t\td \r\n e\n",
        "   leading and trailing spaces   ",
        "héllo wörld, naïve café; Ünïcödé",
        "你好，世界。日本語のテキスト。한국어 텍스트",
        "Привет, мир! Γειά σου Κόσμε! مرحبا بالعالم",
        "emoji 👋🏽 family 👨‍👩‍👧 flags 🇫🇷🇯🇵 and ✨",
        "control \x00\x01\x02\x1b[31m bell\x07 del\x7f nbsp\xa0 zwj\u200d",
        "<|endoftext|> at the start, and at the end <|endoftext|>",
    ]


def write_samples(path: Path, expected: list[dict]) -> None:
    """A JSON list with one {"text", "ids"} sample per line."""
    lines = (json.dumps(sample, ensure_ascii=False) for sample in expected)
    path.write_text("[\n" + ",\n".join(lines) + "\n]\n", encoding="utf-8")


def make_hf_gpt2(corpus: str, texts: list[str]) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    # GPT-2's setup: byte-level pre-split with GPT-2's regex, no added prefix space
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=HF_VOCAB_SIZE, special_tokens=[SPECIAL], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([corpus[:TRAIN_CHARS]], trainer=trainer)
    out = OUT / "gpt2"
    out.mkdir(parents=True, exist_ok=True)
    tok.model.save(str(out))  # writes vocab.json and merges.txt in GPT-2's format
    expected = [{"text": t, "ids": tok.encode(t).ids} for t in texts]
    write_samples(out / "expected.json", expected)
    print(f"wrote {out}: vocab {tok.get_vocab_size()}, {len(texts)} encodings")


def make_tinylm_tiktoken(corpus: str, texts: list[str]) -> None:
    import tiktoken

    from tinylm.tokenizer import BPETokenizer

    tok = BPETokenizer.train(corpus[:TRAIN_CHARS], TINYLM_VOCAB_SIZE, "gpt4", [SPECIAL])
    tok.save(OUT / "tinylm_bpe.json")
    enc = tiktoken.Encoding(
        name="tinylm-fixture", pat_str=tok.pattern,
        mergeable_ranks={token: idx for idx, token in tok.vocab.items()},
        special_tokens=tok.special_tokens,
    )
    expected = [{"text": t, "ids": enc.encode(t, allowed_special="all")} for t in texts]
    write_samples(OUT / "tiktoken_expected.json", expected)
    print(f"wrote {OUT / 'tinylm_bpe.json'} and tiktoken's ids for {len(texts)} texts")


if __name__ == "__main__":
    corpus = CORPUS.read_text(encoding="utf-8")
    OUT.mkdir(parents=True, exist_ok=True)
    texts = samples(corpus)
    make_hf_gpt2(corpus, texts)
    make_tinylm_tiktoken(corpus, texts)
