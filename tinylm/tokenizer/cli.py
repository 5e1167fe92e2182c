"""Train a BPE or character tokenizer, encode text to ids, or decode ids to text.

    tinylm tokenizer train --vocab-size 4096 --special "<|endoftext|>" --out tok.json
    tinylm tokenizer encode --tokenizer tok.json "To be, or not to be"
    tinylm tokenizer encode --tokenizer tok.json --show --input notes.txt
    tinylm tokenizer decode --tokenizer tok.json 405 308 44
"""

from __future__ import annotations

import argparse
import sys
import time
from functools import partial
from pathlib import Path

from . import BPETokenizer, CharTokenizer, load, show_tokens

BUNDLED_TEXT = Path(__file__).resolve().parent.parent / "data" / "tinyshakespeare.txt"
ALLOWED_SPECIAL_WORDS = ("none_raise", "all", "none")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = __doc__.split("\n", 1)[1]
    actions = parser.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True

    train = actions.add_parser(
        "train", help="learn a tokenizer from a text file and save it as JSON",
        description="Learn BPE merges (or a character vocabulary) from a UTF-8 text file.")
    train.add_argument("--input", default=str(BUNDLED_TEXT), metavar="FILE",
                       help="UTF-8 text to train on (default: the bundled Tiny Shakespeare)")
    train.add_argument("--out", default="tokenizer.json", metavar="FILE",
                       help="where to write the tokenizer (default: %(default)s)")
    train.add_argument("--type", choices=["bpe", "char"], default="bpe",
                       help="byte-level BPE or one token per character (default: %(default)s)")
    train.add_argument("--vocab-size", type=int, default=4096, metavar="N",
                       help="BPE only: 256 byte tokens + N-256 merges; special tokens come "
                            "on top (default: %(default)s)")
    train.add_argument("--pattern", default="gpt4", metavar="PATTERN",
                       help="BPE only: pre-split regex: gpt4, gpt2, none (no pre-split; slow "
                            "on large texts) or a regex of your own (default: %(default)s)")
    train.add_argument("--special", action="append", default=[], metavar="TOKEN",
                       help="BPE only: a special token such as '<|endoftext|>'; repeat for more")
    train.add_argument("--trainer", choices=["fast", "simple"], default="fast",
                       help="BPE only: the incremental trainer or the slow reference one; "
                            "both learn the same merges (default: %(default)s)")
    train.add_argument("--no-progress", action="store_true", help="do not show a progress bar")

    encode = actions.add_parser(
        "encode", help="print the token ids of a text",
        description="Encode text to token ids (printed on one line, separated by spaces).")
    _add_tokenizer_option(encode)
    encode.add_argument("text", nargs="?",
                        help="the text to encode (default: read --input, else standard input)")
    encode.add_argument("--input", metavar="FILE", help="read the text from this UTF-8 file")
    encode.add_argument("--allowed-special", action="append", metavar="VALUE",
                        help="what to do with special-token text: none_raise (an error; the "
                             "default), all, none (encode it as ordinary text), or a special "
                             "token to allow (repeat for more)")
    encode.add_argument("--show", action="store_true",
                        help="print the text with coloured token boundaries instead of ids")

    decode = actions.add_parser(
        "decode", help="print the text of token ids",
        description="Decode token ids to text (invalid UTF-8 is shown as U+FFFD).")
    _add_tokenizer_option(decode)
    decode.add_argument("ids", nargs="*", type=int,
                        help="token ids (default: read them from --input, else standard input)")
    decode.add_argument("--input", metavar="FILE",
                        help="read whitespace-separated token ids from this file")


def _add_tokenizer_option(parser):
    parser.add_argument("--tokenizer", required=True, metavar="PATH",
                        help="a tokenizer JSON written by `tinylm tokenizer train`, or a "
                             "directory holding GPT-2's vocab.json and merges.txt")


def run(args) -> int:
    return {"train": run_train, "encode": run_encode, "decode": run_decode}[args.action](args)


def run_train(args) -> int:
    from tinylm.cli import check_output_file
    from tinylm.fileio import naming

    check_output_file(args.out, "--out")  # before the training, not after it
    text = _read_text(args.input)
    start = time.perf_counter()
    if args.type == "char":
        tok = CharTokenizer.train(text)
    else:
        from tqdm import tqdm

        progress = None if args.no_progress else partial(tqdm, desc="merges", unit="merge",
                                                         file=sys.stderr)
        pattern = None if args.pattern == "none" else args.pattern
        tok = BPETokenizer.train(text, args.vocab_size, pattern, args.special,
                                 trainer=args.trainer, progress=progress)
    seconds = time.perf_counter() - start
    with naming(args.out):
        tok.save(args.out)
    n_tokens = len(tok.encode(text, allowed_special="all") if args.type == "bpe" else text)
    print(f"{tok!r} trained in {seconds:.2f} s; the training text is "
          f"{len(text.encode('utf-8')) / n_tokens:.2f} bytes per token; wrote {args.out}")
    return 0


def run_encode(args) -> int:
    tok = _load_tokenizer(args.tokenizer)
    text = args.text if args.text is not None else _read_text(args.input)
    kwargs = {}
    if isinstance(tok, BPETokenizer):
        kwargs["allowed_special"] = _allowed_special(args.allowed_special)
    elif args.allowed_special:
        raise ValueError("--allowed-special only applies to BPE tokenizers")
    if args.show:
        print(show_tokens(tok, text, **kwargs))
    else:
        print(" ".join(map(str, tok.encode(text, **kwargs))))
    return 0


def run_decode(args) -> int:
    tok = _load_tokenizer(args.tokenizer)
    ids = args.ids
    if not ids:
        words = _read_text(args.input).split()
        try:
            ids = [int(w) for w in words]
        except ValueError:
            raise ValueError("token ids must be whitespace-separated integers") from None
    print(tok.decode(ids))
    return 0


def _allowed_special(values):
    """The --allowed-special options -> encode's `allowed_special` argument."""
    if not values:
        return "none_raise"
    if len(values) == 1 and values[0] in ALLOWED_SPECIAL_WORDS:
        return values[0]
    if any(v in ALLOWED_SPECIAL_WORDS for v in values):
        raise ValueError("--allowed-special: give one of none_raise, all, none, "
                         "or one or more special tokens, not both")
    return set(values)


def _load_tokenizer(path):
    path = Path(path)
    if path.is_dir():
        return BPETokenizer.from_gpt2(path / "vocab.json", path / "merges.txt")
    return load(path)


def _read_text(path) -> str:
    """The text of a UTF-8 file, or standard input when `path` is None."""
    if path is None:
        return sys.stdin.read()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
