"""After pre-training: supervised fine-tuning (SFT) on chats, and preference data (DPO).

Where to look (read in this order):
  chat.py      the chat format: special tokens, rendering, the loss mask
  view.py      show_mask: the mask in colour, for a terminal or a notebook
  data.py      conversations into (x, y) batches: padding or packing; load_chat
  prefs.py     preference pairs (prompt, chosen, rejected) and their DPO rows
  vocab.py     grow_vocab: embedding rows for the new special tokens
  tasks.py     the bundled instruction tasks, how they are made and scored
  evaluate.py  greedy replies to prompts, scored against the answers
  jsonl.py     JSON Lines read line by line, with limits and file:line errors
  run.py       what SFT and DPO runs share: settings, the base model, LoRA, saving
  sft.py       SFTTrainer: the pre-training Trainer on chats
  dpo.py       DPOTrainer: the Trainer on preference pairs, the reference cached
  store.py     a LoRA run's adapters and optimizer state, beside merged checkpoints
  cli.py       what `tinylm finetune` (sft_cli.py) and `tinylm dpo` (dpo_cli.py) share
The LoRA adapters are tinylm/lora.py; the DPO loss is tinylm/nn/preference.py.
The full story is in docs/finetuning.md.
"""

from .chat import (
    IGNORE_INDEX,
    LANGS,
    ROLES,
    ChatTokens,
    Rendered,
    add_chat_tokens,
    chat_tokens,
    check_conversation,
    decode_reply,
    has_chat_tokens,
    render_chat,
    render_document,
    render_prompt,
)
from .data import ChatBatches, check_lengths, load_chat, pack_rows, pad_rows
from .evaluate import evaluate_tasks, read_examples, replies
from .jsonl import read_jsonl, write_jsonl
from .prefs import PrefPair, load_prefs, pair_rows, render_pair
from .tasks import TASKS, bundled, make_sets, score
from .view import MaskView, show_mask
from .vocab import grow_vocab

__all__ = [
    "IGNORE_INDEX", "LANGS", "ROLES", "TASKS", "ChatBatches", "ChatTokens", "MaskView",
    "PrefPair", "Rendered", "add_chat_tokens", "bundled", "chat_tokens", "check_conversation",
    "check_lengths", "decode_reply", "evaluate_tasks", "grow_vocab", "has_chat_tokens",
    "load_chat", "load_prefs", "make_sets", "pack_rows", "pad_rows", "pair_rows",
    "read_examples", "read_jsonl", "render_chat", "render_document", "render_pair",
    "render_prompt", "replies", "score", "show_mask", "write_jsonl",
]
