"""Preference data for DPO: a prompt, a chosen answer and a rejected one.

One record a line of a .jsonl file:

    {"messages": [{"role": "user", "content": "uppercase: lord"}],
     "chosen": "LORD", "rejected": "lord", "lang": "en"}

`messages` is the conversation so far and must end with a user message; `chosen`
and `rejected` are the two candidate assistant replies, as text, or as TRL's
conversational layout, a list of one assistant message
(`[{"role": "assistant", "content": "LORD"}]`). `lang` is optional, as in chat files.

Each reply is rendered after the prompt (tinylm.finetune.chat) with only the reply
and its end of turn in the mask: DPO compares the log-probability of the two
replies given the same prompt, so the prompt's tokens, shared by both, count for
neither (they would cancel in the margin anyway, but not in the rewards reported).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tinylm.fileio import FileFormatError, shorten

from .chat import Rendered, chat_tokens, check_conversation, render_chat
from .data import pad_rows
from .jsonl import read_jsonl


@dataclass(frozen=True)
class PrefPair:
    """One preference: the two replies rendered after the same prompt."""

    chosen: Rendered
    rejected: Rendered

    def __len__(self) -> int:  # the longer of the two: what a row must hold
        return max(len(self.chosen), len(self.rejected))


def reply_text(value, where: str) -> str:
    """A reply given as text or as [{"role": "assistant", "content": text}]."""
    if isinstance(value, str):
        return value
    if (isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict)
            and value[0].get("role") == "assistant" and isinstance(value[0].get("content"), str)):
        return value[0]["content"]
    raise ValueError(f'{where} must be a string or [{{"role": "assistant", "content": '
                     f'string}}], got {shorten(value, 80)}')


def check_pair(record: dict, where: str):
    """(prompt messages, chosen text, rejected text, lang) of a preference record."""
    messages, lang = check_conversation(record, where, need_assistant=False)
    if messages[-1]["role"] != "user":
        raise ValueError(f"{where}: messages must end with a user message (the prompt)")
    chosen = reply_text(record.get("chosen"), f'{where}: "chosen"')
    rejected = reply_text(record.get("rejected"), f'{where}: "rejected"')
    if chosen == rejected:
        raise ValueError(f'{where}: "chosen" and "rejected" are the same reply')
    return messages, chosen, rejected, lang


def render_pair(messages, chosen: str, rejected: str, tokenizer, tokens=None, *, lang=None,
                where: str = "preference") -> PrefPair:
    tokens = tokens or chat_tokens(tokenizer)

    def one(reply):
        convo = [*messages, {"role": "assistant", "content": reply}]
        return render_chat(convo, tokenizer, tokens, lang=lang, train_on="last", where=where)

    return PrefPair(one(chosen), one(rejected))


def load_prefs(path, tokenizer, tokens=None, *, limit: int | None = None) -> list[PrefPair]:
    """The preference pairs of a JSONL file; errors name `path:line` and the field."""
    tokens = tokens or chat_tokens(tokenizer)
    out = []
    for lineno, record in read_jsonl(path, what="preference file"):
        where = f"{path}:{lineno}"
        try:
            messages, chosen, rejected, lang = check_pair(record, where)
            out.append(render_pair(messages, chosen, rejected, tokenizer, tokens, lang=lang,
                                   where=where))
        except ValueError as exc:
            raise FileFormatError(str(exc)) from None
        if limit is not None and len(out) == limit:
            break
    return out


def pair_rows(pairs: list[PrefPair], T: int, pad_id: int):
    """The rows DPO runs the model on, chosen replies first, then rejected ones:
    idx (2B, T) inputs, targets (2B, T) next ids, mask (2B, T) float (1 on the reply's
    targets) -> `SequenceLogProb.forward(model.forward(idx), targets, mask)` gives
    (2B,) log-probabilities, [:B] chosen and [B:] rejected. Padding only: each row is
    one whole conversation, so a reply's log-probability is the one it has alone."""
    x, y = pad_rows([p.chosen for p in pairs] + [p.rejected for p in pairs], T, pad_id)
    mask = (y >= 0).astype(np.float64)  # IGNORE_INDEX labels are negative
    targets = np.where(y >= 0, y, 0)  # never read under a zero mask; 0 keeps them valid ids
    return x, targets, mask
