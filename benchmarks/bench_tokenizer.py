"""Time tinylm's BPE tokenizer against its simple reference and against Hugging Face
`tokenizers` and tiktoken (when installed), single-threaded. Prints a Markdown table.

    python benchmarks/bench_tokenizer.py            # about half a minute
    python benchmarks/bench_tokenizer.py --quick    # skip the slow reference trainer

Training: the full bundled Tiny Shakespeare (1.1 MB) to vocab 4096. The reference
trainer recounts every pair per merge, so it is timed at vocab 512 (fast trainer too,
for the ratio). Encoding: the last 10% of the corpus (held out), with tokenizers trained
on the first 90% at vocab 4096; tinylm's chunk cache is emptied before every run, so the
figure includes encoding each new chunk. Times are medians of a few runs; the machine
is shared and noisy, so compare rows of one run, not runs.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

from tinylm.tokenizer import BPETokenizer
from tinylm.tokenizer.bpe import encode_chunk_simple, split_text

# One thread for the Rust libraries too; they are imported later, inside the functions.
os.environ["RAYON_NUM_THREADS"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

CORPUS_PATH = Path(__file__).resolve().parent.parent / "tinylm" / "data" / "tinyshakespeare.txt"


def median_time(fn, repeats, setup=None):
    """Median wall time of `fn()` over `repeats` runs (`setup()` runs untimed before each)."""
    times = []
    for _ in range(repeats):
        if setup is not None:
            setup()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def hf_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    return tok


def hf_train(text, vocab_size):
    from tokenizers import pre_tokenizers, trainers

    tok = hf_tokenizer()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([text], trainer=trainer)
    return tok


def have(module):
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="skip the slow reference trainer")
    parser.add_argument("--repeats", type=int, default=3, help="runs per training figure")
    args = parser.parse_args(argv)

    corpus = CORPUS_PATH.read_text(encoding="utf-8")
    corpus_mb = len(corpus.encode("utf-8")) / 1e6
    split = int(len(corpus) * 0.9)
    train_text, held_out = corpus[:split], corpus[split:]
    held_mb = len(held_out.encode("utf-8")) / 1e6
    rows = []  # (task, implementation, setting, seconds, MB/s)

    # -- training -------------------------------------------------------------------
    for pattern in ("gpt4", "gpt2"):
        t = median_time(lambda p=pattern: BPETokenizer.train(corpus, 4096, p), args.repeats)
        rows.append(("train", "tinylm fast trainer", f"vocab 4096, {pattern} split", t,
                     corpus_mb / t))
    if have("tokenizers"):
        t = median_time(lambda: hf_train(corpus, 4096), args.repeats)
        rows.append(("train", "HF tokenizers (Rust)", "vocab 4096, gpt2 split", t, corpus_mb / t))
    if not args.quick:
        t = median_time(lambda: BPETokenizer.train(corpus, 512), args.repeats)
        rows.append(("train", "tinylm fast trainer", "vocab 512, gpt4 split", t, corpus_mb / t))
        t = median_time(lambda: BPETokenizer.train(corpus, 512, trainer="simple"), 1)
        rows.append(("train", "tinylm simple reference trainer", "vocab 512, gpt4 split", t,
                     corpus_mb / t))

    # -- encoding held-out text -----------------------------------------------------
    tok = BPETokenizer.train(train_text, 4096)
    t = median_time(lambda: tok.encode(held_out), 7, setup=tok._cache.clear)
    rows.append(("encode", "tinylm (cold chunk cache)", "vocab 4096, gpt4 split", t, held_mb / t))
    tok.encode(held_out)
    t = median_time(lambda: tok.encode(held_out), 7)
    rows.append(("encode", "tinylm (warm chunk cache)", "vocab 4096, gpt4 split", t, held_mb / t))

    def encode_simple():  # no cache, encode_chunk_simple: the minbpe way
        return [i for chunk in split_text(held_out, tok.pattern)
                for i in encode_chunk_simple(list(chunk.encode("utf-8")), tok.merges)]

    assert encode_simple() == tok.encode(held_out)
    t = median_time(encode_simple, 3)
    rows.append(("encode", "tinylm simple (no cache, encode_chunk_simple)",
                 "vocab 4096, gpt4 split", t, held_mb / t))
    if have("tiktoken"):
        import tiktoken

        enc = tiktoken.Encoding(name="tinylm-bench", pat_str=tok.pattern,
                                mergeable_ranks={b: i for i, b in tok.vocab.items()},
                                special_tokens={})
        assert enc.encode_ordinary(held_out) == tok.encode(held_out)
        t = median_time(lambda: enc.encode_ordinary(held_out), 7)
        rows.append(("encode", "tiktoken (Rust), same ranks", "vocab 4096, gpt4 split", t,
                     held_mb / t))
    if have("tokenizers"):
        hf = hf_train(train_text, 4096)
        t = median_time(lambda: hf.encode(held_out), 7)
        rows.append(("encode", "HF tokenizers (Rust), one string", "vocab 4096, gpt2 split", t,
                     held_mb / t))

    print(f"Tiny Shakespeare {corpus_mb:.2f} MB; held-out text {held_mb * 1000:.0f} kB; "
          f"Python {platform.python_version()}, {os.cpu_count()} cores, single-threaded\n")
    print("| task | implementation | setting | time (s) | MB/s |")
    print("|---|---|---|---|---|")
    for task, impl, setting, seconds, mbps in rows:
        print(f"| {task} | {impl} | {setting} | {seconds:.3f} | {mbps:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
