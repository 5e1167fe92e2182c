"""What `tinylm finetune` and `tinylm dpo` share: options, configuration, printing, scoring.

The configuration is a TrainConfig (tinylm/training/config.py) whose model fields
are the starting model's, with the command's defaults for the run fields, then
--max-iters, --seed, --device, --out and --set on top; the fine-tuning settings
(run.FinetuneSettings) come from the other options. With --resume both come from
the checkpoint's trainer.json (the data files are used only if they are the very
files the run started with: their SHA-256 is recorded), with the flags on top.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tinylm import checkpoint
from tinylm.backend import DEVICES
from tinylm.fileio import write_json
from tinylm.training.config import MODEL_FIELDS, TrainConfig, parse_field_value
from tinylm.training.console import ConsoleReporter, format_config
from tinylm.training.resume import saved_data_path
from tinylm.training.rundir import find_checkpoint

from .run import FinetuneSettings, trainable_summary


def add_common_options(parser: argparse.ArgumentParser, what: str) -> None:
    g = parser.add_argument_group("what to train")
    g.add_argument("--checkpoint", metavar="DIR",
                   help=f"the {what} to start from: a checkpoint, or a run directory (its "
                        "best/, else last/)")
    g.add_argument("--data", metavar="FILE.jsonl", help="training file (default: the bundled set)")
    g.add_argument("--val", metavar="FILE.jsonl",
                   help="held-out file (default: the bundled one with the bundled data, else "
                        "the last val_fraction of --data)")
    g.add_argument("--lora", type=int, default=0, metavar="RANK",
                   help="train LoRA adapters of this rank on a frozen model (default 0: "
                        "train every weight)")
    g.add_argument("--lora-alpha", type=float, default=None, metavar="A",
                   help="the adapters' scale is A / RANK (default: 2 RANK, a scale of 2)")
    g.add_argument("--lora-targets", default="attn.qkv,attn.proj", metavar="NAMES",
                   help="comma-separated Linear layers (suffixes or globs), or all-linear "
                        "(default: %(default)s)")
    r = parser.add_argument_group("run")
    r.add_argument("--out", metavar="DIR", help="run directory")
    r.add_argument("--max-iters", type=int, metavar="N", help="optimizer steps")
    r.add_argument("--seed", type=int, metavar="N", help="random seed")
    r.add_argument("--device", choices=DEVICES, help="cpu, cuda or auto")
    r.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[],
                   metavar="KEY=VALUE", help="any `tinylm train` field, e.g. --set lr=3e-4")
    r.add_argument("--resume", nargs="?", const="", default=None, metavar="DIR",
                   help="continue a run (DIR: its directory or checkpoint; default --out)")
    r.add_argument("--overwrite", action="store_true", help="start afresh over a run")
    r.add_argument("--dry-run", action="store_true", help="print the configuration and stop")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.add_argument("--score", metavar="FILE.jsonl",
                   help="a scored chat file (task and answer fields) to answer with the best "
                        "checkpoint at the end (default: the bundled test set with the "
                        "bundled data)")


def checkpoint_dir(path) -> str:
    found = find_checkpoint(path, ("best", "last"))
    if found is None:
        raise FileNotFoundError(f"{path}: no tinylm checkpoint there (nor best/ or last/)")
    return str(found)


def model_config(settings: FinetuneSettings):
    """The starting model's GPTConfig, read without loading its weights."""
    if settings.base_format == "hf-gpt2":
        from tinylm.interop.gpt2 import config_from_hf
        from tinylm.interop.hf import read_config

        return config_from_hf(read_config(settings.base, "GPT-2"))
    from tinylm.config import GPTConfig

    return GPTConfig.from_dict(checkpoint.read_meta(settings.base)["model"])


def overrides_of(args) -> dict:
    out = {k: v for k, v in (("max_iters", args.max_iters), ("seed", args.seed),
                             ("device", args.device), ("out_dir", args.out)) if v is not None}
    for item in args.overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        out[key.strip()] = parse_field_value(key.strip(), value.strip())
    return out


def fresh_config(settings: FinetuneSettings, data: str, defaults: dict, args):
    """(TrainConfig, overridden names) of a new run."""
    cfg = model_config(settings)
    fields = {**defaults, **{n: getattr(cfg, n) for n in MODEL_FIELDS}, "data": data,
              "tokenizer": "base"}
    overrides = overrides_of(args)
    if "lr" in overrides and "min_lr" not in overrides:
        overrides["min_lr"] = overrides["lr"] / 10
    return TrainConfig(**{**fields, **overrides}), set(overrides)


def resumed_config(args, default_out: str):
    """(TrainConfig, FinetuneSettings, overridden names, checkpoint) of a run to resume."""
    run_dir = Path(args.resume or args.out or default_out)
    ckpt = find_checkpoint(run_dir, ("last",))
    if ckpt is None:
        raise FileNotFoundError(f"no checkpoint to resume in {run_dir}")
    where = ckpt / "trainer.json"
    state = checkpoint.read_trainer_state(ckpt)
    if not isinstance(state, dict) or not isinstance(state.get("finetune"), dict):
        raise ValueError(f"{where}: not a fine-tuning run (no \"finetune\" settings)")
    settings = FinetuneSettings.from_dict(state["finetune"].get("settings"), str(where))
    saved = TrainConfig.from_dict(state["config"], str(where))
    overrides = overrides_of(args)
    overrides["data"] = args.data or saved_data_path(state, where)
    overrides.setdefault("out_dir", str(ckpt.parent))
    if settings.val_data is not None and state.get("data", {}).get("val_sha256") is None:
        raise ValueError(f"{where}: no fingerprint of the held-out file to check it by")
    return saved.replace(**overrides), settings, set(overrides) - {"data", "out_dir"}, str(ckpt)


def print_start(command: str, source: str, config, overridden, settings) -> None:
    print(f"tinylm {command}: {source} (* = overridden)")
    print(format_config(config, overridden))
    for key, value in settings.to_dict().items():
        print(f"  {key:<22} {value}")


class FinetuneReporter(ConsoleReporter):
    """The Trainer's console output, in fine-tuning's words (examples, pairs, rewards)."""

    def __init__(self, command: str, trainer_kind: str, **kw):
        super().__init__(**kw)
        self.command, self.kind = command, trainer_kind

    def __call__(self, event: str, info: dict) -> None:
        if event == "start":
            return self._start(info)
        if event == "eval":
            return self.print(self.eval_line(info))
        if event == "interrupted" and info["path"]:
            self.close()
            return self.print(f"stopped: saved the state after step {info['step']} to "
                              f"{info['path']}; continue with: tinylm {self.command} --resume "
                              f"{Path(info['path']).parent}")
        return super().__call__(event, info)

    def _start(self, info: dict) -> None:
        unit = "preference pairs" if self.kind == "dpo" else "conversations"
        resumed = f", resuming at step {info['step']}" if info["resumed_from"] else ""
        self.print(f"data: {info['train_tokens']:,} training + {info['val_tokens']:,} held-out "
                   f"{unit}; {info['tokenizer']} on {info['device']}{resumed}")
        if self.progress:
            from tqdm import tqdm

            self.bar = tqdm(total=info["max_iters"], initial=min(info["step"], info["max_iters"]),
                            unit="step", dynamic_ncols=True, smoothing=0.05)

    def eval_line(self, ev: dict) -> str:
        best = "  (best so far)" if ev.get("best") else ""
        if self.kind == "dpo":
            return (f"step {ev['step']}: held-out DPO loss {ev['val_loss']:.4f}, preference "
                    f"accuracy {ev['val_accuracy']:.1%}, reward margin {ev['val_margin']:.3f} "
                    f"(train loss {ev['train_loss']:.4f}){best}")
        return (f"step {ev['step']}: train loss {ev['train_loss']:.4f}, held-out loss "
                f"{ev['val_loss']:.4f} (assistant tokens){best}")


def print_trainable(trainer) -> None:
    s = trainable_summary(trainer.model)
    print(f"trainable: {s['trainable']:,} of {s['total']:,} values "
          f"({s['trainable'] / s['total']:.1%})" + (
              f"; LoRA rank {trainer.settings.lora_rank}" if trainer.settings.lora_rank else ""))


def score_best(trainer, path) -> dict:
    """Answer the scored file with the best checkpoint; print and keep (score.json)."""
    from .evaluate import evaluate_tasks, read_examples

    source = trainer.best_dir if checkpoint.is_checkpoint(trainer.best_dir) else trainer.last_dir
    ckpt = checkpoint.load(source, device=trainer.device)
    result = evaluate_tasks(ckpt.model, ckpt.tokenizer, read_examples(path))
    tasks = ", ".join(f"{t} {v:.0%}" for t, v in result["per_task"].items())
    print(f"score on {path} ({result['n']} examples, greedy, exact match): "
          f"{result['accuracy']:.1%} ({tasks})")
    write_json(Path(trainer.out_dir) / "score.json",
               {"checkpoint": str(source), "file": str(path), "step": trainer.step,
                **{k: v for k, v in result.items() if k != "replies"}})
    return result


def chat_prompt(tokenizer, text: str, *, chat: bool, lang: str | None):
    """For `tinylm generate --chat/--lang`: (prompt ids, end-of-turn id or None, the prompt
    as shown). --chat makes `text` a user message and asks for the assistant's reply (stop
    at <|end|>); --lang puts the language tag first (a chat, or plain text)."""
    from .chat import LANGS, chat_tokens, encode_content, render_prompt

    if lang is not None and lang not in LANGS:
        raise ValueError(f"--lang must be one of {', '.join(LANGS)}, got {lang!r}")
    tokens = chat_tokens(tokenizer)  # a ValueError for a model not made for chat
    if chat:
        ids = render_prompt([{"role": "user", "content": text}], tokenizer, tokens, lang=lang,
                            where="--prompt")
        return [int(i) for i in ids], tokens.end, f"{text}\n"
    body = encode_content(tokenizer, text, "--prompt")
    return [tokens.lang(lang)] + body, None, text
