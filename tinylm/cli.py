"""The `tinylm` command line (also `python -m tinylm`).

Each subcommand lives in its own module with two functions:
`configure(parser)` adds its options and `run(args) -> int` does the work.
Bad arguments, bad files and OS errors give a one-line error (exit code 2),
never a traceback (`--debug` or TINYLM_DEBUG=1 shows the traceback behind one).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# name -> (module, one-line help). Modules are imported only when used, so
# `tinylm --help` stays fast and one command's dependencies never slow another.
COMMANDS = {
    "train": ("tinylm.train", "train a GPT on a text file (default: the bundled Tiny Shakespeare)"),
    "generate": ("tinylm.generate_cli", "sample text from a checkpoint (or a Hugging Face GPT-2)"),
    "gradcheck": ("tinylm.gradcheck", "check every layer's backward against finite differences"),
    "bench": ("tinylm.bench", "time full training steps (tokens/s, FLOP/s, memory)"),
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
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print(f"tinylm {args.command}: interrupted", file=sys.stderr)
        return 130
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
