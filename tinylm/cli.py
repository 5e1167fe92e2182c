"""The `tinylm` command line (also `python -m tinylm`).

Each subcommand lives in its own module with two functions:
`configure(parser)` adds its options and `run(args) -> int` does the work.
Bad arguments, bad files and OS errors give a one-line error (exit code 2),
never a traceback (`--debug` or TINYLM_DEBUG=1 shows the traceback behind one).
Ctrl-C exits with 130, SIGTERM with 143 and SIGHUP with 129 (128 + the signal's
number, the shell's convention), after the command's cleanup: they raise, as
Ctrl-C does, so no temporary file is left behind (tinylm/training/signals.py).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

# name -> (module, one-line help). Modules are imported only when used, so
# `tinylm --help` stays fast and one command's dependencies never slow another.
COMMANDS = {
    "train": ("tinylm.train", "train a GPT on a text file (default: the bundled Tiny Shakespeare)"),
    "finetune": ("tinylm.finetune.sft_cli", "fine-tune a checkpoint on chats (SFT; LoRA or full)"),
    "dpo": ("tinylm.finetune.dpo_cli", "tune a chat checkpoint on preference pairs (DPO)"),
    "generate": ("tinylm.generate_cli", "sample text from a checkpoint (or a Hugging Face GPT-2)"),
    "eval": ("tinylm.eval_cli", "loss, bits per byte and accuracy on the whole validation split"),
    "gradcheck": ("tinylm.gradcheck", "check every layer's backward against finite differences"),
    "bench": ("tinylm.bench", "time full training steps (tokens/s, FLOP/s, memory)"),
    "quantize": ("tinylm.quantize_cli", "store a checkpoint's weights as int8 or int4"),
    "tokenizer": ("tinylm.tokenizer.cli", "train a BPE tokenizer, encode or decode text"),
    "serve": ("tinylm.serve.cli", "a local web page that generates and shows why each token won"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only `command`'s module is imported and asked for its options."""
    parser = argparse.ArgumentParser(
        prog="tinylm",
        description="tinylm: a GPT engine in NumPy with hand-written backward passes.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            module = importlib.import_module(module_name)
            module.configure(p)
            p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv or bool(os.environ.get("TINYLM_DEBUG"))
    argv = [a for a in argv if a != "--debug"]
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command if command in COMMANDS else None).parse_args(argv)
    from tinylm.training.signals import stop_signals_raise  # signals only: a light import

    try:
        with stop_signals_raise():
            return int(args._run(args) or 0)
    except KeyboardInterrupt as exc:
        code = getattr(exc, "exit_code", 130)  # StopRequested knows its signal
        what = "interrupted" if code == 130 else f"stopped by {exc.signal_name}"
        print(f"tinylm {args.command}: {what}", file=sys.stderr)
        return code
    except MemoryError:
        if debug:
            raise
        print(f"tinylm {args.command}: error: out of memory (a smaller model, batch or "
              "file may fit)", file=sys.stderr)
        return 2
    except (ValueError, TypeError, OSError, RuntimeError) as exc:
        # An expected failure (bad value or file, missing file, full disk, no GPU):
        # one line, not a traceback. --debug or TINYLM_DEBUG=1 re-raises, for when
        # the "expected failure" is really a bug.
        if debug:
            raise
        print(f"tinylm {args.command}: error: {describe(exc)}", file=sys.stderr)
        return 2


def check_output_file(path, option: str) -> None:
    """Refuse, before any work, an output file that cannot be written: a directory, or
    one in a directory that does not exist (else an hour of work ends in an error)."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{option} {path}: is a directory; give a file name")
    parent = path.parent
    if not parent.is_dir():
        raise FileNotFoundError(f"{option} {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise PermissionError(f"{option} {path}: directory {parent} is not writable")


def describe(exc: BaseException) -> str:
    """One line for an exception: an OS error names its path and the OS's reason
    ("runs/x: Permission denied"), everything else is its message, with newlines
    folded (a message may quote a file's content)."""
    if isinstance(exc, OSError) and exc.strerror:
        where = " -> ".join(str(f) for f in (exc.filename, exc.filename2) if f is not None)
        text = f"{where}: {exc.strerror}" if where else exc.strerror
    else:
        text = str(exc) or type(exc).__name__
    text = " ".join(text.split())
    return text if len(text) <= 500 else text[:500] + "..."


if __name__ == "__main__":
    sys.exit(main())
