"""`tinylm eval`: a checkpoint's loss, perplexity, bits per byte and accuracy on the whole
validation split (every token predicted once; tinylm/evaluate.py).

    tinylm eval --checkpoint runs/shakespeare-char-cpu
    tinylm eval --checkpoint runs/x/int4 --data other.txt --json
"""

from __future__ import annotations

import argparse
import json


def configure(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = __doc__.split("\n", 1)[1]
    parser.add_argument("--checkpoint", required=True, metavar="DIR",
                        help="a checkpoint directory (float or quantized), or a run directory "
                             "of `tinylm train` (then its best/ checkpoint, else last/)")
    parser.add_argument("--data", default=None, metavar="FILE",
                        help="a UTF-8 text file; its last --val-fraction of tokens is evaluated "
                             "(default: the checkpoint's training text)")
    parser.add_argument("--val-fraction", type=float, default=None, metavar="F",
                        help="the validation split's share of the tokens (default: the "
                             "checkpoint's training setting, else 0.1)")
    parser.add_argument("--batch-size", type=int, default=8, metavar="B",
                        help="windows per forward pass (default: %(default)s)")
    parser.add_argument("--context-length", type=int, default=None, metavar="T",
                        help="window length (default: the model's context_length)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"],
                        help="cpu (NumPy), cuda (CuPy) or auto (default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="print the numbers as one JSON object")


def run(args) -> int:
    from tinylm.evaluate import evaluate_checkpoint
    from tinylm.generate_cli import _checkpoint_in

    if args.val_fraction is not None and not 0.0 < args.val_fraction < 1.0:
        raise ValueError(f"--val-fraction must be in (0, 1), got {args.val_fraction}")
    r = evaluate_checkpoint(_checkpoint_in(args.checkpoint), args.data, device=args.device,
                            batch_size=args.batch_size, context_length=args.context_length,
                            val_fraction=args.val_fraction)
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    q = r["quantization"]
    kind = "float" if q is None else q["scheme"] + (f" g{q['group_size']}" if q["group_size"]
                                                    else "")
    bpb = "n/a" if r["bits_per_byte"] is None else f"{r['bits_per_byte']:.4f}"
    mib = r["weights_bytes"] / 2**20
    print(f"checkpoint     {r['checkpoint']} ({kind}, weights {mib:.2f} MiB)")
    print(f"data           {r['data']}: validation split (last {r['val_fraction']:g}), "
          f"{r['tokens']:,} tokens predicted, {r['bytes']:,} bytes, "
          f"windows of {r['context_length']}")
    print(f"loss           {r['loss']:.4f} nats/token   perplexity {r['perplexity']:.3f}")
    print(f"bits per byte  {bpb}")
    print(f"accuracy       {r['accuracy']:.4f} (next token, top 1)")
    return 0
