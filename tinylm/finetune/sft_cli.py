"""`tinylm finetune`: supervised fine-tuning on chats, every weight or LoRA adapters.

    tinylm finetune --checkpoint runs/shakespeare-char-cpu              # the bundled tasks
    tinylm finetune --checkpoint runs/shakespeare-char-cpu --lora 8     # LoRA, rank 8
    tinylm finetune --checkpoint base/ --data chat.jsonl --val held.jsonl --out runs/mine
    tinylm finetune --hf-gpt2 gpt2/ --data chat.jsonl --lora 8 --device cuda
    tinylm finetune --resume runs/sft                                   # after Ctrl-C

The data is JSONL, one conversation a line: {"messages": [{"role": "user", "content":
...}, {"role": "assistant", "content": ...}], "lang": "en"} (docs/finetuning.md). Only
the assistant's tokens are trained. The run directory is `tinylm train`'s: last/ and
best/ checkpoints (with LoRA: of the merged model), log.jsonl, loss.png; with a
scored file (--score), score.json holds the best checkpoint's answers' score.
"""

from __future__ import annotations

import argparse

from .cli import (
    FinetuneReporter,
    add_common_options,
    checkpoint_dir,
    fresh_config,
    print_start,
    print_trainable,
    resumed_config,
    score_best,
)
from .run import FinetuneSettings
from .sft import SFTTrainer
from .tasks import bundled

# The run fields that differ from pre-training's: measured on the bundled tasks
# (docs/finetuning.md). No weight decay: it would pull a good base towards zero.
DEFAULTS = dict(max_iters=600, batch_size=32, lr=1e-3, min_lr=1e-4, warmup_iters=20,
                weight_decay=0.0, eval_interval=100, eval_iters=10)
LORA_LR = 3e-3  # adapters start at zero and are few: a larger rate suits them


def configure(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = __doc__.split("\n", 1)[1]
    add_common_options(parser, "pre-trained model")
    parser.add_argument("--hf-gpt2", metavar="DIR",
                        help="start from a Hugging Face GPT-2 directory instead of --checkpoint")
    parser.add_argument("--pack", action="store_true",
                        help="several conversations a row (fewer wasted positions; see "
                             "docs/finetuning.md)")


def settings_of(args, kind: str = "sft") -> tuple[FinetuneSettings, str]:
    """(settings, training file) from the options of a fresh run."""
    if (args.checkpoint is None) == (getattr(args, "hf_gpt2", None) is None):
        raise ValueError("give the model to start from: --checkpoint DIR"
                         + (" or --hf-gpt2 DIR (not both)" if kind == "sft" else ""))
    data = args.data or str(bundled(f"{'sft' if kind == 'sft' else 'prefs'}-train"))
    val = args.val
    if val is None and args.data is None:
        val = str(bundled(f"{'sft' if kind == 'sft' else 'prefs'}-test"))
    score = args.score or (str(bundled("sft-test")) if args.data is None else None)
    hf = getattr(args, "hf_gpt2", None)
    alpha = args.lora_alpha if args.lora_alpha is not None else 2.0 * max(args.lora, 1)
    targets = tuple(t.strip() for t in args.lora_targets.split(",") if t.strip())
    settings = FinetuneSettings(
        kind=kind, base=hf if hf else checkpoint_dir(args.checkpoint),
        base_format="hf-gpt2" if hf else "tinylm", val_data=val, lora_rank=args.lora,
        lora_alpha=alpha, lora_targets=targets or ("attn.qkv",), pack=getattr(args, "pack", False),
        beta=getattr(args, "beta", None) or 0.1, score_data=score)
    return settings, data


def run(args) -> int:
    return train(args, "finetune", "sft", SFTTrainer, DEFAULTS, LORA_LR)


def train(args, command: str, kind: str, trainer_class, defaults: dict, lora_lr: float) -> int:
    """Configure, train, print, score: the body of both commands."""
    default_out = f"runs/{kind}" + ("-lora" if args.lora else "")
    if args.resume is not None:
        config, settings, overridden, resume = resumed_config(args, default_out)
        source = f"resuming {resume}"
    else:
        settings, data = settings_of(args, kind)
        defaults = {**defaults, "out_dir": default_out}
        if args.lora:
            defaults.update(lr=lora_lr, min_lr=lora_lr / 10)
        config, overridden = fresh_config(settings, data, defaults, args)
        resume, source = None, f"{command} from {settings.base}"
    print_start(command, source, config, overridden, settings)
    if args.dry_run:
        return 0
    reporter = FinetuneReporter(command, kind, progress=not args.no_progress)
    try:
        trainer = trainer_class(config, settings, reporter=reporter, resume=resume,
                                overwrite=args.overwrite)
        print_trainable(trainer)
        result = trainer.train()
    finally:
        reporter.close()
    print(f"done: step {result['step']}; best held-out loss {result['best_val_loss']:.4f}; "
          f"checkpoints {result['best_checkpoint']} (best), {result['last_checkpoint']} (last); "
          f"log {result['log']}")
    if settings.score_data:
        score_best(trainer, settings.score_data)
    return 0
