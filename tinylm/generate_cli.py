"""`tinylm generate`: sample text from a checkpoint (or a Hugging Face GPT-2), streamed.

    tinylm generate --checkpoint out/ --prompt "ROMEO:" --max-new-tokens 300
    tinylm generate --checkpoint out/ --prompt "ROMEO:" --temperature 0.8 --top-p 0.95 --seed 1
    tinylm generate --checkpoint out/ --prompt "ROMEO:" --num-samples 3 --seed 0
    tinylm generate --hf-gpt2 gpt2/ --prompt "The meaning of life is" --top-k 50
    tinylm generate --hf-gpt2 gpt2/ --prompt "The meaning of life is" --beam-width 4
    tinylm generate --checkpoint runs/sft --chat --lang en --prompt "reverse: lord" --temperature 0

Sampling applies, in this order: repetition penalty, temperature (0 = greedy),
top-k, top-p, min-p; then it draws from what is left (tinylm/sampling.py).
Text is printed as it is produced. A sample stops after --max-new-tokens, or at
the end-of-text token (--eos-id; by default the tokenizer's <|endoftext|>, if
it has one). With --beam-width > 1 the search is deterministic and its result
is printed at the end.
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import inspect
import math
import sys
from collections.abc import Iterable, Iterator


def add_model_source(parser: argparse.ArgumentParser) -> None:
    """--checkpoint DIR or --hf-gpt2 DIR: the model `_load` reads (generate and serve)."""
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", metavar="DIR",
                        help="a tinylm checkpoint directory, or a run directory of `tinylm "
                             "train` (then its best/ checkpoint, else last/)")
    source.add_argument("--hf-gpt2", metavar="DIR",
                        help="a Hugging Face GPT-2 directory instead: config.json, "
                             "model.safetensors, vocab.json and merges.txt (nothing is downloaded)")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = __doc__.split("\n", 1)[1]
    add_model_source(parser)
    parser.add_argument("--prompt", default="\n", metavar="TEXT",
                        help="the text to continue (default: a newline)")
    parser.add_argument("--max-new-tokens", type=int, default=200, metavar="N",
                        help="generate at most N tokens per sample (default: %(default)s)")
    parser.add_argument("--temperature", type=float, default=None, metavar="T",
                        help="divide the logits by T: below 1 is more conservative, above 1 "
                             "more random, 0 is greedy decoding (always the most likely "
                             "token) (default: 1.0)")
    parser.add_argument("--top-k", type=int, default=None, metavar="K",
                        help="sample only among the K most likely tokens (default: all)")
    parser.add_argument("--top-p", type=float, default=None, metavar="P",
                        help="nucleus sampling: only among the fewest most likely tokens whose "
                             "probabilities add up to P, in (0, 1] (default: off)")
    parser.add_argument("--min-p", type=float, default=None, metavar="P",
                        help="only among tokens at least P times as likely as the most likely "
                             "one, in [0, 1] (default: off)")
    parser.add_argument("--repetition-penalty", type=float, default=None, metavar="R",
                        help="make tokens already in the text less likely (CTRL's rule); "
                             "1 is off, 1.1-1.3 is typical (default: 1.0)")
    parser.add_argument("--seed", type=int, default=None, metavar="S",
                        help="random seed: the same seed gives the same text, on CPU and GPU "
                             "(default: different every run)")
    parser.add_argument("--num-samples", type=int, default=1, metavar="N",
                        help="print N samples of the same prompt, one after the other "
                             "(default: %(default)s)")
    parser.add_argument("--eos-id", type=int, default=None, metavar="ID",
                        help="stop a sample when it produces this token id (default: the "
                             "tokenizer's <|endoftext|> when it has one, else never)")
    parser.add_argument("--chat", action="store_true",
                        help="a chat model (`tinylm finetune`): the prompt is a user message, "
                             "the reply stops at <|end|>")
    parser.add_argument("--lang", choices=["en", "id"],
                        help="start with this language tag of a fine-tuned model (<en>, <id>)")
    parser.add_argument("--no-cache", action="store_true",
                        help="recompute the whole context for every token instead of using "
                             "the KV cache (same text, much slower; for comparison)")
    parser.add_argument("--beam-width", type=int, default=1, metavar="W",
                        help="W > 1: beam search with W beams instead of sampling; "
                             "deterministic, printed when done (default: %(default)s, sampling)")
    parser.add_argument("--length-penalty", type=float, default=None, metavar="A",
                        help="beam search only: rank finished beams by total log-probability "
                             "/ length**A; 0 favours short outputs, larger A longer ones "
                             "(default: 1.0)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"],
                        help="where to run the model: cpu (NumPy), cuda (CuPy on an NVIDIA "
                             "GPU) or auto (cuda when usable) (default: %(default)s)")


def run(args) -> int:
    from tinylm.backend import get_xp, resolve_device
    from tinylm.sampling import check_token_id

    _check_args(args)
    device = resolve_device(args.device)
    get_xp(device)  # fail now, with the install hint, if CUDA is not usable
    model, tokenizer = _load(args, device)
    prompt_ids = _encode(tokenizer, args.prompt)
    eos_id = args.eos_id
    if args.chat or args.lang:  # a fine-tuned chat model's format (tinylm/finetune/chat.py)
        from tinylm.finetune.cli import chat_prompt

        prompt_ids, end_id, args.prompt = chat_prompt(tokenizer, args.prompt, chat=args.chat,
                                                      lang=args.lang)
        eos_id = end_id if eos_id is None else eos_id
    if eos_id is None:
        eos_id = getattr(tokenizer, "special_tokens", {}).get("<|endoftext|>")
    if eos_id is not None:  # checked here too, to name the option
        check_token_id(eos_id, model.config.vocab_size, "--eos-id")
    if len(prompt_ids) > model.config.context_length:
        print(f"(the prompt has {len(prompt_ids)} tokens; the model sees the last "
              f"{model.config.context_length})", file=sys.stderr)
    if args.beam_width > 1:
        return _run_beam(args, model, tokenizer, prompt_ids, eos_id)
    return _run_sampling(args, model, tokenizer, prompt_ids, eos_id)


def _run_sampling(args, model, tokenizer, prompt_ids, eos_id) -> int:
    import numpy as np

    from tinylm.sampling import stream

    rng = np.random.default_rng(args.seed)  # one stream for all samples: each differs
    settings = dict(
        temperature=1.0 if args.temperature is None else args.temperature,
        top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
        repetition_penalty=1.0 if args.repetition_penalty is None else args.repetition_penalty,
    )
    for i in range(args.num_samples):
        if args.num_samples > 1:
            if i > 0:
                print()  # a blank line between samples
            print(f"--- sample {i + 1} of {args.num_samples} ---")
        steps = stream(model, [prompt_ids], args.max_new_tokens, eos_id=eos_id, seed=rng,
                       use_cache=not args.no_cache, **settings)
        with contextlib.closing(steps):  # stopping at eos leaves it unfinished: close it
            tokens = (int(step[0]) for step in steps)  # one row
            _print_stream(args.prompt, text_pieces(tokenizer, _until(tokens, eos_id)))
    return 0


def _run_beam(args, model, tokenizer, prompt_ids, eos_id) -> int:
    from tinylm.backend import to_numpy
    from tinylm.sampling import beam_search

    length_penalty = 1.0 if args.length_penalty is None else args.length_penalty
    ids, scores = beam_search(model, [prompt_ids], args.max_new_tokens,
                              beam_width=args.beam_width, length_penalty=length_penalty,
                              eos_id=eos_id, use_cache=not args.no_cache, return_scores=True)
    new = [int(t) for t in to_numpy(ids)[0, len(prompt_ids):]]
    _print_stream(args.prompt, text_pieces(tokenizer, _until(new, eos_id)))
    print(f"(beam search, width {args.beam_width}: score {scores[0]:.4f})", file=sys.stderr)
    return 0


# -- streaming text ---------------------------------------------------------------------


def text_pieces(tokenizer, tokens: Iterable[int]) -> Iterator[str]:
    """Turn token ids, as they arrive, into the new text each one completes.

    A byte-level BPE token may hold part of a UTF-8 character (an emoji can
    take three tokens), so decoding token by token would print U+FFFD for each
    part. An incremental UTF-8 decoder holds back an incomplete character until
    its last byte arrives; together the pieces equal `tokenizer.decode(all ids)`.
    """
    if not hasattr(tokenizer, "decode_bytes"):  # any other tokenizer: decode the growing list
        yield from _text_pieces_by_redecoding(tokenizer, tokens)
        return
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for token in tokens:
        piece = utf8.decode(tokenizer.decode_bytes([token]))
        if piece:
            yield piece
    tail = utf8.decode(b"", final=True)  # an incomplete character at the end: U+FFFD
    if tail:
        yield tail


def _text_pieces_by_redecoding(tokenizer, tokens: Iterable[int]) -> Iterator[str]:
    ids, shown = [], ""
    for token in tokens:
        ids.append(token)
        text = tokenizer.decode(ids)
        if not text.endswith("\ufffd") and text.startswith(shown):  # wait for a full character
            yield text[len(shown):]
            shown = text
    text = tokenizer.decode(ids)
    if text != shown:
        yield text[len(shown):] if text.startswith(shown) else text


def _until(tokens: Iterable[int], eos_id) -> Iterator[int]:
    """The tokens before the first eos_id (the end-of-text token is not printed)."""
    for token in tokens:
        if token == eos_id:
            return
        yield token


def _print_stream(prompt: str, pieces: Iterable[str]) -> None:
    out = sys.stdout
    out.write(prompt)
    out.flush()
    for piece in pieces:
        out.write(piece)
        out.flush()  # show each token as it is produced
    out.write("\n")
    out.flush()


# -- loading and checking ---------------------------------------------------------------


def _check_args(args) -> None:
    """Range checks, with the option's name in the message (one line via tinylm.cli)."""
    from tinylm.sampling import MIN_TEMPERATURE, check_temperature

    if args.checkpoint is None and args.hf_gpt2 is None:
        raise ValueError("give the model to sample from: --checkpoint DIR (a tinylm checkpoint) "
                         "or --hf-gpt2 DIR (a Hugging Face GPT-2 directory)")
    if not args.prompt:
        raise ValueError("--prompt is empty: give at least one character of text to continue")
    if args.max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if args.num_samples < 1:
        raise ValueError(f"--num-samples must be >= 1, got {args.num_samples}")
    if args.beam_width < 1:
        raise ValueError(f"--beam-width must be >= 1, got {args.beam_width}")
    if args.temperature is not None:
        check_temperature(args.temperature, "--temperature")
    if args.top_k is not None and args.top_k < 1:
        raise ValueError(f"--top-k must be >= 1, got {args.top_k}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.min_p is not None and not 0 <= args.min_p <= 1:
        raise ValueError(f"--min-p must be in [0, 1], got {args.min_p}")
    if args.repetition_penalty is not None:
        penalty = args.repetition_penalty
        if not MIN_TEMPERATURE <= penalty <= 1 / MIN_TEMPERATURE:  # NaN fails both
            raise ValueError(f"--repetition-penalty must be in [{MIN_TEMPERATURE:g}, "
                             f"{1 / MIN_TEMPERATURE:g}] (1 = off), got {penalty}")
    if args.length_penalty is not None and not math.isfinite(args.length_penalty):
        raise ValueError(f"--length-penalty must be a finite number, got {args.length_penalty}")
    if args.beam_width > 1:
        sampling_only = [flag for flag, value in (
            ("--temperature", args.temperature), ("--top-k", args.top_k),
            ("--top-p", args.top_p), ("--min-p", args.min_p),
            ("--repetition-penalty", args.repetition_penalty), ("--seed", args.seed),
        ) if value is not None]
        if sampling_only:
            raise ValueError(f"{', '.join(sampling_only)} only apply to sampling, not to "
                             "beam search (--beam-width > 1), which does not sample")
        if args.num_samples != 1:
            raise ValueError("--num-samples does not apply to beam search (--beam-width > 1): "
                             "it is deterministic")
    elif args.length_penalty is not None:
        raise ValueError("--length-penalty only applies to beam search (--beam-width > 1)")


def _checkpoint_in(path: str) -> str:
    """A checkpoint directory, or a run directory of `tinylm train`: then its best/
    checkpoint (lowest validation loss), else its last/ one; each found as
    `train --resume` finds it, through the ".old" a cut-off save leaves."""
    from tinylm.training.rundir import find_checkpoint

    found = find_checkpoint(path, ("best", "last"))
    return path if found is None else str(found)  # None: load() names what is missing


def _load(args, device):
    """(model, tokenizer) from --checkpoint or --hf-gpt2, on `device`."""
    if args.hf_gpt2 is not None:
        from tinylm.interop import load_hf_gpt2  # imported only when used: CLI start-up stays fast

        model, tokenizer = load_hf_gpt2(args.hf_gpt2, device=device)
        if tokenizer is None:
            raise FileNotFoundError(f"{args.hf_gpt2}: no vocab.json and merges.txt, so the "
                                    "prompt cannot be encoded (copy GPT-2's tokenizer files there)")
        return model, tokenizer
    from tinylm.checkpoint import load

    ckpt = load(_checkpoint_in(args.checkpoint), device=device)
    if ckpt.tokenizer is None:
        raise FileNotFoundError(f"{args.checkpoint}: the checkpoint has no tokenizer, so the "
                                "prompt cannot be encoded")
    return ckpt.model, ckpt.tokenizer


def _encode(tokenizer, text: str) -> list[int]:
    """The prompt's ids; special-token text such as <|endoftext|> becomes its id."""
    if "allowed_special" in inspect.signature(tokenizer.encode).parameters:
        return tokenizer.encode(text, allowed_special="all")
    return tokenizer.encode(text)
