"""Supervised fine-tuning (SFT): the Trainer, trained on chats with the loss mask.

    settings = FinetuneSettings(kind="sft", base="runs/shakespeare-char-cpu/best",
                                lora_rank=8)
    config = sft_config(base_config, data="chat.jsonl", out_dir="runs/sft")
    SFTTrainer(config, settings).train()

A step is the Trainer's: k micro-batches of B conversations (data.py), the
cross-entropy of the assistant tokens only (all other labels are IGNORE_INDEX, which
SoftmaxCrossEntropy leaves out of the mean and of the gradient), clipping, AdamW.
An evaluation is the mean of that loss over eval_iters random batches of the
training and of the held-out conversations; best/ is the lowest held-out loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from tinylm.data import file_sha256

from .chat import Rendered, chat_tokens
from .data import ChatBatches, check_lengths, load_chat, pad_batch
from .run import FinetuneTrainer


@dataclass
class ChatData:
    """The conversations of an SFT run (the Trainer's `data`)."""

    tokenizer: object  # the base's, with the chat tokens
    train: list[Rendered]
    val: list[Rendered]
    note: dict  # what trainer.json records of the files (see `describe`)

    def describe(self) -> dict:
        """The files' sizes and SHA-256 (a resumed run checks them) and the counts."""
        return self.note


def describe_files(path, val_path, **counts) -> dict:
    path = Path(path)
    note = {"path": str(path), "bytes": path.stat().st_size, "sha256": file_sha256(path),
            **counts}
    if val_path is not None:
        note.update(val_path=str(val_path), val_sha256=file_sha256(val_path))
    return note


def split_off(examples: list, val_path, val_fraction: float, where) -> tuple[list, list]:
    """(train, val): all of them and nothing when there is a held-out file, else the
    last val_fraction (at least one) held out."""
    if val_path is not None:
        return examples, []
    n_val = max(1, math.floor(len(examples) * val_fraction))
    if len(examples) - n_val < 1:
        raise ValueError(f"{where}: {len(examples)} example(s): too few to hold some out; "
                         "give a held-out file (--val)")
    return examples[:-n_val], examples[-n_val:]


def chat_data(path, val_path, tokenizer, context_length: int, val_fraction: float) -> ChatData:
    tokens = chat_tokens(tokenizer)
    train, val = split_off(load_chat(path, tokenizer, tokens), val_path, val_fraction, path)
    if val_path is not None:
        val = load_chat(val_path, tokenizer, tokens)
    train, dropped = check_lengths(train, context_length, str(path))
    val, val_dropped = check_lengths(val, context_length, str(val_path or path))
    note = describe_files(path, val_path, train_examples=len(train), val_examples=len(val),
                          dropped=dropped + val_dropped)
    return ChatData(tokenizer, train, val, note)


class SFTTrainer(FinetuneTrainer):
    """The Trainer on chat data; `settings.kind` is "sft". See the module docstring."""

    def _prepare_data(self, ckpt, tokenizer):
        cfg = self.config
        self._base_model, tok = self._base(ckpt)
        return chat_data(cfg.data, self.settings.val_data, tok, cfg.context_length,
                         cfg.val_fraction)

    def _make_batches(self):
        cfg = self.config
        return ChatBatches(self.data.train, cfg.context_length, cfg.batch_size,
                           chat_tokens(self.tokenizer).end, seed=[cfg.seed, 1],
                           pack=self.settings.pack)

    def eval_batch(self, split: str):
        examples = self.data.train if split == "train" else self.data.val
        picks = self.eval_rng.integers(0, len(examples), size=self.config.batch_size)
        return pad_batch([examples[i] for i in picks], chat_tokens(self.tokenizer).end)

    def _extra_state(self) -> dict:
        return {"carry": self.batches.state_dict()["carry"]}  # packing: a drawn example

    def _restore(self, ckpt) -> None:
        super()._restore(ckpt)
        carry = ckpt.trainer_state.get("finetune", {}).get("carry")
        if carry is not None and not (isinstance(carry, int) and 0 <= carry < len(self.data.train)):
            raise ValueError(f"{ckpt.path / 'trainer.json'}: damaged trainer state: "
                             "finetune.carry must be null or an example index")
        self.batches.load_state_dict({"rng": self.batches.state_dict()["rng"], "carry": carry})
