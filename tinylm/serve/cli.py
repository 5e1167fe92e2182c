"""`tinylm serve`: a local web page that generates text and shows why each token won.

    tinylm serve --checkpoint runs/shakespeare-char-cpu          # then open the printed address
    tinylm serve --hf-gpt2 gpt2/ --port 8001
    curl -s http://127.0.0.1:8000/api/info

The page streams the text token by token, shades each token by the probability
it was drawn with, and for a clicked token lists the candidates before and after
top-k / top-p / min-p, and the attention that chose it. docs/serve.md describes
the JSON API behind it. Ctrl-C stops the server.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import signal
import sys
import threading

from tinylm.generate_cli import add_model_source


def configure(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = __doc__.split("\n", 1)[1]
    add_model_source(parser)  # --checkpoint or --hf-gpt2, as `tinylm generate`
    parser.add_argument("--host", default="127.0.0.1",
                        help="the address to listen on (default: %(default)s, this machine "
                             "only; anything else is reachable from the network, unprotected)")
    parser.add_argument("--port", type=int, default=8000,
                        help="the port (default: %(default)s; 0 picks a free one)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"],
                        help="where to run the model (default: %(default)s)")
    parser.add_argument("--max-new-tokens", type=int, default=None, metavar="N",
                        help="the most tokens one request may generate (default: 1000)")
    parser.add_argument("--max-prompt-tokens", type=int, default=None, metavar="N",
                        help="the longest prompt accepted, in tokens (default: 4096)")
    parser.add_argument("--quiet", action="store_true", help="do not log each request")


def run(args) -> int:
    from tinylm.backend import get_xp, resolve_device
    from tinylm.generate_cli import _checkpoint_in, _load  # the same loading as `generate`
    from tinylm.serve import Engine, Limits, make_server

    if args.checkpoint is None and args.hf_gpt2 is None:
        raise ValueError("give the model to serve: --checkpoint DIR (a tinylm checkpoint) "
                         "or --hf-gpt2 DIR (a Hugging Face GPT-2 directory)")
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in [0, 65535], got {args.port}")
    limits = Limits()
    overrides = {"max_new_tokens": args.max_new_tokens,
                 "max_prompt_tokens": args.max_prompt_tokens}
    for name, value in overrides.items():
        if value is not None:
            if value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
            limits = dataclasses.replace(limits, **{name: value})
    if not is_loopback(args.host):
        print(f"tinylm serve: warning: --host {args.host} lets other machines reach this "
              "server, which has no authentication; 127.0.0.1 keeps it to this machine",
              file=sys.stderr)

    device = resolve_device(args.device)
    get_xp(device)  # fail now, with the install hint, if CUDA is not usable
    model, tokenizer = _load(args, device)
    source = args.hf_gpt2 if args.hf_gpt2 is not None else _checkpoint_in(args.checkpoint)
    server = make_server(Engine(model, tokenizer, limits=limits, source=source),
                         args.host, args.port, quiet=args.quiet)
    n_params = sum(p.size for _, p, _ in model.parameters())
    print(f"tinylm serve: {source} ({n_params:,} parameters) at {server.url} "
          "(Ctrl-C stops)", flush=True)
    _stop_on_signals()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("tinylm serve: stopped", file=sys.stderr)
    finally:
        server.server_close()  # also stops a running generation
    return 0


def _stop_on_signals() -> None:
    """Ctrl-C (SIGINT) and SIGTERM both end serve_forever with KeyboardInterrupt. SIGINT
    is set explicitly because a process started in the background by a shell (or by
    CI) inherits "ignore SIGINT", and then Ctrl-C-like stops would do nothing."""
    if threading.current_thread() is not threading.main_thread():
        return  # only the main thread may set signal handlers (a test may run us in a thread)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False
