"""`tinylm quantize`: write a checkpoint's weights as int8 or int4 (tinylm/quant.py).

    tinylm quantize --checkpoint runs/shakespeare-char-cpu --scheme int8 --out runs/x-int8
    tinylm quantize --checkpoint runs/shakespeare-char-cpu --scheme int4 --group-size 128 --out q4

Every Linear weight is stored packed (codes and scales); embeddings, norms and biases stay
float32. The result loads with `tinylm generate --checkpoint` and `tinylm eval --checkpoint`
(inference only: it cannot be trained or resumed). Its trainer.json keeps the source's
training settings, so `tinylm eval` finds the same text and validation split.
"""

from __future__ import annotations

import argparse


def configure(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = __doc__.split("\n", 1)[1]
    parser.add_argument("--checkpoint", required=True, metavar="DIR",
                        help="a float checkpoint, or a run directory of `tinylm train` (then "
                             "its best/ checkpoint, else last/)")
    parser.add_argument("--scheme", required=True, choices=["int8", "int4"],
                        help="int8: one scale per output channel; int4: one scale per group "
                             "of --group-size input rows")
    parser.add_argument("--group-size", type=int, default=32, metavar="G",
                        help="int4 only: weights per scale, an even number (default: %(default)s)")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="the quantized checkpoint directory to write")


def run(args) -> int:
    from pathlib import Path

    from tinylm import checkpoint
    from tinylm.generate_cli import _checkpoint_in
    from tinylm.quant import model_nbytes, quantize_model

    if args.scheme == "int4" and (args.group_size < 2 or args.group_size % 2):
        raise ValueError(f"--group-size must be an even number >= 2, got {args.group_size}")
    source = Path(_checkpoint_in(args.checkpoint))
    out = Path(args.out)
    if out.resolve() == source.resolve():
        raise ValueError(f"--out {out}: that is the checkpoint being quantized; give a new "
                         "directory")
    ckpt = checkpoint.load(source)
    if getattr(ckpt.model, "quantization", None):
        raise ValueError(f"{source}: already quantized ({ckpt.model.quantization['scheme']})")
    before = model_nbytes(ckpt.model)
    model = quantize_model(ckpt.model, args.scheme, args.group_size)
    # the training settings and the data's fingerprint, so that `tinylm eval` finds the
    # same text and split (and knows it is the same file)
    state = ckpt.trainer_state or {}
    note = {"format": "tinylm-quantized", "source": str(source),
            "config": state.get("config") or {}}
    if isinstance(state.get("data"), dict):
        note["data"] = state["data"]
    checkpoint.save(out, model, tokenizer=ckpt.tokenizer, trainer_state=note)
    after = model_nbytes(model)
    group = f" g{args.group_size}" if args.scheme == "int4" else ""
    print(f"quantized {source} ({args.scheme}{group}): weights {before / 2**20:.2f} MiB -> "
          f"{after / 2**20:.2f} MiB ({before / after:.1f}x smaller); wrote {out}")
    return 0
